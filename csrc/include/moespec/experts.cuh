// Budgeted grouped SwiGLU experts over a routing plan (docs/design.md §3):
//   GEMM1 + gated activation:  h[p, i]  = act(x[token(p)] . Wgate[e, i], x[token(p)] . Wup[e, i])
//   GEMM2 + routing weight:    c[p, :]  = w(p) * (h[p] . Wdown[e]^T + b_down[e])
//   combine:                   y[t, :]  = sum over slots in slot order (deterministic) or atomics.
// Both GEMMs use swap-AB: expert weight rows sit on the MMA M dimension (mma.sync m16n8k16,
// fp32 accumulation) and the expert's tokens (up to 64 per pass) on N, so each CTA streams a
// 128-row weight panel exactly once per 64 tokens while the tokens stay in shared memory.
// One CTA = one (row tile, active expert); the grid is sized for the worst case and CTAs of
// absent experts exit at once, so launches need no host synchronisation.
#pragma once

#include "moespec/common.cuh"

namespace moespec {
namespace experts {

constexpr int kBM = 128;     // weight rows per CTA (4 warps x 32 rows)
constexpr int kBN = 64;      // tokens per pass (8 n-fragments of 8)
constexpr int kBK = 64;      // K per pipeline stage
constexpr int kStages = 3;   // cp.async pipeline depth
constexpr int kThreads = 128;
constexpr int kPadK = kBK + 8;  // smem row stride of [rows][BK] tiles (16B aligned, conflict-free u32 reads)
constexpr int kPadM = kBM + 8;  // smem row stride of transposed [BK][rows] tiles
constexpr int kNF = kBN / 8;
constexpr int kGateUpTile = kBM / 2;  // intermediate columns per GEMM1 CTA (gate + up rows)
static_assert(kBM == 4 * 32, "4 warps of 32 weight rows");
static_assert(kBK % 16 == 0 && kBK % 8 == 0, "K stage must hold whole mma k-steps and 16-byte chunks");
static_assert((kPadK * 2) % 16 == 0 && (kPadM * 2) % 16 == 0, "cp.async needs 16-byte aligned smem rows");

template <bool TRANS>
constexpr int a_stage_elems() {
  return TRANS ? kBK * kPadM : kBM * kPadK;
}
constexpr int kBStageElems = kBN * kPadK;

template <bool TRANS>
constexpr int smem_bytes() {
  return kStages * (a_stage_elems<TRANS>() + kBStageElems) * 2;
}

enum Order : int { kGateUp = 0, kUpGate = 1, kInterleaved = 2 };
enum Activation : int { kSilu = 0, kClampedSwiglu = 1 };

struct ExpertsParams {
  const uint16_t* x;  // [T, H] bf16/fp16 bits, row stride x_stride (elements, multiple of 8)
  int64_t x_stride;
  const uint16_t* w_gu;    // [E, 2I, H] or transposed [E, H, 2I]
  const uint16_t* w_down;  // [E, H, I] or transposed [E, I, H]
  const float* b_gu;       // [E, 2I] fp32 in storage order, or nullptr
  const float* b_down;     // [E, H] fp32, or nullptr
  int T, k, H, I;
  int order, activation;
  float alpha, limit;
  // routing plan (routing.cuh)
  const int* meta;
  const int* act_experts;
  const int* act_offsets;
  const int* pair_token;
  const int* pair_slot;
  const int* pair_position;  // [T*k], -1 when inactive
  const float* weights;      // [T*k]
  // workspaces and output
  uint16_t* hbuf;  // [T*k, I] intermediate, activation dtype
  float* ybuf;     // deterministic: [T*k, H] weighted pair outputs; atomic: [T, H] accumulator
  uint16_t* out;   // [T, H]
  int atomic;
  // GEMM2 split-K (more CTAs when few experts are kept): blockIdx.z takes K range
  // [z * kchunk, (z + 1) * kchunk); deterministic partials are summed in z order by the combine.
  int ksplit;
  int kchunk;  // multiple of kBK
  // GEMM1 split-K: with ksplit1 > 1, GEMM1 stores raw (gate, up) partials in gubuf
  // [ksplit1][T*k][I][2] and swiglu_kernel sums them in z order before the activation.
  int ksplit1;
  int kchunk1;
  float* gubuf;
  // Generation 2 only (experts_v2.cuh): the stream-K flags and h workspace, I-slices per expert,
  // and how long a cut item's row tiles wait for its h before recomputing it (ns; < 0: kWaitNs).
  int* counters;
  int nslices;
  int64_t wait_ns;
};

// ------------------------------------------------------------------------------------- PTX

// Emulation seam: the PTX wrappers (cp.async with zero-fill, its groups, mma.sync).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int n = pred ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
#ifdef MOESPEC_EMU
  moespec_emu::cp_async(smem, gmem, 16, n);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef MOESPEC_EMU
  moespec_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MOESPEC_EMU
  moespec_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MOESPEC_EMU
  moespec_emu::mma_m16n8k16(BF16, c, a, b0, b1);
#else
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

__device__ __forceinline__ uint32_t ld_u32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// ------------------------------------------------------------------------------- row maps
// A row map says which stored weight row ("storage index" j: a row of [2I, H] or [H, I], or a
// column of the transposed layouts) sits in shared-memory row r of the CTA's weight tile, and
// which smem row feeds each MMA fragment row. Groups of 8 consecutive r always map to 8
// consecutive, equally valid j (needed for 16-byte loads of the transposed layouts), because
// tiles start at multiples of 64 and H, I are multiples of 8.

struct GateUpMap {  // GEMM1: 64 intermediate columns i0..i0+63, as 64 gate + 64 up rows
  int i0, I, order;
  __device__ __forceinline__ int j(int r) const {
    if (order == kInterleaved) return 2 * i0 + r;
    return r < kGateUpTile ? i0 + r : I + i0 + (r - kGateUpTile);
  }
  __device__ __forceinline__ bool valid(int r) const {
    if (order == kInterleaved) return i0 + (r >> 1) < I;
    return i0 + (r & (kGateUpTile - 1)) < I;
  }
  // Warp w owns intermediate columns w*16 .. w*16+15: fragment 0 = gate rows, 1 = up rows.
  __device__ __forceinline__ int frag_row(int warp, int mf, int m) const {
    const int ii = warp * 16 + m;
    const bool gate = mf == 0;
    if (order == kInterleaved) return 2 * ii + (gate ? 0 : 1);
    const bool first_half = (order == kGateUp) == gate;  // gate_up: gate rows first
    return first_half ? ii : kGateUpTile + ii;
  }
};

struct DownMap {  // GEMM2: 128 consecutive output rows h0..h0+127
  int h0, H;
  __device__ __forceinline__ int j(int r) const { return h0 + r; }
  __device__ __forceinline__ bool valid(int r) const { return h0 + r < H; }
  __device__ __forceinline__ int frag_row(int warp, int mf, int m) const { return warp * 32 + mf * 16 + m; }
};

// ------------------------------------------------------------------------------- main loop
// acc[mf][nf][q] += W_tile . B^T over k in [k_begin, K), where B rows come from s_brow (nullptr
// rows are zero). W: the expert's weight matrix; ld: elements between stored rows (non-transposed)
// or between k-rows (transposed). k_begin is a multiple of kBK.
template <bool BF16, bool TRANS, class Map>
__device__ __forceinline__ void gemm_mainloop(float (&acc)[2][kNF][4], const uint16_t* __restrict__ W, int64_t ld,
                                              int k_begin, int K, const Map& map, const uint16_t* const* s_brow,
                                              uint16_t* sA, uint16_t* sB, int nf_active) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int ktiles = K > k_begin ? (K - k_begin + kBK - 1) / kBK : 0;

  auto load_stage = [&](int slot, int kt) {
    const int k0 = k_begin + kt * kBK;
    uint16_t* a = sA + slot * a_stage_elems<TRANS>();
    uint16_t* b = sB + slot * kBStageElems;
    if constexpr (!TRANS) {
      for (int c = tid; c < kBM * (kBK / 8); c += kThreads) {
        const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
        const int kg = k0 + kc;
        const bool ok = map.valid(r) && kg < K;
        cp_async16(a + r * kPadK + kc, ok ? W + (int64_t)map.j(r) * ld + kg : W, ok);
      }
    } else {
      for (int c = tid; c < kBK * (kBM / 8); c += kThreads) {
        const int kr = c / (kBM / 8), rc = (c % (kBM / 8)) * 8;
        const int kg = k0 + kr;
        const bool ok = map.valid(rc) && kg < K;
        cp_async16(a + kr * kPadM + rc, ok ? W + (int64_t)kg * ld + map.j(rc) : W, ok);
      }
    }
    for (int c = tid; c < kBN * (kBK / 8); c += kThreads) {
      const int n = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
      const int kg = k0 + kc;
      const uint16_t* row = s_brow[n];
      const bool ok = row != nullptr && kg < K;
      cp_async16(b + n * kPadK + kc, ok ? row + kg : W, ok);
    }
  };

  // Fragment rows of this thread do not change over K.
  int arow[2][2];
#pragma unroll
  for (int mf = 0; mf < 2; ++mf) {
    arow[mf][0] = map.frag_row(warp, mf, g);
    arow[mf][1] = map.frag_row(warp, mf, g + 8);
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for everyone; stage kt-1 is no longer read by anyone
    perf_event(kPerfStage, nf_active, 0);
    if (kt + kStages - 1 < ktiles) load_stage((kt + kStages - 1) % kStages, kt + kStages - 1);
    cp_async_commit();

    const uint16_t* a = sA + (kt % kStages) * a_stage_elems<TRANS>();
    const uint16_t* b = sB + (kt % kStages) * kBStageElems;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      const int c = kk + tig * 2;
      uint32_t af[2][4];
#pragma unroll
      for (int mf = 0; mf < 2; ++mf) {
        const int r0 = arow[mf][0], r1 = arow[mf][1];
        if constexpr (!TRANS) {
          af[mf][0] = ld_u32(a + r0 * kPadK + c);
          af[mf][1] = ld_u32(a + r1 * kPadK + c);
          af[mf][2] = ld_u32(a + r0 * kPadK + c + 8);
          af[mf][3] = ld_u32(a + r1 * kPadK + c + 8);
        } else {
          af[mf][0] = pack2(a[c * kPadM + r0], a[(c + 1) * kPadM + r0]);
          af[mf][1] = pack2(a[c * kPadM + r1], a[(c + 1) * kPadM + r1]);
          af[mf][2] = pack2(a[(c + 8) * kPadM + r0], a[(c + 9) * kPadM + r0]);
          af[mf][3] = pack2(a[(c + 8) * kPadM + r1], a[(c + 9) * kPadM + r1]);
        }
      }
#pragma unroll
      for (int nf = 0; nf < kNF; ++nf) {
        if (nf < nf_active) {  // warp-uniform: skip token fragments beyond this expert's tokens
          const uint16_t* bp = b + (nf * 8 + g) * kPadK + c;
          const uint32_t b0 = ld_u32(bp), b1 = ld_u32(bp + 8);
          mma16816<BF16>(acc[0][nf], af[0], b0, b1);
          mma16816<BF16>(acc[1][nf], af[1], b0, b1);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // smem may be refilled by the caller's next pass
}

__device__ __forceinline__ void zero_acc(float (&acc)[2][kNF][4]) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < kNF; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
}

__device__ __forceinline__ float gated_activation(float gate, float up, int activation, float alpha, float limit) {
  if (activation == kClampedSwiglu) {
    gate = fminf(gate, limit);
    up = fminf(fmaxf(up, -limit), limit);
    return gate * (1.f / (1.f + expf(-gate * alpha))) * (up + 1.f);
  }
  return gate / (1.f + expf(-gate)) * up;
}

// ------------------------------------------------------------------------------- kernels

// grid = (ceil(I / 64), max active experts, ksplit1); block = 128 threads; dynamic smem = smem_bytes<TRANS>().
template <bool BF16, bool TRANS>
__global__ void __launch_bounds__(kThreads) gemm1_swiglu_kernel(const ExpertsParams p) {
  const int u = blockIdx.y;
  if (u >= p.meta[3]) return;  // kMetaActive
  uint16_t* smem = dynamic_smem<uint16_t>();
  __shared__ const uint16_t* s_brow[kBN];
  uint16_t* sA = smem;
  uint16_t* sB = smem + kStages * a_stage_elems<TRANS>();

  const int e = p.act_experts[u];
  const int p0 = p.act_offsets[u], cnt = p.act_offsets[u + 1] - p0;
  const int H = p.H, I = p.I;
  const GateUpMap map{static_cast<int>(blockIdx.x) * kGateUpTile, I, p.order};
  const uint16_t* W = p.w_gu + (int64_t)e * 2 * I * H;
  const int64_t ld = TRANS ? 2 * (int64_t)I : H;
  const bool split = p.ksplit1 > 1;
  const int z = blockIdx.z;
  const int k_begin = z * p.kchunk1;
  const int k_end = min(H, k_begin + p.kchunk1);
  const int64_t part = (int64_t)z * p.T * p.k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;

  for (int nb = 0; nb < cnt; nb += kBN) {
    const int nrows = min(kBN, cnt - nb);
    for (int n = threadIdx.x; n < kBN; n += kThreads)
      s_brow[n] = n < nrows ? p.x + (int64_t)p.pair_token[p0 + nb + n] * p.x_stride : nullptr;
    __syncthreads();
    float acc[2][kNF][4];
    zero_acc(acc);
    const int nf_active = (nrows + 7) / 8;
    gemm_mainloop<BF16, TRANS>(acc, W, ld, k_begin, k_end, map, s_brow, sA, sB, nf_active);

    // Epilogue: gate (fragment 0) and up (fragment 1) of the same (i, n) sit in the same register.
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int i = map.i0 + warp * 16 + g + 8 * h2;
      if (i >= I) continue;
      if (split) {  // raw partial sums; swiglu_kernel finishes
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int n = nf * 8 + tig * 2 + q;
            if (n < nrows) {
              float2* dst = reinterpret_cast<float2*>(p.gubuf) + (part + p0 + nb + n) * I + i;
              *dst = make_float2(acc[0][nf][h2 * 2 + q], acc[1][nf][h2 * 2 + q]);
              perf_event(kPerfBytes, 8);
            }
          }
        }
        continue;
      }
      float bg = 0.f, bu = 0.f;
      if (p.b_gu != nullptr) {
        const float* bias = p.b_gu + (int64_t)e * 2 * I;
        const int jg = p.order == kInterleaved ? 2 * i : (p.order == kGateUp ? i : I + i);
        const int ju = p.order == kInterleaved ? 2 * i + 1 : (p.order == kGateUp ? I + i : i);
        bg = bias[jg];
        bu = bias[ju];
      }
#pragma unroll
      for (int nf = 0; nf < kNF; ++nf) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = nf * 8 + tig * 2 + q;
          if (n < nrows) {
            const float v = gated_activation(acc[0][nf][h2 * 2 + q] + bg, acc[1][nf][h2 * 2 + q] + bu,
                                             p.activation, p.alpha, p.limit);
            p.hbuf[(int64_t)(p0 + nb + n) * I + i] = float_to_bits<BF16>(v);
            perf_event(kPerfBytes, 2);
          }
        }
      }
    }
  }
}

// Finishes a split GEMM1: sums the (gate, up) partials in z order, adds biases, applies the
// activation and rounds to the activation dtype. grid = (ceil(I / 128), max active experts).
template <bool BF16>
__global__ void __launch_bounds__(128) swiglu_kernel(const ExpertsParams p) {
  const int u = blockIdx.y;
  if (u >= p.meta[3]) return;  // kMetaActive
  const int e = p.act_experts[u];
  const int p0 = p.act_offsets[u], p1 = p.act_offsets[u + 1];
  const int I = p.I;
  const int i = blockIdx.x * 128 + threadIdx.x;
  if (i >= I) return;
  float bg = 0.f, bu = 0.f;
  if (p.b_gu != nullptr) {
    const float* bias = p.b_gu + (int64_t)e * 2 * I;
    bg = bias[p.order == kInterleaved ? 2 * i : (p.order == kGateUp ? i : I + i)];
    bu = bias[p.order == kInterleaved ? 2 * i + 1 : (p.order == kGateUp ? I + i : i)];
  }
  const int64_t pairs = (int64_t)p.T * p.k;
  const float2* gu = reinterpret_cast<const float2*>(p.gubuf);
  for (int pp = p0; pp < p1; ++pp) {
    float gate = 0.f, up = 0.f;
    perf_event(kPerfRoundTrips, p.ksplit1);  // each load is consumed before the next issues
    perf_event(kPerfBytes, 8 * p.ksplit1 + 2);
    for (int z = 0; z < p.ksplit1; ++z) {
      const float2 v = gu[(z * pairs + pp) * I + i];
      gate += v.x;
      up += v.y;
    }
    p.hbuf[(int64_t)pp * I + i] = float_to_bits<BF16>(gated_activation(gate + bg, up + bu, p.activation, p.alpha, p.limit));
  }
}

// grid = (ceil(H / 128), max active experts, ksplit); block = 128 threads; dynamic smem = smem_bytes<TRANS>().
// Two CTAs per SM is what the shared memory allows anyway; saying so lets ptxas use the registers
// it needs (without it, sm_80 spilled 8 bytes at 168 registers: docs/kernel-resources.md).
template <bool BF16, bool TRANS>
__global__ void __launch_bounds__(kThreads, 2) gemm2_combine_kernel(const ExpertsParams p) {
  const int u = blockIdx.y;
  if (u >= p.meta[3]) return;  // kMetaActive
  uint16_t* smem = dynamic_smem<uint16_t>();
  __shared__ const uint16_t* s_brow[kBN];
  uint16_t* sA = smem;
  uint16_t* sB = smem + kStages * a_stage_elems<TRANS>();

  const int e = p.act_experts[u];
  const int p0 = p.act_offsets[u], cnt = p.act_offsets[u + 1] - p0;
  const int H = p.H, I = p.I;
  const DownMap map{static_cast<int>(blockIdx.x) * kBM, H};
  const uint16_t* W = p.w_down + (int64_t)e * H * I;
  const int64_t ld = TRANS ? (int64_t)H : I;
  const int z = blockIdx.z;
  const int k_begin = z * p.kchunk;
  const int k_end = min(I, k_begin + p.kchunk);
  const int64_t part = (int64_t)z * p.T * p.k;  // first row of this split's partials (deterministic mode)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;

  for (int nb = 0; nb < cnt; nb += kBN) {
    const int nrows = min(kBN, cnt - nb);
    for (int n = threadIdx.x; n < kBN; n += kThreads)
      s_brow[n] = n < nrows ? p.hbuf + (int64_t)(p0 + nb + n) * I : nullptr;
    __syncthreads();
    float acc[2][kNF][4];
    zero_acc(acc);
    const int nf_active = (nrows + 7) / 8;
    gemm_mainloop<BF16, TRANS>(acc, W, ld, k_begin, k_end, map, s_brow, sA, sB, nf_active);

#pragma unroll
    for (int mf = 0; mf < 2; ++mf) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int h = map.h0 + warp * 32 + mf * 16 + g + 8 * h2;
        if (h >= H) continue;
        const float bias = (p.b_down != nullptr && z == 0) ? p.b_down[(int64_t)e * H + h] : 0.f;
#pragma unroll
        for (int nf = 0; nf < kNF; ++nf) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int n = nf * 8 + tig * 2 + q;
            if (n < nrows) {
              const int pp = p0 + nb + n;
              const int t = p.pair_token[pp], s = p.pair_slot[pp];
              const int64_t flat = (int64_t)t * p.k + s;
              const float c = (acc[mf][nf][h2 * 2 + q] + bias) * p.weights[flat];
              if (p.atomic)
                atomicAdd(p.ybuf + (int64_t)t * H + h, c);
              else
                p.ybuf[(part + flat) * H + h] = c;
              perf_event(kPerfBytes, 4);
            }
          }
        }
      }
    }
  }
}

// out[t, h] = sum over active slots, in slot order, of the weighted pair outputs (deterministic),
// or the converted atomic accumulator. Every output element is written.
template <bool BF16>
__global__ void combine_kernel(const ExpertsParams p) {
  const int64_t total = (int64_t)p.T * p.H;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = idx / p.H, h = idx % p.H;
    float acc = 0.f;
    if (p.atomic) {
      acc = p.ybuf[idx];
      perf_event(kPerfRoundTrips, 1);
      perf_event(kPerfBytes, 4 + 2);
    } else {
      const int64_t pairs = (int64_t)p.T * p.k;
      for (int s = 0; s < p.k; ++s) {
        const int64_t flat = t * p.k + s;
        if (p.pair_position[flat] < 0) continue;
        float c = 0.f;  // this slot's output: its K-split partials in fixed order
        for (int z = 0; z < p.ksplit; ++z) c += p.ybuf[(z * pairs + flat) * p.H + h];
        acc += c;
        perf_event(kPerfRoundTrips, p.ksplit);  // not unrolled (run-time trip count): one load at a time
        perf_event(kPerfBytes, 4 * p.ksplit);
      }
    }
    p.out[idx] = float_to_bits<BF16>(acc);
    if (!p.atomic) perf_event(kPerfBytes, 2 + p.k * 4);  // the output and the slots' positions
  }
}

}  // namespace experts
}  // namespace moespec
