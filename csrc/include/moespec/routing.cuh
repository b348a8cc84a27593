// The routing plan: one single-CTA launch per layer that turns router logits (or given top-k
// ids/weights) into everything the expert kernels need (docs/design.md §3):
//   softmax top-k -> union -> scores -> top-C kept set (ties to the lower id) -> re-routing
//   (substitute / truncate, coverage) -> per-expert CSR lists of the active (token, slot) pairs.
// All outputs are sized for the worst case and all counts stay on the device (meta[]), so the
// launch needs no host synchronisation and can be captured in a CUDA graph. Every reduction has
// a fixed order, so the plan is deterministic. Out-of-range ids (possible only when ops.py
// skipped its range check during graph capture) are treated as absent, never dereferenced.
//
// Rows without a valid softmax (any NaN, any +inf, or all -inf logits: torch.softmax gives NaN for
// the whole row) are "invalid" rows (row_sum is NaN). moespec.reference has no defined routing for
// them (NaN weights; ids are whatever torch.topk returns for NaN, which is implementation order),
// so the plan treats them like padding tokens: they count neither towards the union nor the scores,
// get weight 0, and take the k lowest ids of the kept set (the union when nothing is dropped), so they
// never widen the set of experts read (0..k-1 only when fewer than k experts are kept, e.g. no valid
// row at all). Rows with some -inf logits but at least one finite one are valid (probability 0).
#pragma once

#include <climits>
#include <cmath>

#include "moespec/common.cuh"

namespace moespec {
namespace routing {

constexpr int kThreads = 512;  // 16 warps: tokens and experts spread over more lanes
constexpr int kWarps = kThreads / 32;
constexpr int kMaxE = 1024;  // experts per layer handled by the single-CTA plan
constexpr int kMaxK = 8;     // top-k handled by the per-lane candidate lists
static_assert(kMaxE % kThreads == 0, "block scan assumes kMaxE is a multiple of the block size");

enum ScoreMode : int { kScoreNone = 0, kScoreProb = 1, kScoreTopk = 2 };
enum Policy : int { kSubstitute = 0, kTruncate = 1 };
enum CsrMode : int { kCsrNone = 0, kCsrAll = 1, kCsrActive = 2 };

// Indices of PlanParams::meta (device-side counts).
enum Meta : int {
  kMetaUnion = 0,        // U: distinct experts in the (unbudgeted) routing
  kMetaKept = 1,         // C': kept experts (== U when not budgeted)
  kMetaBudgeted = 2,     // 1 when the budget removed at least one expert
  kMetaActive = 3,       // experts with at least one CSR pair
  kMetaPairs = 4,        // CSR pairs
  kMetaSize = 8,
};

struct PlanParams {
  // ---- inputs
  const void* logits;  // [T, E] row stride logits_stride, or nullptr
  int logits_dtype;
  int64_t logits_stride;
  const void* in_ids;  // [T, k] given routing (route == 0), or nullptr
  int in_ids_type;
  const void* in_weights;  // [T, k] or nullptr (weights 1)
  int in_weights_dtype;
  const void* in_kept;  // [n_in_kept] allowed experts (route == 0), or nullptr (all allowed)
  int in_kept_type;
  int n_in_kept;
  int T, E, k;
  int route;        // 1: softmax top-k from logits; 0: use in_ids / in_weights
  int renormalize;  // divide the k weights by their sum
  int score_mode;   // ScoreMode
  int budget;       // -1: none
  float coverage;   // <= 0: none
  int min_budget;   // lower clamp for coverage
  int all_candidates;  // 1: the kept set is chosen among all E experts; 0: among the union
  int policy;       // Policy
  int csr_mode;     // CsrMode
  // ---- outputs (device, worst-case sized)
  int* ids;            // [T*k] final expert ids (-1: out of range)
  float* weights;      // [T*k] final fp32 weights
  float* row_max;      // [T] softmax statistics, for recomputing probabilities
  float* row_sum;      // [T]
  float* scores;       // [E]
  int* meta;           // [kMetaSize]
  int* union_experts;  // [E] sorted union
  int* kept_experts;   // [E] sorted kept set
  int* act_experts;    // [E] experts with CSR pairs, ascending
  int* act_offsets;    // [E+1]
  int* pair_token;     // [T*k]
  int* pair_slot;      // [T*k]
  int* pair_position;  // [T*k] CSR position of pair (t, s), -1 when inactive
};

// Total order used for every selection: higher value first, ties to the lower id.
__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Top-k over e in [0, E) of value(e), by `better`. Lane 0 writes ids/values in rank order.
// Each lane keeps a sorted candidate list of its strided subset, then k warp-argmax rounds
// merge the list heads.
template <class ValueFn>
__device__ __forceinline__ void warp_topk(int E, int k, ValueFn value, int* out_ids, float* out_vals) {
  const int lane = threadIdx.x & 31;
  float vals[kMaxK];
  int ids[kMaxK];
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) {
    vals[j] = -INFINITY;
    ids[j] = INT_MAX;
  }
  for (int e = lane; e < E; e += 32) {
    float cv = value(e);
    int ci = e;
#pragma unroll
    for (int j = 0; j < kMaxK; ++j) {  // insertion by carrying the smaller element downwards
      if (better(cv, ci, vals[j], ids[j])) {
        const float tv = vals[j];
        const int ti = ids[j];
        vals[j] = cv;
        ids[j] = ci;
        cv = tv;
        ci = ti;
      }
    }
  }
  for (int r = 0; r < k; ++r) {
    float bv = vals[0];
    int bi = ids[0];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, bv, off);
      const int oi = __shfl_xor_sync(kFullMask, bi, off);
      if (better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (ids[0] == bi) {  // the owner pops its head (ids are unique across lanes)
#pragma unroll
      for (int j = 0; j + 1 < kMaxK; ++j) {
        vals[j] = vals[j + 1];
        ids[j] = ids[j + 1];
      }
      vals[kMaxK - 1] = -INFINITY;
      ids[kMaxK - 1] = INT_MAX;
    }
    if (lane == 0) {  // NaN values never enter the lists: a NaN row yields -1 ids, never out-of-range ones
      const bool real = bi >= 0 && bi < E;
      out_ids[r] = real ? bi : -1;
      out_vals[r] = real ? bv : 0.f;
    }
  }
  __syncwarp();
}

// Exclusive prefix sum of in[0:n) into out[0:n) (may alias); returns the total to all threads.
// Contains __syncthreads: call from all threads of the block.
__device__ __forceinline__ int block_exclusive_scan(const int* in, int* out, int n, int* s_warp) {
  constexpr int kPer = kMaxE / kThreads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int base = threadIdx.x * kPer;
  int v[kPer];
  int local = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    v[j] = (base + j < n) ? in[base + j] : 0;
    local += v[j];
  }
  int incl = local;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int x = s_warp[w];
      s_warp[w] = acc;
      acc += x;
    }
    s_warp[kWarps] = acc;
  }
  __syncthreads();
  int run = s_warp[warp] + incl - local;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    if (base + j < n) out[base + j] = run;
    run += v[j];
  }
  const int total = s_warp[kWarps];
  __syncthreads();
  return total;
}

__device__ __forceinline__ float softmax_prob(float z, float m, float s) { return expf(z - m) / s; }

// Softmax statistics of one row, warp-wide: the max and the sum of exp(z - max) (the same value in
// every lane: butterfly sums may differ in the last bit between lanes).
__device__ __forceinline__ void row_stats(const PlanParams& p, int64_t row, int lane, float& m, float& s) {
  m = -INFINITY;
  for (int e = lane; e < p.E; e += 32) m = fmaxf(m, load_float(p.logits, p.logits_dtype, row + e));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, off));
  s = 0.f;
  for (int e = lane; e < p.E; e += 32) s += expf(load_float(p.logits, p.logits_dtype, row + e) - m);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
  s = __shfl_sync(kFullMask, s, 0);
}

// Phase A for token t, one warp: softmax statistics, then the top-k (weights renormalised if asked)
// or the given routing. Shared by both plan generations, so their bits are the same.
__device__ __forceinline__ void token_routing(const PlanParams& p, int t, int lane) {
  const int k = p.k;
  if (p.logits != nullptr) {
    const int64_t row = (int64_t)t * p.logits_stride;
    float m, s;
    row_stats(p, row, lane, m, s);
    if (lane == 0) {
      p.row_max[t] = m;
      p.row_sum[t] = s;
    }
    if (p.route && isnan(s)) {  // invalid row (s is warp-uniform): placeholder until phase D
      for (int r = lane; r < k; r += 32) {
        p.ids[(int64_t)t * k + r] = -1;
        p.weights[(int64_t)t * k + r] = 0.f;
      }
    } else if (p.route) {
      warp_topk(
          p.E, k, [&](int e) { return softmax_prob(load_float(p.logits, p.logits_dtype, row + e), m, s); },
          p.ids + (int64_t)t * k, p.weights + (int64_t)t * k);
      if (lane == 0 && p.renormalize) {
        float sum = 0.f;
        for (int r = 0; r < k; ++r) sum += p.weights[(int64_t)t * k + r];
        if (sum > 0.f)
          for (int r = 0; r < k; ++r) p.weights[(int64_t)t * k + r] /= sum;
      }
    }
  }
  if (!p.route && p.in_ids != nullptr) {
    for (int r = lane; r < k; r += 32) {
      const int64_t i = (int64_t)t * k + r;
      const int64_t id = load_index(p.in_ids, p.in_ids_type, i);
      p.ids[i] = (id >= 0 && id < p.E) ? (int)id : -1;
      p.weights[i] = p.in_weights != nullptr ? load_float(p.in_weights, p.in_weights_dtype, i) : 1.f;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) routing_plan_kernel(const PlanParams p) {
  __shared__ int s_present[kMaxE];
  __shared__ int s_keep[kMaxE];
  __shared__ int s_cnt[kMaxE];
  __shared__ int s_offs[kMaxE];
  __shared__ int s_tmp[kMaxE];
  __shared__ float s_score[kMaxE];
  __shared__ int s_union[kMaxE];  // the union in ascending id order (prefix U)
  __shared__ int s_warp[kWarps + 1];
  __shared__ int s_flags[4];  // 0: kept count, 1: budgeted

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T = p.T, E = p.E, k = p.k, P = p.T * p.k;

  // ---- phase A: per token (one warp each): softmax statistics, top-k or given routing
  for (int t = warp; t < T; t += kWarps) token_routing(p, t, lane);
  for (int e = tid; e < E; e += kThreads) {
    s_present[e] = 0;
    s_keep[e] = 0;
  }
  __syncthreads();
  const bool have_ids = p.route || p.in_ids != nullptr;

  // ---- phase B: union flags and scores
  if (have_ids) {
    for (int i = tid; i < P; i += kThreads) {
      const int id = p.ids[i];
      if (id >= 0) s_present[id] = 1;  // benign race: every writer stores 1
    }
  }
  if (!p.route && p.in_kept != nullptr) {
    for (int i = tid; i < p.n_in_kept; i += kThreads) {
      const int64_t id = load_index(p.in_kept, p.in_kept_type, i);
      if (id >= 0 && id < E) s_keep[id] = 1;
    }
  }
  for (int e = tid; e < E; e += kThreads) {
    float sc = 0.f;
    if (p.score_mode == kScoreProb) {
      for (int t = 0; t < T; ++t) {
        const float s = p.row_sum[t];
        if (p.route && isnan(s)) continue;  // invalid rows do not score (score_experts alone keeps the NaN)
        sc += softmax_prob(load_float(p.logits, p.logits_dtype, (int64_t)t * p.logits_stride + e), p.row_max[t], s);
      }
    } else if (p.score_mode == kScoreTopk) {
      for (int i = 0; i < P; ++i)  // pair order, like index_add_ on the CPU
        if (p.ids[i] == e) sc += p.weights[i];
    }
    // NaN (from NaN logits) would break the total order the ranking relies on: rank it last.
    s_score[e] = isnan(sc) ? -INFINITY : sc;
    if (p.score_mode != kScoreNone) p.scores[e] = sc;
  }
  __syncthreads();
  const int U = block_exclusive_scan(s_present, s_tmp, E, s_warp);
  for (int e = tid; e < E; e += kThreads)
    if (s_present[e]) {
      p.union_experts[s_tmp[e]] = e;
      s_union[s_tmp[e]] = e;
    }
  __syncthreads();  // s_union complete before the ranking reads it

  // ---- phase C: kept set
  const bool want_budget = p.route && (p.budget >= 0 || p.coverage > 0.f);
  if (p.route || p.in_kept == nullptr) {
    for (int e = tid; e < E; e += kThreads) s_keep[e] = s_present[e];
  }
  if (want_budget) {
    // Candidates: every expert (MoE-Spec's rule) or the union; cand(j) is the j-th in ascending id.
    const bool all_cand = p.all_candidates != 0;
    const int NC = all_cand ? E : U;
    auto cand = [&](int j) { return all_cand ? j : s_union[j]; };
    // Rank of each candidate by (score desc, id asc); s_offs is the sorted list.
    for (int j = tid; j < NC; j += kThreads) {
      const int e = cand(j);
      const float v = s_score[e];
      int r = 0;
      for (int j2 = 0; j2 < NC; ++j2) {
        const int e2 = cand(j2);
        r += better(s_score[e2], e2, v, e) ? 1 : 0;
      }
      s_cnt[e] = r;
      s_offs[r] = e;
    }
    __syncthreads();
    if (tid == 0) {
      const int upper = p.budget >= 0 ? p.budget : NC;
      int C = upper;
      if (p.coverage > 0.f) {
        // Exactly reference._kept_count on the CPU: torch.cumsum of fp32 accumulates in double in
        // sequential order and rounds every prefix to fp32; target = fp32(coverage) * fp32 total in
        // fp32; a prefix counts while its mass is strictly below the target. The prefixes replace
        // the scores in place (s_score is not read after the ranking above).
        double acc = 0.0;
        for (int r = 0; r < NC; ++r) {
          const int e = s_offs[r];
          acc += (double)s_score[e];
          s_score[e] = (float)acc;
        }
        const float target = p.coverage * (float)acc;
        int below = 0;  // number of prefixes whose mass is below the target
        for (int r = 0; r < NC; ++r) below += s_score[s_offs[r]] < target ? 1 : 0;
        int n = below + 1;
        n = n < NC ? n : NC;
        C = n < upper ? n : upper;
        C = C > p.min_budget ? C : p.min_budget;
        if (NC == 0) C = p.min_budget;
      }
      s_flags[0] = C;
      // A budget is a cap: routing changes only when the union does not fit.
      s_flags[1] = U > C ? 1 : 0;
    }
    __syncthreads();
    const int C = s_flags[0];
    if (U > C) {
      for (int e = tid; e < E; e += kThreads) s_keep[e] = (all_cand || s_present[e]) && s_cnt[e] < C;
    }
  } else if (tid == 0) {
    s_flags[1] = 0;
  }
  __syncthreads();
  const int kept_count = block_exclusive_scan(s_keep, s_tmp, E, s_warp);
  for (int e = tid; e < E; e += kThreads)
    if (s_keep[e]) p.kept_experts[s_tmp[e]] = e;
  const bool budgeted = s_flags[1] != 0;
  if (tid == 0) {
    p.meta[kMetaUnion] = U;
    p.meta[kMetaKept] = kept_count;
    p.meta[kMetaBudgeted] = budgeted ? 1 : 0;
  }

  __syncthreads();  // kept_experts complete: invalid rows read its head

  // ---- phase D: re-route tokens under the kept set (original full-softmax probabilities)
  if (p.route) {
    for (int t = warp; t < T; t += kWarps) {
      const int64_t row = (int64_t)t * p.logits_stride;
      const float m = p.row_max[t], s = p.row_sum[t];
      int* ids = p.ids + (int64_t)t * k;
      float* w = p.weights + (int64_t)t * k;
      if (isnan(s)) {  // invalid row (warp-uniform): the k lowest kept ids, weight 0
        for (int r = lane; r < k; r += 32) {
          ids[r] = kept_count >= k ? p.kept_experts[r] : r;
          w[r] = 0.f;
        }
        __syncwarp();
        continue;
      }
      if (!budgeted) continue;
      if (p.policy == kSubstitute) {
        // A token whose top-k experts are all kept keeps them (same order): skip its masked top-k.
        bool kept_all = true;
        for (int r = lane; r < k; r += 32) kept_all = kept_all && ids[r] >= 0 && s_keep[ids[r]];
        if (!__all_sync(kFullMask, kept_all))
          warp_topk(
            E, k,
            [&](int e) {
              return s_keep[e] ? softmax_prob(load_float(p.logits, p.logits_dtype, row + e), m, s) : -INFINITY;
            },
            ids, w);
        if (lane == 0) {  // weights are the probabilities themselves (also for a masked pick)
          for (int r = 0; r < k; ++r)
            w[r] = ids[r] >= 0 ? softmax_prob(load_float(p.logits, p.logits_dtype, row + ids[r]), m, s) : 0.f;
        }
      } else if (lane == 0) {
        for (int r = 0; r < k; ++r) {
          const int id = ids[r];
          w[r] = (id >= 0 && s_keep[id]) ? softmax_prob(load_float(p.logits, p.logits_dtype, row + id), m, s) : 0.f;
        }
      }
      if (lane == 0 && p.renormalize) {
        float sum = 0.f;
        for (int r = 0; r < k; ++r) sum += w[r];
        if (sum > 0.f)
          for (int r = 0; r < k; ++r) w[r] /= sum;
      }
      __syncwarp();
    }
  }
  if (p.csr_mode == kCsrNone || !have_ids) return;
  __syncthreads();

  // ---- phase E: CSR of the active pairs, grouped by expert, then token, then slot
  const bool all = p.csr_mode == kCsrAll;
  auto active = [&](int i, int id) { return id >= 0 && (all || (s_keep[id] && p.weights[i] != 0.f)); };
  for (int e = tid; e < E; e += kThreads) s_cnt[e] = 0;
  for (int i = tid; i < P; i += kThreads) p.pair_position[i] = -1;
  __syncthreads();
  for (int i = tid; i < P; i += kThreads) {
    const int id = p.ids[i];
    if (active(i, id)) atomicAdd(&s_cnt[id], 1);  // a count: order-independent
  }
  __syncthreads();
  const int pairs = block_exclusive_scan(s_cnt, s_offs, E, s_warp);
  for (int e = tid; e < E; e += kThreads) s_tmp[e] = s_cnt[e] > 0 ? 1 : 0;
  __syncthreads();
  const int A = block_exclusive_scan(s_tmp, s_tmp, E, s_warp);
  for (int e = tid; e < E; e += kThreads) {
    if (s_cnt[e] > 0) {
      p.act_experts[s_tmp[e]] = e;
      p.act_offsets[s_tmp[e]] = s_offs[e];
    }
  }
  if (tid == 0) {
    p.act_offsets[A] = pairs;
    p.meta[kMetaActive] = A;
    p.meta[kMetaPairs] = pairs;
  }
  // One warp per expert walks the tokens 32 at a time; a warp scan orders the pairs.
  for (int e = warp; e < E; e += kWarps) {
    if (s_cnt[e] == 0) continue;
    int run = s_offs[e];
    for (int t0 = 0; t0 < T; t0 += 32) {
      const int t = t0 + lane;
      int c = 0;
      if (t < T)
        for (int r = 0; r < k; ++r) {
          const int64_t i = (int64_t)t * k + r;
          const int id = p.ids[i];
          c += (id == e && active((int)i, id)) ? 1 : 0;
        }
      int incl = c;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(kFullMask, incl, off);
        if (lane >= off) incl += y;
      }
      int pos = run + incl - c;
      if (c > 0)
        for (int r = 0; r < k; ++r) {
          const int64_t i = (int64_t)t * k + r;
          const int id = p.ids[i];
          if (id == e && active((int)i, id)) {
            p.pair_token[pos] = t;
            p.pair_slot[pos] = r;
            p.pair_position[i] = pos;
            ++pos;
          }
        }
      run += __shfl_sync(kFullMask, incl, 31);
    }
  }
}

}  // namespace routing
}  // namespace moespec
