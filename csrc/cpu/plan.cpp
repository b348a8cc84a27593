// The routing plan on the host: the semantics of the CUDA plan (csrc/include/moespec/routing.cuh)
// and of moespec.reference.budget_routing_masked, computed sequentially (docs/cpu-kernels.md):
//   (torch's softmax top-k, given) -> union -> scores -> kept set among the candidates (top-C by
//   score, ties to the lower id; coverage) -> re-routing (substitute / truncate) -> CSR.
// Rows without a softmax (a NaN probability: any NaN, any +inf or all -inf logits) are padding, as
// in the CUDA plan. The plan is cheap next to the experts (O(T*E)), so it runs on one thread; its
// scratch lives in thread-local buffers that only grow (no allocation once warm).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "cpu_kernels.h"

namespace moespec {
namespace cpu {

namespace {

constexpr int kScoreNone = 0, kScoreProb = 1, kScoreTopk = 2;
constexpr int kSubstitute = 0;
constexpr int kCsrNone = 0, kCsrAll = 1;
// Indices of meta (as in routing.cuh).
constexpr int kMetaUnion = 0, kMetaKept = 1, kMetaBudgeted = 2, kMetaActive = 3, kMetaPairs = 4;

inline bool better(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

inline int64_t load_index(const void* p, int type, int64_t i) {
  return type == 1 ? static_cast<const int64_t*>(p)[i] : (int64_t) static_cast<const int32_t*>(p)[i];
}

// Top-k of value(e) over e in [0, E) by `better`, in rank order. NaN never enters the list; slots
// left empty (fewer than k comparable values) get id -1 and value 0, like the CUDA warp_topk.
template <class F>
void topk(int E, int k, F value, int* ids, float* vals, float* lv, int* li) {
  for (int j = 0; j < k; ++j) {
    lv[j] = -std::numeric_limits<float>::infinity();
    li[j] = std::numeric_limits<int>::max();
  }
  for (int e = 0; e < E; ++e) {
    float cv = value(e);
    if (!better(cv, e, lv[k - 1], li[k - 1])) continue;
    int j = k - 1;
    while (j > 0 && better(cv, e, lv[j - 1], li[j - 1])) {
      lv[j] = lv[j - 1];
      li[j] = li[j - 1];
      --j;
    }
    lv[j] = cv;
    li[j] = e;
  }
  for (int j = 0; j < k; ++j) {
    const bool real = li[j] >= 0 && li[j] < E;
    ids[j] = real ? li[j] : -1;
    vals[j] = real ? lv[j] : 0.f;
  }
}

struct Scratch {
  std::vector<float> prob, score, lv;
  std::vector<int> present, keep, order, rank, cnt, li;
  template <class V>
  static void fit(V& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }
};

}  // namespace

std::string routing_plan(const CpuPlanArgs& a) {
  if (a.T < 1) return "cpu routing plan: T must be >= 1";
  if (a.E < 1) return "cpu routing plan: E must be >= 1, got " + std::to_string(a.E);
  if (a.k < 1 || a.k > a.E) return "cpu routing plan: k must be in [1, E], got " + std::to_string(a.k);
  if (a.route && (a.probs == 0 || a.in_ids == 0 || a.in_weights == 0))
    return "cpu routing plan: route=1 needs the probabilities and the unbudgeted top-k ids and weights";
  if (a.score_mode == kScoreProb && a.probs == 0) return "cpu routing plan: score mode 'prob' needs probabilities";
  if (a.score_mode == kScoreTopk && a.in_ids == 0) return "cpu routing plan: score mode 'topk' needs ids";
  if (a.csr_mode != kCsrNone && a.in_ids == 0) return "cpu routing plan: a CSR needs a routing";
  if (a.probs != 0 && a.probs_stride < a.E) return "cpu routing plan: probability rows overlap (stride < E)";
  if (a.ids == 0 || a.weights == 0 || a.scores == 0 || a.meta == 0 ||
      a.union_experts == 0 || a.kept_experts == 0 || a.act_experts == 0 || a.act_offsets == 0 ||
      a.pair_token == 0 || a.pair_slot == 0 || a.pair_position == 0)
    return "cpu routing plan: an output buffer is missing";

  const int T = a.T, E = a.E, k = a.k;
  const int64_t P = (int64_t)T * k;
  const float* probs = reinterpret_cast<const float*>(a.probs);
  const uint8_t* tmask = reinterpret_cast<const uint8_t*>(a.token_mask);
  int* ids = reinterpret_cast<int*>(a.ids);
  float* weights = reinterpret_cast<float*>(a.weights);
  float* scores = reinterpret_cast<float*>(a.scores);
  int* meta = reinterpret_cast<int*>(a.meta);
  int* union_experts = reinterpret_cast<int*>(a.union_experts);
  int* kept_experts = reinterpret_cast<int*>(a.kept_experts);
  int* act_experts = reinterpret_cast<int*>(a.act_experts);
  int* act_offsets = reinterpret_cast<int*>(a.act_offsets);
  int* pair_token = reinterpret_cast<int*>(a.pair_token);
  int* pair_slot = reinterpret_cast<int*>(a.pair_slot);
  int* pair_position = reinterpret_cast<int*>(a.pair_position);

  static thread_local Scratch s;
  Scratch::fit(s.prob, (size_t)T);  // row validity
  Scratch::fit(s.score, E);
  Scratch::fit(s.present, E);
  Scratch::fit(s.keep, E);
  Scratch::fit(s.order, E);
  Scratch::fit(s.rank, E);
  Scratch::fit(s.cnt, E);
  Scratch::fit(s.lv, k);
  Scratch::fit(s.li, k);
  float* valid = s.prob.data();
  const float inf = std::numeric_limits<float>::infinity();
  auto unmasked = [&](int t) { return tmask == nullptr || tmask[t] != 0; };

  // ---- phase A: per token: validity, and the given routing (-1 for out-of-range ids)
  for (int t = 0; t < T; ++t) {
    bool ok = true;
    if (a.route) {
      const float* pr = probs + (int64_t)t * a.probs_stride;
      for (int e = 0; e < E; ++e) ok = ok && !std::isnan(pr[e]);
    }
    valid[t] = ok ? 1.f : 0.f;
    for (int r = 0; r < k; ++r) {
      const int64_t i = (int64_t)t * k + r;
      if (a.in_ids == 0) break;
      if (!ok) {  // invalid row: placeholder until phase D
        ids[i] = -1;
        weights[i] = 0.f;
        continue;
      }
      const int64_t id = load_index(reinterpret_cast<const void*>(a.in_ids), a.in_ids_type, i);
      ids[i] = (id >= 0 && id < E) ? (int)id : -1;
      weights[i] = a.in_weights != 0
                       ? load_as_float(reinterpret_cast<const void*>(a.in_weights), a.in_weights_dtype, i)
                       : 1.f;
    }
  }
  const bool have_ids = a.in_ids != 0;
  auto row_valid = [&](int t) { return valid[t] != 0.f; };

  // ---- phase B: union flags and scores (padding and invalid rows take no part)
  int* present = s.present.data();
  int* keep = s.keep.data();
  std::fill(present, present + E, 0);
  std::fill(keep, keep + E, 0);
  if (have_ids) {
    for (int t = 0; t < T; ++t) {
      if (!unmasked(t)) continue;
      for (int r = 0; r < k; ++r) {
        const int id = ids[(int64_t)t * k + r];
        if (id >= 0) present[id] = 1;
      }
    }
  }
  if (!a.route && a.in_kept != 0) {
    for (int i = 0; i < a.n_in_kept; ++i) {
      const int64_t id = load_index(reinterpret_cast<const void*>(a.in_kept), a.in_kept_type, i);
      if (id >= 0 && id < E) keep[id] = 1;
    }
  }
  float* score = s.score.data();
  std::fill(score, score + E, 0.f);
  if (a.score_mode == kScoreProb) {
    for (int t = 0; t < T; ++t) {  // token order per expert, like the CUDA plan
      if (a.route && (!row_valid(t) || !unmasked(t))) continue;  // score_experts alone keeps NaN rows
      const float* pr = probs + (int64_t)t * a.probs_stride;
      for (int e = 0; e < E; ++e) score[e] += pr[e];
    }
  } else if (a.score_mode == kScoreTopk) {
    for (int64_t i = 0; i < P; ++i) {  // pair order, like index_add_ on the CPU
      const int id = ids[i];
      if (id >= 0 && unmasked((int)(i / k))) score[id] += weights[i];
    }
  }
  for (int e = 0; e < E; ++e) {
    if (a.score_mode != kScoreNone) scores[e] = score[e];
    if (std::isnan(score[e])) score[e] = -inf;  // NaN would break the ranking's total order: rank it last
  }
  int U = 0;
  for (int e = 0; e < E; ++e)
    if (present[e]) union_experts[U++] = e;

  // ---- phase C: kept set, chosen among the candidates (every expert, or the union)
  const bool want_budget = a.route && (a.budget >= 0 || a.coverage > 0.0);
  if (a.route || a.in_kept == 0) std::copy(present, present + E, keep);
  bool budgeted = false;
  if (want_budget) {
    int* order = s.order.data();
    int ncand = 0;
    for (int e = 0; e < E; ++e)
      if (a.all_candidates || present[e]) order[ncand++] = e;
    std::sort(order, order + ncand, [&](int x, int y) { return better(score[x], x, score[y], y); });
    const int upper = a.budget >= 0 ? a.budget : ncand;
    int C = upper;
    if (a.coverage > 0.0) {
      // reference._kept_count: torch.cumsum of fp32 on the CPU accumulates in double in order and
      // rounds each prefix to fp32; target = fp32(coverage) * fp32 total; a prefix counts while
      // its mass is strictly below the target.
      std::vector<float>& prefix = s.lv;
      Scratch::fit(prefix, (size_t)std::max(ncand, k));
      double acc = 0.0;
      for (int r = 0; r < ncand; ++r) {
        acc += (double)score[order[r]];
        prefix[r] = (float)acc;
      }
      const float target = (float)a.coverage * (float)acc;
      int below = 0;
      for (int r = 0; r < ncand; ++r) below += prefix[r] < target ? 1 : 0;
      int n = std::min(below + 1, ncand);
      C = std::min(n, upper);
      C = std::max(C, a.min_budget);
      if (ncand == 0) C = a.min_budget;
    }
    // kept = min(C, ncand) >= U unless C < U: a budget is a cap, never a perturbation.
    budgeted = U > C;
    if (budgeted) {
      std::fill(keep, keep + E, 0);
      for (int r = 0; r < C && r < ncand; ++r) keep[order[r]] = 1;
    }
  }
  int kept_count = 0;
  for (int e = 0; e < E; ++e)
    if (keep[e]) kept_experts[kept_count++] = e;
  meta[kMetaUnion] = U;
  meta[kMetaKept] = kept_count;
  meta[kMetaBudgeted] = budgeted ? 1 : 0;

  // ---- phase D: re-route under the kept set (original full-softmax probabilities)
  if (a.route) {
    for (int t = 0; t < T; ++t) {
      int* ti = ids + (int64_t)t * k;
      float* tw = weights + (int64_t)t * k;
      if (!row_valid(t)) {  // the k lowest kept ids, weight 0
        for (int r = 0; r < k; ++r) {
          ti[r] = kept_count >= k ? kept_experts[r] : r;
          tw[r] = 0.f;
        }
        continue;
      }
      const float* pr = probs + (int64_t)t * a.probs_stride;
      if (budgeted) {
        if (a.policy == kSubstitute) {
          bool kept_all = true;  // all of its experts kept: the masked top-k would change nothing
          for (int r = 0; r < k; ++r) kept_all = kept_all && ti[r] >= 0 && keep[ti[r]];
          if (!kept_all)
            topk(E, k, [&](int e) { return keep[e] ? pr[e] : -inf; }, ti, tw, s.lv.data(), s.li.data());
          for (int r = 0; r < k; ++r) tw[r] = ti[r] >= 0 ? pr[ti[r]] : 0.f;
        } else {
          for (int r = 0; r < k; ++r) tw[r] = (ti[r] >= 0 && keep[ti[r]]) ? pr[ti[r]] : 0.f;
        }
        if (a.renormalize) {
          float wsum = 0.f;
          for (int r = 0; r < k; ++r) wsum += tw[r];
          if (wsum > 0.f)
            for (int r = 0; r < k; ++r) tw[r] /= wsum;
        }
      }
      if (want_budget && !unmasked(t))  // padding under a budget cannot widen the experts read
        for (int r = 0; r < k; ++r) tw[r] = 0.f;
    }
  }
  if (a.csr_mode == kCsrNone || !have_ids) return "";

  // ---- phase E: CSR of the active pairs, grouped by expert, then token, then slot
  const bool all = a.csr_mode == kCsrAll;
  int* cnt = s.cnt.data();
  std::fill(cnt, cnt + E, 0);
  for (int64_t i = 0; i < P; ++i) {
    const int id = ids[i];
    pair_position[i] = -1;
    if (id >= 0 && (all || (keep[id] && weights[i] != 0.f))) ++cnt[id];
  }
  int A = 0, pairs = 0;
  int* cursor = s.rank.data();
  for (int e = 0; e < E; ++e) {
    cursor[e] = pairs;
    if (cnt[e] > 0) {
      act_experts[A] = e;
      act_offsets[A] = pairs;
      ++A;
    }
    pairs += cnt[e];
  }
  act_offsets[A] = pairs;
  meta[kMetaActive] = A;
  meta[kMetaPairs] = pairs;
  for (int64_t i = 0; i < P; ++i) {  // pair order is token-major, then slot: a stable counting sort
    const int id = ids[i];
    if (id >= 0 && (all || (keep[id] && weights[i] != 0.f))) {
      const int pos = cursor[id]++;
      pair_token[pos] = (int)(i / k);
      pair_slot[pos] = (int)(i % k);
      pair_position[i] = pos;
    }
  }
  return "";
}

}  // namespace cpu
}  // namespace moespec
