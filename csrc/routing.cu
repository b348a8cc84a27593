// Host launcher of the routing plan (device code: csrc/include/moespec/routing.cuh, generation 2:
// routing_v2.cuh).
#include <cuda_runtime.h>

#include <string>

#include "moespec/api.h"
#include "moespec/routing.cuh"
#include "moespec/routing_v2.cuh"

namespace moespec {

int plan_max_experts() { return routing::kMaxE; }
int plan_max_topk() { return routing::kMaxK; }

std::string launch_routing_plan(const PlanArgs& a, int64_t stream) {
  using namespace routing;
  if (a.T < 1) return "routing plan: T must be >= 1";
  if (a.E < 1 || a.E > kMaxE) return "routing plan: E must be in [1, " + std::to_string(kMaxE) + "], got " + std::to_string(a.E);
  if (a.k < 1 || a.k > kMaxK || a.k > a.E)
    return "routing plan: k must be in [1, min(E, " + std::to_string(kMaxK) + ")], got " + std::to_string(a.k);
  if (a.route && a.logits == 0) return "routing plan: route=1 needs router logits";
  if (a.score_mode == kScoreProb && a.logits == 0) return "routing plan: score mode 'prob' needs router logits";
  if (a.score_mode == kScoreTopk && !a.route && a.in_ids == 0) return "routing plan: score mode 'topk' needs ids";
  if (a.csr_mode != kCsrNone && !a.route && a.in_ids == 0) return "routing plan: a CSR needs a routing";
  if (a.logits != 0 && (a.logits_dtype < 0 || a.logits_dtype > 2)) return "routing plan: bad logits dtype code";
  if (a.ids == 0 || a.weights == 0 || a.row_max == 0 || a.row_sum == 0 || a.scores == 0 || a.meta == 0 ||
      a.union_experts == 0 || a.kept_experts == 0 || a.act_experts == 0 || a.act_offsets == 0 ||
      a.pair_token == 0 || a.pair_slot == 0 || a.pair_position == 0)
    return "routing plan: an output buffer is missing";
  PlanParams p{};
  p.logits = reinterpret_cast<const void*>(a.logits);
  p.logits_dtype = a.logits_dtype;
  p.logits_stride = a.logits_stride;
  p.in_ids = reinterpret_cast<const void*>(a.in_ids);
  p.in_ids_type = a.in_ids_type;
  p.in_weights = reinterpret_cast<const void*>(a.in_weights);
  p.in_weights_dtype = a.in_weights_dtype;
  p.in_kept = reinterpret_cast<const void*>(a.in_kept);
  p.in_kept_type = a.in_kept_type;
  p.n_in_kept = a.n_in_kept;
  p.T = a.T;
  p.E = a.E;
  p.k = a.k;
  p.route = a.route;
  p.renormalize = a.renormalize;
  p.score_mode = a.score_mode;
  p.budget = a.budget;
  p.coverage = static_cast<float>(a.coverage);
  p.min_budget = a.min_budget;
  p.all_candidates = a.all_candidates;
  p.policy = a.policy;
  p.csr_mode = a.csr_mode;
  p.ids = reinterpret_cast<int*>(a.ids);
  p.weights = reinterpret_cast<float*>(a.weights);
  p.row_max = reinterpret_cast<float*>(a.row_max);
  p.row_sum = reinterpret_cast<float*>(a.row_sum);
  p.scores = reinterpret_cast<float*>(a.scores);
  p.meta = reinterpret_cast<int*>(a.meta);
  p.union_experts = reinterpret_cast<int*>(a.union_experts);
  p.kept_experts = reinterpret_cast<int*>(a.kept_experts);
  p.act_experts = reinterpret_cast<int*>(a.act_experts);
  p.act_offsets = reinterpret_cast<int*>(a.act_offsets);
  p.pair_token = reinterpret_cast<int*>(a.pair_token);
  p.pair_slot = reinterpret_cast<int*>(a.pair_slot);
  p.pair_position = reinterpret_cast<int*>(a.pair_position);
  if (a.generation == 2) {
    if (a.sync == 0) return "routing plan v2: the sync buffer is missing";
    if (a.score_mode != kScoreNone && a.contrib == 0) return "routing plan v2: the score workspace is missing";
    routing_v2::PlanV2Params q{};
    q.p = p;
    q.contrib = reinterpret_cast<float*>(a.contrib);
    q.sync = reinterpret_cast<int*>(a.sync);
    const uintptr_t bases[2] = {a.pf_base0, a.pf_base1};
    const int64_t strides[2] = {a.pf_stride0, a.pf_stride1}, sizes[2] = {a.pf_bytes0, a.pf_bytes1};
    for (int g = 0; g < 2; ++g) {
      if (bases[g] == 0 || a.pf_experts <= 0) continue;
      if (bases[g] % 16 || strides[g] % 16 || sizes[g] % 16 || sizes[g] <= 0 || sizes[g] > (int64_t(1) << 30))
        return "routing plan v2: prefetch ranges need 16-byte multiples of at most 1 GiB";
      q.pf[g] = routing_v2::PrefetchRange{reinterpret_cast<const char*>(bases[g]), strides[g],
                                          static_cast<uint32_t>(sizes[g])};
    }
    q.pf_experts = a.pf_experts > 0 ? a.pf_experts : 0;
    const int grid = (a.T + routing_v2::kTokensPerCta - 1) / routing_v2::kTokensPerCta;
    const cudaError_t err = launch_kernel("routing_plan_v2_kernel", routing_v2::routing_plan_v2_kernel, dim3(grid),
                                          dim3(kThreads), 0, reinterpret_cast<cudaStream_t>(stream), q);
    if (err != cudaSuccess) return std::string("routing plan v2 launch failed: ") + cudaGetErrorString(err);
    return "";
  }
  if (a.generation != 1) return "routing plan: generation must be 1 or 2, got " + std::to_string(a.generation);
  const cudaError_t err = launch_kernel("routing_plan_kernel", routing_plan_kernel, dim3(1), dim3(kThreads), 0,
                                       reinterpret_cast<cudaStream_t>(stream), p);
  if (err != cudaSuccess) return std::string("routing plan launch failed: ") + cudaGetErrorString(err);
  return "";
}

}  // namespace moespec
