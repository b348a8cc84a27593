// Expert kernels, generation 2 (docs/kernels-v2.md): one persistent launch per layer, and a
// combine kernel launched as its programmatic dependent.
//
// Work list: an item is (active expert u, block of up to kBN tokens of u, I-slice of kSlice columns),
// enumerated from the routing plan's CSR (act_offsets, meta[kMetaActive]) inside every CTA, so it
// is sized from the actual kept experts and token counts and needs no host synchronisation.
// Stream-K: the items' units (GEMM1 column units, GEMM2 row tiles) lie end to end on an axis of
// weight bytes and CTA c of G takes the units starting in [c*W/G, (c+1)*W/G) (persistent_experts_kernel).
// Per item, fused: GEMM1 (gate+up rows of the slice, K = H) + activation into shared memory,
// then GEMM2 (all H rows of w_down, K = the slice) from that shared h: no h round trip.
// Both run through one cp.async ring (kStages deep, kBK = 128 k = 256 B per weight row and stage).
// Reduction: each item writes weighted fp32 partials per (pair, slice) (deterministic) or adds
// them atomically into ybuf (atomic); combine_v2_kernel, a PDL dependent, sums every output in
// parallel over its grid, in a fixed order per element: no CTA of the persistent grid reduces, and
// the bits depend neither on its grid size nor on which CTA finishes last.
// Co-residency is not assumed: the one cross-CTA wait (a cut item's h) is bounded, and a CTA whose
// wait times out recomputes the item's GEMM1 itself (the same bits), so a grid larger than what is
// resident (another kernel, an MPS or green-context limit holds SMs) only gets slower.
#pragma once

#include "moespec/experts.cuh"

namespace moespec {
namespace experts_v2 {

using experts::DownMap;
using experts::ExpertsParams;
using experts::GateUpMap;

constexpr int kBM = experts::kBM;  // 128 weight rows per stage (4 warps x 32), as v1
constexpr int kBK = 128;           // k per stage: 256 B contiguous per weight row
constexpr int kSlice = 128;        // I columns per item (two GEMM1 passes of 64)
constexpr int kThreads = experts::kThreads;
// Tokens per item: up to 64 (both 32-token blocks per weight stage, so an expert with <= 64 tokens
// streams its weights once) on sm_90, where 4 stages of a 64-token B operand fit in 227 KiB
// (smem_bytes_for(4, 64) = 225.6 KiB with padded rows). sm_80's 163 KiB hold 3 stages of 32-token
// items only (3 stages of 64 tokens need 174.5 KiB, 2 stages would starve every item's stream), so
// sm_80 keeps 32-token items and 3 stages. An item's MMAs, B loads and epilogues cover only its
// own token fragments (nf_active, warp-uniform at run time): a <= 32-token item costs what it did
// with 32-token items, a 33-64-token one does twice the MMA on the same weight bytes.
// The host reserves the sm_90 size on cc >= 9 (smem_bytes(9)); sm_80 code never runs there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kStages = 3;
constexpr int kNF = 4;  // token fragments of 8
#else
constexpr int kStages = 4;
constexpr int kNF = 8;
#endif
constexpr int kBN = kNF * 8;  // tokens per item (at most)
constexpr int kKUnroll = kNF == 8 ? 1 : 2;  // mma_stage's k loop
constexpr int kBNMax = 64;    // host-side sizes (the h workspace) cover both
static_assert(kBN <= kBNMax && kBN <= experts::kThreads, "one thread per token counts completions");
constexpr int kPad = kBK + 8;  // smem row stride (16-byte aligned rows, conflict-free u32 reads)
constexpr int kAStage = kBM * kPad;  // [rows][BK] or transposed [BK][rows] (kBM == kBK)
constexpr int kBStage = kBN * kPad;
constexpr int kHTile = kBN * kPad;  // h of the item: [tokens][slice]
constexpr int kMaxExperts = 1024;   // routing plan limit (routing::kMaxE)
static_assert(kBM == kBK, "one padded stride serves both weight layouts");
static_assert(kSlice == kBK, "GEMM2 reads one whole slice per stage");
static_assert(kSlice == 2 * experts::kGateUpTile, "two GEMM1 passes per slice");
// The CTA's bookkeeping lives in dynamic shared memory too, after the ring and h: one carve-up of
// one opt-in size, and no static shared memory to add to the 227 KiB limit on sm_90.
// s_item0, s_flag and a pad int, and stages + 1 piece descriptors of kPieceInts ints.
constexpr int kPieceInts = 19;
constexpr int meta_bytes(int stages) { return ((kMaxExperts + 1) + 2) * 4 + (stages + 1) * kPieceInts * 4; }

// Dynamic shared memory of `stages` ring stages for items of up to `bn` tokens (the ring's A and B
// tiles, h, the bookkeeping); the device layout below uses (kStages, kBN) of its architecture.
constexpr int smem_bytes_for(int stages, int bn) {
  return (stages * (kAStage + bn * kPad) + bn * kPad) * 2 + meta_bytes(stages);
}
static_assert(smem_bytes_for(4, 64) <= 227 * 1024, "sm_90: 4 stages of 64-token items in 227 KiB");
static_assert(smem_bytes_for(3, 32) <= 163 * 1024, "sm_80: 3 stages of 32-token items in 163 KiB");
static_assert(smem_bytes_for(kStages, kBN) == (kStages == 4 ? smem_bytes_for(4, 64) : smem_bytes_for(3, 32)),
              "the host's reservation (smem_bytes) matches this architecture's layout");
inline int smem_bytes(int cc_major) { return cc_major >= 9 ? smem_bytes_for(4, 64) : smem_bytes_for(3, 32); }

__device__ __forceinline__ void zero_acc(float (&acc)[2][kNF][4]) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < kNF; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
}

// Stage load of kBM weight rows (map) x kBK k from k0 (exclusive bound K), zero-filled outside.
// A thread's chunks are fixed by its index: rows r0 + 8i at one k offset (non-transposed), or k-rows
// r0 + 8i at one row offset (transposed), i < 16. Row maps are affine with slope 1 within each half
// of the tile (rows [0, 64) and [64, 128): GateUpMap's gate / up halves, DownMap's rows, ColumnRange's
// restriction of a GateUpMap), so two row pointers per stage and a constant stride give every
// chunk's source: a 64-bit add per chunk instead of the map arithmetic and a 64-bit multiply.
template <bool TRANS, class Map>
__device__ __forceinline__ void load_weights(uint16_t* a, const uint16_t* __restrict__ W, int64_t ld, int k0, int K,
                                             const Map& map) {
  constexpr int kChunks = kBM * (kBK / 8) / kThreads;  // 16 per thread
  static_assert(kChunks == 16 && kBM / 2 == 8 * (kChunks / 2), "two halves of 8 chunks, 8 rows apart");
  const int tid = threadIdx.x;
  const int r0 = tid / (kBK / 8), off = (tid % (kBK / 8)) * 8;
  const int64_t step = 8 * ld;
  if constexpr (!TRANS) {
    const int kg = k0 + off;
    const bool kok = kg < K;
    const uint16_t* p0 = W + (int64_t)map.j(r0) * ld + kg;
    const uint16_t* p1 = W + (int64_t)map.j(r0 + kBM / 2) * ld + kg;
    uint16_t* d = a + r0 * kPad + off;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const bool ok = kok && map.valid(r0 + 8 * i);
      const uint16_t* src = (i < kChunks / 2 ? p0 : p1) + (i % (kChunks / 2)) * step;
      experts::cp_async16(d + i * 8 * kPad, ok ? src : W, ok);
    }
  } else {
    const bool vok = map.valid(off);  // 8 consecutive rows, equally valid
    const uint16_t* p = W + (int64_t)(k0 + r0) * ld + map.j(off);
    uint16_t* d = a + r0 * kPad + off;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const bool ok = vok && k0 + r0 + 8 * i < K;
      experts::cp_async16(d + i * 8 * kPad, ok ? p + i * step : W, ok);
    }
  }
}

// acc += A(stage) . B^T over one kBK stage; B rows are [token][k] with stride kPad.
template <bool BF16, bool TRANS>
__device__ __forceinline__ void mma_stage(float (&acc)[2][kNF][4], const uint16_t* a, const uint16_t* b,
                                          const int (&arow)[2][2], int nf_active) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  // Unrolled twice with 32-token items; once with 64 (the doubled accumulator leaves no registers
  // for a second step's A fragments: 255 and spills unrolled, 250-252 without).
#pragma unroll kKUnroll
  for (int kk = 0; kk < kBK; kk += 16) {
    const int c = kk + tig * 2;
    uint32_t af[2][4];
#pragma unroll
    for (int mf = 0; mf < 2; ++mf) {
      const int r0 = arow[mf][0], r1 = arow[mf][1];
      if constexpr (!TRANS) {
        af[mf][0] = experts::ld_u32(a + r0 * kPad + c);
        af[mf][1] = experts::ld_u32(a + r1 * kPad + c);
        af[mf][2] = experts::ld_u32(a + r0 * kPad + c + 8);
        af[mf][3] = experts::ld_u32(a + r1 * kPad + c + 8);
      } else {
        af[mf][0] = experts::pack2(a[c * kPad + r0], a[(c + 1) * kPad + r0]);
        af[mf][1] = experts::pack2(a[c * kPad + r1], a[(c + 1) * kPad + r1]);
        af[mf][2] = experts::pack2(a[(c + 8) * kPad + r0], a[(c + 9) * kPad + r0]);
        af[mf][3] = experts::pack2(a[(c + 8) * kPad + r1], a[(c + 9) * kPad + r1]);
      }
    }
#pragma unroll
    for (int nf = 0; nf < kNF; ++nf) {
      if (nf < nf_active) {  // warp-uniform: skip token fragments beyond the item's tokens
        const uint16_t* bp = b + (nf * 8 + g) * kPad + c;
        const uint32_t b0 = experts::ld_u32(bp), b1 = experts::ld_u32(bp + 8);
        experts::mma16816<BF16>(acc[0][nf], af[0], b0, b1);
        experts::mma16816<BF16>(acc[1][nf], af[1], b0, b1);
      }
    }
  }
}

__device__ __forceinline__ void add4(float4& a, const float4& b) { a.x += b.x, a.y += b.y, a.z += b.z, a.w += b.w; }

__device__ __forceinline__ int active_slots(const ExpertsParams& p, int t) {
  int n = 0;
  for (int s = 0; s < p.k; ++s) n += p.pair_position[(int64_t)t * p.k + s] >= 0 ? 1 : 0;
  return n;
}

// Restricts a GateUpMap to intermediate columns [c0, c1) of its 64 (multiples of 8, so the
// transposed loader's 8-row chunks are wholly in or out): rows outside are zero-filled, never read.
struct ColumnRange {
  GateUpMap m;
  int c0, c1;
  __device__ __forceinline__ int col(int r) const {
    return m.order == experts::kInterleaved ? (r >> 1) : (r & (experts::kGateUpTile - 1));
  }
  __device__ __forceinline__ int j(int r) const { return m.j(r); }
  __device__ __forceinline__ bool valid(int r) const { return m.valid(r) && col(r) >= c0 && col(r) < c1; }
};

// The counters buffer (int32) of a launch with G CTAs: per split-item slot (at most G-1 items are
// split) a bit mask of its published 8-column units of h (bit u: column unit u, 16 per item), zero
// on entry and zeroed by the combine kernel (which runs after this kernel has completed, so no
// memset sits between the routing plan and this PDL launch, and graph replays need none). Then,
// 16-byte aligned, the slots' h tiles [G][kBNMax][kSlice] (16-bit; sm_80 uses half).
__host__ __device__ inline int64_t counters_zeroed(int64_t G) { return G; }
__host__ __device__ inline int64_t h_ws_offset(int64_t G) { return (counters_zeroed(G) + 3) & ~int64_t(3); }
__host__ __device__ inline int64_t counters_len(int64_t G) { return h_ws_offset(G) + G * kBNMax * kSlice / 2; }
// How long a CTA waits for another CTA's h columns before it recomputes them (ns; ExpertsParams::
// wait_ns < 0 takes it): well above the few stages a resident producer can be behind (the model
// in docs/kernels-v2.md finds the waits under one stage), well below recomputing (an item's GEMM1
// is 2*H/128 stages, ~32 us for Qwen3-30B-A3B at an H200's fair share).
constexpr uint32_t kWaitNs = 20000;

// An item's units on the work axis, in eighths of a stage (4 KB of weights): nc GEMM1 column
// units (8 intermediate columns = 16 gate/up rows over K: kt1 eighths each) and nr GEMM2 row tiles
// (8 eighths each), interleaved in proportion so that any stretch of the axis is ~2/3 GEMM1.
// Returns the units whose start lies in [lo, hi): column units [*ua, *ub), row tiles [*ra, *rb).
__device__ __forceinline__ void units_in(int nc, int nr, int kt1, int64_t lo, int64_t hi, int* ua, int* ub, int* ra,
                                         int* rb) {
  int c = 0, r = 0;
  int64_t off = 0;
  *ua = *ub = *ra = *rb = -1;
  while (c < nc || r < nr) {
    const bool col = r == nr || (c < nc && (int64_t)(c + 1) * nr <= (int64_t)(r + 1) * nc);
    const bool in = off >= lo && off < hi;
    if (col) {
      if (in) *ua = *ua < 0 ? c : *ua, *ub = c + 1;
      off += kt1, ++c;
    } else {
      if (in) *ra = *ra < 0 ? r : *ra, *rb = r + 1;
      off += 8, ++r;
    }
  }
  if (*ua < 0) *ua = *ub = 0;
  if (*ra < 0) *ra = *rb = 0;
}

// One piece of work of a CTA: its units of one item in one phase (see the kernel); u is the item's
// active-expert index (the load cursor restarts from a piece after a recompute); redo: the piece
// recomputes its item's GEMM1 (a wait timed out).
struct Piece {
  int item, slice, e, p0, nrows, i_base, passes, n1, ua, ub, ra, rb, whole, slot, t1a, m1, m, u, redo;
};
static_assert(sizeof(Piece) == kPieceInts * sizeof(int), "meta_bytes reserves kPieceInts ints per piece");
constexpr int kPieceSlots = kStages + 1;  // the computed piece + up to kStages-1 ahead + one being written

// The bits of an item's column units [ua, ub) (16 units of 8 columns; bit u = unit u).
__device__ __forceinline__ int unit_bits(int ua, int ub) { return ub > ua ? ((1 << ub) - 1) & ~((1 << ua) - 1) : 0; }

// grid = persistent CTAs (the launcher: SMs x resident CTAs per SM; any grid is correct, and the
// bits do not depend on it). block = kThreads; dynamic smem = smem_bytes(cc major).
// counters: counters_len(gridDim.x) ints, the first counters_zeroed() zero on entry (the combine
// kernel zeroes them); deterministic ybuf: [T*k*nslices, H] fp32; atomic ybuf: [T, H] fp32, zero on
// entry (the combine kernel zeroes it). out is written by combine_v2_kernel, launched right after.
//
// Stream-K: the work axis is every item's units (above), item after item; CTA c takes the units
// starting in [c*W/G, (c+1)*W/G), so the shares are equal to within one unit (a column unit is kt1/8
// of a stage, a row tile one stage). An item whose units fall to several CTAs is split by output
// only: GEMM1 by intermediate columns (each over all of K), GEMM2 by row tiles (each over the whole
// slice), so every value is accumulated exactly as in an unsplit item and the bits do not depend on
// the split. Its h goes through global memory: every CTA first runs the GEMM1 units of its split
// items (at most two: its first and last) and publishes their h columns (a bit per 8-column unit),
// then its whole items (fused, h in shared memory), then the row tiles of its split items, which
// wait until every column unit of the item is published. Only that last phase waits, only for the
// first phase of other CTAs, and only for p.wait_ns: a CTA whose producer is not resident (its SM
// is held by this grid's waiting CTAs or another kernel) recomputes the item's GEMM1 into shared
// memory itself (every column, accumulated exactly as its producer does: the same bits) and goes
// on. So no CTA waits forever, and any residency, down to one CTA at a time, completes.
//
// One cp.async ring runs through all the CTA's pieces: a load cursor walks the piece sequence
// kStages-1 stages ahead of the compute cursor, so the next piece's first stages stream while the
// current one finishes (its epilogue): no per-piece prologue or drain. A recompute drops the stages
// in flight and restarts the load cursor at the recomputing piece.
template <bool BF16, bool TRANS>
__global__ void __launch_bounds__(kThreads, 1) persistent_experts_kernel(const ExpertsParams p) {
  uint16_t* smem = dynamic_smem<uint16_t>();
  uint16_t* sA = smem;
  uint16_t* sB = sA + kStages * kAStage;
  uint16_t* sH = sB + kStages * kBStage;
  int* s_item0 = reinterpret_cast<int*>(sH + kHTile);  // [kMaxExperts + 1] first item of each active expert
  int& s_flag = s_item0[kMaxExperts + 1];              // what a wait saw (thread 0 -> the CTA)
  Piece* s_piece = reinterpret_cast<Piece*>(s_item0 + kMaxExperts + 3);  // [kPieceSlots], written by thread 0

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
  const int H = p.H, I = p.I, NS = p.nslices;
  griddep_wait();  // launched as a PDL dependent: the routing plan before is complete and visible
  griddep_launch_dependents();  // the combine kernel may launch now (it waits for this whole grid)
  const int A = p.meta[3];  // kMetaActive
  const uint32_t wait_ns = p.wait_ns < 0 ? kWaitNs : static_cast<uint32_t>(p.wait_ns);

  // The work list: items of expert u are s_item0[u] .. s_item0[u+1]-1, token-block major.
  if (warp == 0) {
    int running = 0;
    for (int base = 0; base < A; base += 32) {
      const int u = base + lane;
      int c = 0;
      if (u < A) c = (p.act_offsets[u + 1] - p.act_offsets[u] + kBN - 1) / kBN * NS;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(kFullMask, c, d);
        if (lane >= d) c += v;
      }
      if (u < A) s_item0[u + 1] = running + c;
      running += __shfl_sync(kFullMask, c, 31);
    }
    if (lane == 0) s_item0[0] = 0;
  }
  __syncthreads();

  const int kt1 = (H + kBK - 1) / kBK;   // GEMM1 stages per pass
  const int rt2 = (H + kBM - 1) / kBM;   // GEMM2 row tiles (one stage each)
  const int64_t ld1 = TRANS ? 2 * (int64_t)I : H;
  const int64_t ld2 = TRANS ? (int64_t)H : I;

  // The axis in eighths of a stage: a token block of an expert is NS items; all slices but the
  // last have two passes (16 column units).
  const int last_passes = I - (NS - 1) * kSlice > experts::kGateUpTile ? 2 : 1;
  const int64_t Lfull = 16 * (int64_t)kt1 + 8 * rt2, Lblk = (NS - 1) * Lfull + 8 * last_passes * kt1 + 8 * rt2;
  const int64_t W = (int64_t)(s_item0[A] / NS) * Lblk;
  const int64_t G = gridDim.x;
  const int64_t my_lo = W * blockIdx.x / G, my_hi = W * (blockIdx.x + 1) / G;
  int* const h_flags = p.counters;  // [slot]
  uint16_t* const h_ws = reinterpret_cast<uint16_t*>(p.counters + h_ws_offset(G));
  // Items whose extent meets this CTA's share (its units start in [my_lo, my_hi)).
  auto item_at = [&](int64_t pos) {
    const int64_t blk = pos / Lblk;
    return static_cast<int>(blk * NS + min(static_cast<long long>((pos % Lblk) / Lfull), (long long)(NS - 1)));
  };
  const int first_item = my_hi > my_lo ? item_at(my_lo) : 0;
  const int last_item = my_hi > my_lo ? item_at(my_hi - 1) : -1;

  // The piece sequence: phase 0 = split items' GEMM1 units, 1 = whole items, 2 = split items'
  // row tiles; items in order within a phase. next_piece advances (phase, item, u) to the next
  // piece with work and fills `pc`; false at the end. Every thread runs it (same result).
  auto next_piece = [&](int& phase, int& item, int& u, Piece& pc) -> bool {
    for (;;) {
      ++item;
      if (item > last_item) {
        if (++phase == 3) return false;
        item = first_item - 1;
        u = 0;
        continue;
      }
      const int slice = item % NS;
      const int64_t P = (int64_t)(item / NS) * Lblk + slice * Lfull;  // the item's first eighth
      const int i_base = slice * kSlice;
      const int passes = min(kSlice, I - i_base) > experts::kGateUpTile ? 2 : 1;
      const int nc = 8 * passes;
      int ua, ub, ra, rb;
      units_in(nc, rt2, kt1, my_lo - P, my_hi - P, &ua, &ub, &ra, &rb);
      if (ub == ua && rb == ra) continue;  // no unit of this item starts in the share
      const bool whole = ua == 0 && ub == nc && ra == 0 && rb == rt2;
      if (phase == 1 ? !whole : (whole || (phase == 0 ? ub == ua : rb == ra))) continue;
      if (phase == 0) rb = ra;  // split: GEMM1 units now, row tiles in phase 2
      if (phase == 2) ub = ua;
      int slot = 0;  // a split item's workspace slot: the first CTA boundary inside it
      if (!whole) {
        int64_t c = P * G / W;
        while (W * c / G <= P) ++c;
        slot = static_cast<int>(c - 1);
      }
      while (s_item0[u + 1] <= item) ++u;
      const int nb = ((item - s_item0[u]) / NS) * kBN;
      pc.item = item;
      pc.slice = slice;
      pc.e = p.act_experts[u];
      pc.p0 = p.act_offsets[u] + nb;
      pc.nrows = min(kBN, p.act_offsets[u + 1] - pc.p0);
      pc.i_base = i_base;
      pc.passes = passes;
      pc.n1 = passes * kt1;
      pc.ua = ua, pc.ub = ub, pc.ra = ra, pc.rb = rb;
      pc.whole = whole;
      pc.slot = slot;
      pc.u = u;
      pc.redo = 0;
      // Stages: GEMM1 passes ua/8 .. (ub-1)/8 (kt1 k-stages each, only the piece's columns),
      // then row tiles ra .. rb-1.
      pc.t1a = (ua / 8) * kt1;
      pc.m1 = ub > ua ? ((ub + 7) / 8) * kt1 - pc.t1a : 0;
      pc.m = pc.m1 + rb - ra;
      return true;
    }
  };
  auto stage_t = [&](const Piece& pc, int idx) { return idx < pc.m1 ? pc.t1a + idx : pc.n1 + pc.ra + (idx - pc.m1); };
  auto cols = [&](const Piece& pc, int pass, int* c0, int* c1) {  // the piece's columns of a pass's 64
    *c0 = max(pc.ua - 8 * pass, 0) * 8;
    *c1 = min(pc.ub - 8 * pass, 8) * 8;
  };

  // Load cursor: piece `lp`, its next stage lidx; lcount pieces found so far (their descriptors in
  // s_piece[n % kPieceSlots]); the ring slot of a stage is its global number mod kStages.
  int lphase = 0, litem = first_item - 1, lu = 0, lcount = 0, lidx = 0;
  Piece lp;
  bool lmore = next_piece(lphase, litem, lu, lp);
  if (lmore) {
    if (tid == 0) s_piece[0] = lp;
    lcount = 1;
  }
  auto load_next = [&](int ring) {  // issues the next stage of the load cursor into ring slot `ring`
    if (!lmore) return;
    const int t = stage_t(lp, lidx);
    uint16_t* a = sA + ring * kAStage;
    if (t < lp.n1) {  // GEMM1: gate+up rows of the piece's columns of a pass, x rows
      const int pass = t / kt1;
      int c0, c1;
      cols(lp, pass, &c0, &c1);
      const ColumnRange map{GateUpMap{lp.i_base + pass * experts::kGateUpTile, I, p.order}, c0, c1};
      const int k0 = (t % kt1) * kBK;
      const uint16_t* Wgu = p.w_gu + (int64_t)lp.e * 2 * I * H;
      load_weights<TRANS>(a, Wgu, ld1, k0, H, map);
      uint16_t* b = sB + ring * kBStage;
      // Only the item's token fragments (rows past nrows in its last one zero-filled): a <= 32-token
      // item loads one 32-token B tile as before, a wider one both.
      const int brows = (lp.nrows + 7) / 8 * 8;
      for (int c = tid; c < brows * (kBK / 8); c += kThreads) {
        const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
        const int kg = k0 + kc;
        const bool ok = r < lp.nrows && kg < H;
        const uint16_t* row = ok ? p.x + (int64_t)p.pair_token[lp.p0 + r] * p.x_stride + kg : Wgu;
        experts::cp_async16(b + r * kPad + kc, row, ok);
      }
    } else {  // GEMM2: 128 rows of w_down over the slice; B is sH
      const DownMap map{(t - lp.n1) * kBM, H};
      load_weights<TRANS>(a, p.w_down + (int64_t)lp.e * H * I, ld2, lp.i_base, I, map);
    }
    if (++lidx == lp.m) {  // the next piece; the compute cursor reads its descriptor >= 1 barrier later
      lidx = 0;
      lmore = next_piece(lphase, litem, lu, lp);
      if (lmore) {
        if (tid == 0) s_piece[lcount % kPieceSlots] = lp;
        ++lcount;
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_next(s);
    experts::cp_async_commit();
  }
  __syncthreads();  // s_piece[0] written

  // Compute cursor: piece number cnum, stage idx; gs = global stage number (ring slot gs % kStages).
  float acc[2][kNF][4];
  zero_acc(acc);
  int gs = 0;
  for (int cnum = 0; cnum < lcount; ++cnum) {  // lcount grows as the load cursor finds pieces
    Piece pc = s_piece[cnum % kPieceSlots];
    const int nf_active = (pc.nrows + 7) / 8;
    uint16_t* const h_tile = h_ws + (int64_t)pc.slot * kBN * kSlice;
    for (int idx = 0; idx < pc.m; ++idx, ++gs) {
      const int t = stage_t(pc, idx);
      if (!pc.whole && idx == pc.m1) {  // first row tile of a split item: every column's h, from global
        const int need = unit_bits(0, 8 * pc.passes);
        perf_event(kPerfWait, pc.slot, 8 * pc.passes);
        if (tid == 0) s_flag = flag_wait_bits(h_flags + pc.slot, need, wait_ns);
        __syncthreads();  // (also: the previous piece's GEMM2 no longer reads sH)
        if ((s_flag & need) != need) {
          // Timed out (the producer is not resident, or far behind): drop the stages in flight,
          // make this piece whole-like (every column unit, h into shared memory, nothing published)
          // and restart the load cursor here. Its GEMM1 then runs like a whole item's.
          perf_event(kPerfRecompute, pc.slot, pc.n1);
          experts::cp_async_wait<0>();
          __syncthreads();  // every thread's copies landed (into slots nobody reads) and s_flag read
          pc.ua = 0, pc.ub = 8 * pc.passes, pc.whole = 1, pc.redo = 1;
          pc.t1a = 0, pc.m1 = pc.n1, pc.m = pc.n1 + pc.rb - pc.ra;
          lphase = 2, litem = pc.item, lu = pc.u, lp = pc, lidx = 0, lmore = true, lcount = cnum + 1;
          if (tid == 0) s_piece[cnum % kPieceSlots] = pc;
#pragma unroll
          for (int s = 0; s < kStages - 1; ++s) {
            load_next((gs + s) % kStages);
            experts::cp_async_commit();
          }
          idx = -1, --gs;  // the loop's increments: stage 0 of the piece, in ring slot gs % kStages
          continue;
        }
        const uint32_t* src = reinterpret_cast<const uint32_t*>(h_tile);
        for (int w = tid; w < nf_active * 8 * kSlice / 2; w += kThreads) {  // the item's fragments only
          const int r = w / (kSlice / 2), c2 = (w % (kSlice / 2)) * 2;
          *reinterpret_cast<uint32_t*>(sH + r * kPad + c2) = __ldcg(src + w);
        }
        // the acquire's last poll, then one round trip per 4 loads (unrolled 4 in the PTX)
        perf_event(kPerfRoundTrips, 1 + nf_active);
        perf_event(kPerfBytes, nf_active * 8 * kSlice * 2 / kThreads);
      }
      experts::cp_async_wait<kStages - 2>();
      __syncthreads();  // stage gs landed for everyone; stage gs-1 (and h) no longer read / complete
      perf_event(kPerfStage, nf_active, (t < pc.n1 ? 1 : 2) + 4 * pc.redo);
      load_next((gs + kStages - 1) % kStages);
      experts::cp_async_commit();
      const uint16_t* a = sA + (gs % kStages) * kAStage;
      int arow[2][2];
      if (t < pc.n1) {
        const int pass = t / kt1;
        const GateUpMap map{pc.i_base + pass * experts::kGateUpTile, I, p.order};
#pragma unroll
        for (int mf = 0; mf < 2; ++mf) {
          arow[mf][0] = map.frag_row(warp, mf, g);
          arow[mf][1] = map.frag_row(warp, mf, g + 8);
        }
        mma_stage<BF16, TRANS>(acc, a, sB + (gs % kStages) * kBStage, arow, nf_active);
        if (t % kt1 == kt1 - 1) {  // pass done: activation into h (columns >= I are zero)
          // A whole item keeps h in shared memory; a split one publishes its columns.
          int c0, c1;
          cols(pc, pass, &c0, &c1);
          uint16_t* hdst = pc.whole ? sH : h_tile;
          const int hld = pc.whole ? kPad : kSlice;
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2) {
            const int ci = warp * 16 + g + 8 * h2;  // column within the pass
            const int ii = pass * experts::kGateUpTile + ci;
            const int i = pc.i_base + ii;
            if (ci < c0 || ci >= c1) continue;  // another CTA's columns
            float bg = 0.f, bu = 0.f;
            if (p.b_gu != nullptr && i < I) {
              const float* bias = p.b_gu + (int64_t)pc.e * 2 * I;
              bg = bias[p.order == experts::kInterleaved ? 2 * i : (p.order == experts::kGateUp ? i : I + i)];
              bu = bias[p.order == experts::kInterleaved ? 2 * i + 1 : (p.order == experts::kGateUp ? I + i : i)];
            }
#pragma unroll
            for (int nf = 0; nf < kNF; ++nf) {
              if (nf >= nf_active) continue;  // rows the item has not (GEMM2 skips them too)
#pragma unroll
              for (int q = 0; q < 2; ++q) {
                const int r = nf * 8 + tig * 2 + q;
                const float v = i < I ? experts::gated_activation(acc[0][nf][h2 * 2 + q] + bg,
                                                                 acc[1][nf][h2 * 2 + q] + bu, p.activation,
                                                                 p.alpha, p.limit)
                                      : 0.f;
                hdst[r * hld + ii] = float_to_bits<BF16>(v);
                if (pc.passes == 1) hdst[r * hld + ii + experts::kGateUpTile] = 0;  // no second pass
              }
            }
          }
          zero_acc(acc);
          if (!pc.whole) {  // publish this pass's columns: stores, barrier, one release by thread 0
            perf_event(kPerfBytes, nf_active * 8 * (c1 - c0) * 2 / kThreads);
            __syncthreads();
            if (tid == 0) flag_or_release(h_flags + pc.slot, unit_bits(pc.ua > 8 * pass ? pc.ua : 8 * pass,
                                                                       pc.ub < 8 * pass + 8 ? pc.ub : 8 * pass + 8));
            perf_event(kPerfRoundTrips, 1);  // the release fence drains the CTA's h stores
            perf_event(kPerfPublish, pc.slot, (c1 - c0) / 8);
          }
        }
      } else {
        const DownMap map{(t - pc.n1) * kBM, H};
#pragma unroll
        for (int mf = 0; mf < 2; ++mf) {
          arow[mf][0] = map.frag_row(warp, mf, g);
          arow[mf][1] = map.frag_row(warp, mf, g + 8);
        }
        mma_stage<BF16, TRANS>(acc, a, sH, arow, nf_active);
#pragma unroll
        for (int mf = 0; mf < 2; ++mf) {
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2) {
            const int h = map.h0 + warp * 32 + mf * 16 + g + 8 * h2;
            if (h >= H) continue;
            const float bias = (p.b_down != nullptr && pc.slice == 0) ? p.b_down[(int64_t)pc.e * H + h] : 0.f;
#pragma unroll
            for (int nf = 0; nf < kNF; ++nf) {
#pragma unroll
              for (int q = 0; q < 2; ++q) {
                const int r = nf * 8 + tig * 2 + q;
                if (r < pc.nrows) {
                  const int pp = pc.p0 + r;
                  const int tok = p.pair_token[pp];
                  const int64_t flat = (int64_t)tok * p.k + p.pair_slot[pp];
                  const float c = (acc[mf][nf][h2 * 2 + q] + bias) * p.weights[flat];
                  if (p.atomic)
                    atomicAdd(p.ybuf + (int64_t)tok * H + h, c);
                  else
                    p.ybuf[(flat * NS + pc.slice) * H + h] = c;
                  perf_event(kPerfBytes, 4);
                }
              }
            }
          }
        }
        zero_acc(acc);
      }
    }
  }
  experts::cp_async_wait<0>();
}

// Rows (active slot, slice) a combine thread sums: a chunk of at most kCombineRows slices of every
// active slot. kCombineSplit(NS) threads share an output's slices (NS > kCombineRows: Mixtral's 112),
// so a thread's chain of dependent loads stays short; a function of the shape only (never of the grid
// or T), so the bits are too.
constexpr int kMaxSlots = 8;         // top-k limit of the routing plan (routing::kMaxK)
constexpr int kCombineRows = 16;      // loads a thread keeps in flight
constexpr int kCombineThreads = 128;
__host__ __device__ constexpr int combine_split(int ns) {
  return ns <= kCombineRows ? 1 : (ns <= 2 * kCombineRows ? 2 : (ns <= 4 * kCombineRows ? 4 : 8));
}

// out[t, h] (4 columns per thread group) from the expert kernel's partials, in parallel over the
// grid; launched right after persistent_experts_kernel as its programmatic dependent.
// grid = any (grid-stride over blocks of kCombineThreads / split outputs); block = kCombineThreads.
// Deterministic: for each active slot in slot order, its slices in slice order (in chunks of
// ceil(NS / split) slices summed by `split` threads, then the chunks in order), then the slots in
// slot order; the same order for every grid and schedule. Atomic: the accumulator row, which it
// leaves zero for the next launch. Tokens without an active slot get zero rows. Block 0 also zeroes
// the expert kernel's flags (counters_zeroed(expert_grid) ints).
template <bool BF16>
__global__ void __launch_bounds__(kCombineThreads) combine_v2_kernel(const ExpertsParams p, int expert_grid) {
  __shared__ float4 s_part[kCombineThreads][kMaxSlots];
  griddep_wait();  // the expert kernel has completed and its partials and flags are visible
  const int tid = threadIdx.x;
  if (blockIdx.x == 0)
    for (int64_t i = tid; i < counters_zeroed(expert_grid); i += kCombineThreads) p.counters[i] = 0;
  const int64_t H = p.H, NS = p.nslices;
  const int split = p.atomic ? 1 : combine_split(static_cast<int>(NS));
  const int per = (static_cast<int>(NS) + split - 1) / split;  // slices per chunk
  const int64_t groups = (int64_t)p.T * (H / 4);
  const int gpb = kCombineThreads / split;  // output groups per block
  const int r = tid % split, gl = tid / split;
  for (int64_t g0 = (int64_t)blockIdx.x * gpb; g0 < groups; g0 += (int64_t)gridDim.x * gpb) {
    const int64_t grp = g0 + gl;
    const bool mine = grp < groups;
    const int64_t t = mine ? grp / (H / 4) : 0, h = mine ? (grp % (H / 4)) * 4 : 0;
    float4 acc = {0.f, 0.f, 0.f, 0.f};
    int slots[kMaxSlots];
    int na = 0;
    if (mine && p.atomic) {
      float4* row = reinterpret_cast<float4*>(p.ybuf + t * H + h);
      acc = __ldcg(row);
      *row = float4{0.f, 0.f, 0.f, 0.f};  // every contribution is in: zero for the next launch
      perf_event(kPerfRoundTrips, 1);
      perf_event(kPerfBytes, 16 + 16 + 8);
    } else if (mine) {
      for (int s = 0; s < p.k; ++s)
        if (p.pair_position[t * p.k + s] >= 0) slots[na++] = s;
      const int z0 = r * per, z1 = min(static_cast<int>(NS), z0 + per);
      const int n = na * max(z1 - z0, 0);
      // Rows j = (slot index j / nz, slice z0 + j % nz), kCombineRows loads in flight, added in order.
      const int nz = max(z1 - z0, 1);
      float4 c = {0.f, 0.f, 0.f, 0.f};
      for (int j0 = 0; j0 < n; j0 += kCombineRows) {
        float4 v[kCombineRows];
#pragma unroll
        for (int q = 0; q < kCombineRows; ++q) {
          const int j = j0 + q;
          if (j < n) {
            const int64_t flat = t * p.k + slots[j / nz];
            v[q] = __ldcg(reinterpret_cast<const float4*>(p.ybuf + ((flat * NS + z0 + j % nz) * H + h)));
          }
        }
#pragma unroll
        for (int q = 0; q < kCombineRows; ++q) {
          const int j = j0 + q;
          if (j < n) {
            add4(c, v[q]);
            if (j % nz == nz - 1) {  // the slot's chunk is complete
              if (split == 1)
                add4(acc, c);
              else
                s_part[tid][j / nz] = c;
              c = float4{0.f, 0.f, 0.f, 0.f};
            }
          }
        }
      }
      perf_event(kPerfRoundTrips, 1 + (n + kCombineRows - 1) / kCombineRows);
      perf_event(kPerfBytes, 16 * n + 4 * p.k);
    }
    if (split > 1) {  // the chunks of each slot in chunk order, then the slots in slot order
      __syncthreads();
      if (mine && r == 0) {
        for (int a = 0; a < na; ++a) {
          float4 c = {0.f, 0.f, 0.f, 0.f};
          for (int q = 0; q < split; ++q)
            if (q * per < NS) add4(c, s_part[tid + q][a]);
          add4(acc, c);
        }
      }
      __syncthreads();
    }
    if (mine && r == 0) {
      uint16_t* o = p.out + t * H + h;
      o[0] = float_to_bits<BF16>(acc.x), o[1] = float_to_bits<BF16>(acc.y);
      o[2] = float_to_bits<BF16>(acc.z), o[3] = float_to_bits<BF16>(acc.w);
      perf_event(kPerfBytes, 8);
    }
  }
}

}  // namespace experts_v2
}  // namespace moespec
