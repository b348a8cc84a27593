// The routing plan, generation 2 (docs/kernels-v2.md, "Routing plan v2"): the same outputs as the
// single-CTA plan of routing.cuh, bit for bit, from a multi-CTA launch.
//
//  * Token phase, every CTA: kTokensPerCta tokens, a pair of warps per token. The first warp does
//    what v1's phase A does (softmax statistics, top-k or the given routing, renormalisation); the
//    second recomputes the same statistics (same code, same bits) and writes the token's score
//    contributions into a dense fp32 workspace contrib[T, E] (its softmax row in mode prob; zeros
//    and then its k weights in mode topk; zeros for rows that do not score). v1 sums an expert's
//    score over tokens in token order (prob) or over pairs in pair order (topk, which is token
//    order when a token's ids are distinct), so a column sum of contrib in token order reproduces
//    v1's bits: x + 0.0f == x. Given routings with a repeated id in a token flag it, and the tail
//    then sums in pair order like v1.
//  * Tail, the last CTA to arrive (ticket counter after __threadfence, the threadFenceReduction
//    pattern; the tail resets the counter and the flag, so a CUDA-graph replay starts clean):
//    union, scores (column sums), kept set (ranking spread over up to 32 threads per candidate,
//    coverage), L2 prefetch of the kept experts' first weight tiles (highest score first),
//    re-routing (lane-parallel: a rank among the <= 32 kept experts instead of a masked top-k over
//    E), CSR (pair experts staged in shared memory). Every order is v1's, so every output is too.
//  * Every CTA calls griddep_launch_dependents() once its token work is written: a PDL-launched
//    expert kernel can then start (and wait in griddep_wait) while the tail still runs.
#pragma once

#include "moespec/routing.cuh"

namespace moespec {
namespace routing_v2 {

using namespace routing;

constexpr int kTokensPerCta = kWarps / 2;  // a pair of warps per token
constexpr int kPairCap = 2048;             // CSR pairs whose expert ids are staged in shared memory
constexpr uint32_t kPrefetchChunk = 4096;  // bytes per prefetch instruction (spreads ranges over threads)
constexpr int kPrefetchRanges = 2;

// One weight range per kept expert e: [base + e * expert_stride, ... + bytes). base == nullptr: unused.
struct PrefetchRange {
  const char* base;
  int64_t expert_stride;
  uint32_t bytes;  // multiple of 16, like base and expert_stride
};

struct PlanV2Params {
  PlanParams p;
  float* contrib;  // [T, E] fp32 score contributions (needed when p.score_mode != kScoreNone)
  int* sync;       // [4] zeroed once at allocation: [0] arrival ticket, [1] repeated-id flag; the tail resets both
  PrefetchRange pf[kPrefetchRanges];
  int pf_experts;  // prefetch the first tiles of at most this many kept experts (0: none)
};

__global__ void __launch_bounds__(kThreads, 1) routing_plan_v2_kernel(const PlanV2Params q) {
  const PlanParams& p = q.p;
  __shared__ int s_present[kMaxE];
  __shared__ int s_keep[kMaxE];
  __shared__ int s_cnt[kMaxE];
  __shared__ int s_offs[kMaxE];
  __shared__ int s_tmp[kMaxE];
  __shared__ float s_score[kMaxE];
  __shared__ int s_union[kMaxE];
  __shared__ float s_sorted[kMaxE];  // coverage: scores in rank order, then their prefix sums
  __shared__ int s_pid[kPairCap];    // CSR: expert of each active pair, -1 when inactive
  __shared__ int s_rank_id[kWarps][kMaxK];
  __shared__ float s_rank_val[kWarps][kMaxK];
  __shared__ int s_warp[kWarps + 1];
  __shared__ int s_flags[4];  // 0: kept count, 1: budgeted, 2: coverage prefixes below the target
  __shared__ float s_target;
  __shared__ int s_last, s_dup;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T = p.T, E = p.E, k = p.k, P = p.T * p.k;

  // ---- token phase
  {
    const int t = blockIdx.x * kTokensPerCta + warp % kTokensPerCta;
    const bool second = warp >= kTokensPerCta;
    if (t < T && !second) {  // v1's phase A for token t (the same function)
      token_routing(p, t, lane);
    } else if (t < T && p.score_mode == kScoreProb) {
      const int64_t row = (int64_t)t * p.logits_stride;
      float m, s;
      row_stats(p, row, lane, m, s);
      const bool skip = p.route && isnan(s);  // v1: invalid rows do not score (score_experts alone keeps the NaN)
      float* c = q.contrib + (int64_t)t * E;
      for (int e = lane; e < E; e += 32)
        c[e] = skip ? 0.f : softmax_prob(load_float(p.logits, p.logits_dtype, row + e), m, s);
    } else if (t < T && p.score_mode == kScoreTopk) {
      float* c = q.contrib + (int64_t)t * E;
      for (int e = lane; e < E; e += 32) c[e] = 0.f;
    }
    __syncthreads();  // zero rows written, ids final, before the top-k weights land on the rows
    if (t < T && !second && p.score_mode == kScoreTopk) {
      const int id = lane < k ? p.ids[(int64_t)t * k + lane] : -1;
      bool dup = false;
      for (int r = 0; r < k; ++r) {
        const int o = __shfl_sync(kFullMask, id, r);
        dup = dup || (r < lane && id >= 0 && o == id);
      }
      if (id >= 0) q.contrib[(int64_t)t * E + id] = p.weights[(int64_t)t * k + lane];
      if (__any_sync(kFullMask, dup) && lane == 0) atomicAdd(q.sync + 1, 1);  // the tail sums in pair order
    }
  }
  // A PDL successor may launch now; its griddep_wait still waits for this whole grid.
  griddep_launch_dependents();
  if (gridDim.x > 1) {  // one CTA (T <= kTokensPerCta) is its own tail: no fence, no ticket
    __threadfence();    // this CTA's outputs are visible device-wide before its arrival counts
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(q.sync, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // the other CTAs' outputs (they fenced before arriving)
  }
  __syncthreads();  // (one CTA) every warp's token outputs before the tail reads them
  if (tid == 0) {
    s_dup = __ldcg(q.sync + 1) != 0;
    q.sync[0] = 0;  // every CTA has arrived: reset for the next launch (graph replays)
    q.sync[1] = 0;
  }
  for (int e = tid; e < E; e += kThreads) {
    s_present[e] = 0;
    s_keep[e] = 0;
  }
  __syncthreads();
  const bool have_ids = p.route || p.in_ids != nullptr;

  // ---- union flags and scores (v1's phase B)
  if (have_ids) {
    for (int i = tid; i < P; i += kThreads) {
      const int id = __ldcg(p.ids + i);
      if (id >= 0) s_present[id] = 1;
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
    if (p.score_mode == kScoreProb || (p.score_mode == kScoreTopk && !s_dup)) {
      const float* c = q.contrib + e;
#pragma unroll 16
      for (int t = 0; t < T; ++t) sc += __ldcg(c + (int64_t)t * E);  // token order, like v1 (loads in flight)
    } else if (p.score_mode == kScoreTopk) {
      for (int i = 0; i < P; ++i)  // a token repeats an id: v1's pair order
        if (__ldcg(p.ids + i) == e) sc += __ldcg(p.weights + i);
    }
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

  // ---- kept set (v1's phase C)
  const bool want_budget = p.route && (p.budget >= 0 || p.coverage > 0.f);
  if (p.route || p.in_kept == nullptr) {
    for (int e = tid; e < E; e += kThreads) s_keep[e] = s_present[e];
  }
  if (want_budget) {
    const bool all_cand = p.all_candidates != 0;
    const int NC = all_cand ? E : U;
    auto cand = [&](int j) { return all_cand ? j : s_union[j]; };
    // Rank of each candidate by (score desc, id asc): R threads (lanes of one warp) share one
    // candidate's NC comparisons, so the chain is NC / R long instead of NC.
    int R = 32;
    while (R > 1 && NC * R > kThreads) R >>= 1;
    for (int base = 0; base < NC * R; base += kThreads) {  // the same trip count in every thread
      const int idx = base + tid, j = idx / R, part = idx % R;
      int r = 0, e = -1;
      if (j < NC) {
        e = cand(j);
        const float v = s_score[e];
        for (int j2 = part; j2 < NC; j2 += R) {
          const int e2 = cand(j2);
          r += better(s_score[e2], e2, v, e) ? 1 : 0;
        }
      }
      for (int off = R / 2; off > 0; off >>= 1) r += __shfl_xor_sync(kFullMask, r, off);
      if (j < NC && part == 0) {
        s_cnt[e] = r;
        s_offs[r] = e;
      }
    }
    if (tid == 0) s_flags[2] = 0;
    __syncthreads();
    if (p.coverage > 0.f) {
      // v1's prefix sums (reference._kept_count): fp32 scores accumulated in double in rank order,
      // every prefix rounded to fp32. The chain is inherently sequential; the scores are gathered
      // into rank order first so that the loop's loads do not depend on its stores.
      for (int r = tid; r < NC; r += kThreads) s_sorted[r] = s_score[s_offs[r]];
      __syncthreads();
      if (tid == 0) {
        double acc = 0.0;
        for (int r = 0; r < NC; ++r) {
          acc += (double)s_sorted[r];
          s_sorted[r] = (float)acc;
        }
        s_target = p.coverage * (float)acc;
      }
      __syncthreads();
      int below = 0;
      for (int r = tid; r < NC; r += kThreads) below += s_sorted[r] < s_target ? 1 : 0;
      if (below) atomicAdd(&s_flags[2], below);  // a count: order-independent
      __syncthreads();
    }
    if (tid == 0) {
      const int upper = p.budget >= 0 ? p.budget : NC;
      int C = upper;
      if (p.coverage > 0.f) {
        int n = s_flags[2] + 1;
        n = n < NC ? n : NC;
        C = n < upper ? n : upper;
        C = C > p.min_budget ? C : p.min_budget;
        if (NC == 0) C = p.min_budget;
      }
      s_flags[0] = C;
      s_flags[1] = U > C ? 1 : 0;  // a budget is a cap
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
  __syncthreads();  // kept_experts complete

  // ---- L2 prefetch of the kept experts' first weight tiles, highest score first (s_offs is the
  // ranking when the budget cut the union; otherwise the kept list, ascending id). Issued before
  // the re-routing and the CSR so that the expert kernel's first loads find them in L2.
  if (q.pf_experts > 0) {
    const int n = kept_count < q.pf_experts ? kept_count : q.pf_experts;
    static_assert(kPrefetchRanges == 2, "two ranges: gate and up rows");
    const int chunks0 = q.pf[0].base != nullptr ? (int)((q.pf[0].bytes + kPrefetchChunk - 1) / kPrefetchChunk) : 0;
    const int chunks1 = q.pf[1].base != nullptr ? (int)((q.pf[1].bytes + kPrefetchChunk - 1) / kPrefetchChunk) : 0;
    const int per_expert = chunks0 + chunks1;
    for (int item = tid; item < n * per_expert; item += kThreads) {  // expert-major: highest score first
      const int i = item / per_expert;
      int c = item % per_expert;
      const int g = c < chunks0 ? 0 : 1;
      c -= g ? chunks0 : 0;
      const int e = budgeted ? s_offs[i] : p.kept_experts[i];
      const uint32_t off = (uint32_t)c * kPrefetchChunk;
      const uint32_t bytes = q.pf[g].bytes - off < kPrefetchChunk ? q.pf[g].bytes - off : kPrefetchChunk;
      prefetch_l2(q.pf[g].base + (int64_t)e * q.pf[g].expert_stride + off, bytes);
    }
  }

  // ---- re-route tokens under the kept set (v1's phase D), one warp per token, lanes in parallel.
  // With at most 32 kept experts and T * C' <= kMaxE, every token's probabilities of the kept experts
  // are loaded first by the whole block (one round trip instead of one per token and warp) into
  // s_sorted[t * C' + j] (j: position in the kept list, which s_tmp[e] holds), and the row validity
  // into s_cnt[t] (both free by now).
  const bool staged_probs = p.route && budgeted && kept_count >= k && kept_count <= 32 && T * kept_count <= kMaxE;
  if (staged_probs) {
    for (int idx = tid; idx < T * kept_count; idx += kThreads) {
      const int t = idx / kept_count, e = p.kept_experts[idx % kept_count];
      const float m = __ldcg(p.row_max + t), s = __ldcg(p.row_sum + t);
      s_sorted[idx] = softmax_prob(load_float(p.logits, p.logits_dtype, (int64_t)t * p.logits_stride + e), m, s);
      if (idx % kept_count == 0) s_cnt[t] = isnan(s) ? 1 : 0;
    }
    __syncthreads();
  }
  if (p.route) {
    const int my_kept = lane < kept_count ? p.kept_experts[lane] : -1;  // lane j: the j-th kept expert (<= 32)
    for (int t = warp; t < T; t += kWarps) {
      const int64_t row = (int64_t)t * p.logits_stride;
      float m = 0.f, s = 0.f;
      if (!staged_probs) {
        m = __ldcg(p.row_max + t);
        s = __ldcg(p.row_sum + t);
      }
      const bool invalid = staged_probs ? s_cnt[t] != 0 : isnan(s);
      int* ids = p.ids + (int64_t)t * k;
      float* w = p.weights + (int64_t)t * k;
      if (invalid) {  // invalid row: the k lowest kept ids, weight 0
        for (int r = lane; r < k; r += 32) {
          ids[r] = kept_count >= k ? p.kept_experts[r] : r;
          w[r] = 0.f;
        }
        __syncwarp();
        continue;
      }
      if (!budgeted) continue;
      auto prob = [&](int e) { return softmax_prob(load_float(p.logits, p.logits_dtype, row + e), m, s); };
      float wv = 0.f;  // lane r < k: the final weight of slot r before renormalisation
      if (p.policy == kSubstitute) {
        if (kept_count >= k && kept_count <= 32) {
          // v1's masked top-k picks the k best kept experts (all have a probability above the
          // -inf of the masked ones), and keeps a token's own top-k when all are kept: the same
          // as ranking the kept experts, one per lane, by the same total order.
          const int e = my_kept;
          const float v = e < 0 ? -INFINITY : staged_probs ? s_sorted[t * kept_count + lane] : prob(e);
          int rank = 0;
          for (int j = 0; j < kept_count; ++j) {
            const float ov = __shfl_sync(kFullMask, v, j);
            const int oe = __shfl_sync(kFullMask, e, j);
            rank += better(ov, oe, v, e) ? 1 : 0;
          }
          if (e >= 0 && rank < k) {
            s_rank_id[warp][rank] = e;
            s_rank_val[warp][rank] = v;
          }
          __syncwarp();
          if (lane < k) {
            ids[lane] = s_rank_id[warp][lane];
            wv = s_rank_val[warp][lane];
          }
          __syncwarp();  // the warp's next token reuses s_rank_*
        } else {  // v1's code path (fewer than k or more than 32 kept experts)
          bool kept_all = true;
          for (int r = lane; r < k; r += 32) {
            const int id = __ldcg(ids + r);
            kept_all = kept_all && id >= 0 && s_keep[id];
          }
          if (!__all_sync(kFullMask, kept_all))
            warp_topk(
                E, k, [&](int e) { return s_keep[e] ? prob(e) : -INFINITY; }, ids, w);
          __syncwarp();
          if (lane < k) {
            const int id = __ldcg(ids + lane);
            wv = id >= 0 ? prob(id) : 0.f;
          }
        }
      } else if (lane < k) {  // truncate
        const int id = __ldcg(ids + lane);
        wv = (id >= 0 && s_keep[id]) ? (staged_probs ? s_sorted[t * kept_count + s_tmp[id]] : prob(id)) : 0.f;
      }
      if (p.renormalize) {  // v1's sequential sum over the slots
        float sum = 0.f;
        for (int r = 0; r < k; ++r) sum += __shfl_sync(kFullMask, wv, r);
        if (sum > 0.f) wv /= sum;
      }
      if (lane < k) w[lane] = wv;
      __syncwarp();
    }
  }
  if (p.csr_mode == kCsrNone || !have_ids) return;
  __syncthreads();

  // ---- CSR of the active pairs, grouped by expert, then token, then slot (v1's phase E)
  const bool all = p.csr_mode == kCsrAll;
  const bool staged = P <= kPairCap;
  auto pair_expert = [&](int i) {  // the pair's expert when it is active, else -1
    const int id = __ldcg(p.ids + i);
    return (id >= 0 && (all || (s_keep[id] && __ldcg(p.weights + i) != 0.f))) ? id : -1;
  };
  for (int e = tid; e < E; e += kThreads) s_cnt[e] = 0;
  __syncthreads();
  for (int i = tid; i < P; i += kThreads) {
    p.pair_position[i] = -1;
    const int pe = pair_expert(i);
    if (staged) s_pid[i] = pe;
    if (pe >= 0) atomicAdd(&s_cnt[pe], 1);  // a count: order-independent
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
  for (int e = warp; e < E; e += kWarps) {
    if (s_cnt[e] == 0) continue;
    int run = s_offs[e];
    for (int t0 = 0; t0 < T; t0 += 32) {
      const int t = t0 + lane;
      int c = 0;
      if (t < T)
        for (int r = 0; r < k; ++r) {
          const int i = t * k + r;
          c += (staged ? s_pid[i] : pair_expert(i)) == e ? 1 : 0;
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
          const int i = t * k + r;
          if ((staged ? s_pid[i] : pair_expert(i)) == e) {
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

}  // namespace routing_v2
}  // namespace moespec
