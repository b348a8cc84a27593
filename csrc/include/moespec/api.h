// Host-side entry points of the moespec CUDA library, as seen by csrc/bindings.cpp.
// Plain C++ (no CUDA or torch headers): pointers travel as raw addresses, the stream as an
// opaque handle. Each launcher validates what it can cheaply and returns an error string
// instead of throwing across the library boundary.
#pragma once

#include <cstdint>
#include <string>

namespace moespec {

struct DeviceStatus {
  int device_count = 0;     // 0 when no usable GPU or driver
  int runtime_version = 0;  // CUDA runtime the library was linked with (e.g. 13000)
  int driver_version = 0;   // 0 when no driver is installed
  std::string error;        // empty on success; why no device is usable otherwise
};

// Never throws and never aborts, also on machines without a driver.
DeviceStatus query_devices();

// ---------------------------------------------------------------------------- routing plan
// Mirrors moespec::routing::PlanParams (csrc/include/moespec/routing.cuh) with addresses as
// integers. Codes: dtypes 0 fp32, 1 bf16, 2 fp16; id types 0 int32, 1 int64; score_mode 0 none,
// 1 prob, 2 topk; policy 0 substitute, 1 truncate; csr_mode 0 none, 1 all pairs, 2 active pairs.
struct PlanArgs {
  uintptr_t logits = 0;
  int logits_dtype = 0;
  int64_t logits_stride = 0;
  uintptr_t in_ids = 0;
  int in_ids_type = 0;
  uintptr_t in_weights = 0;
  int in_weights_dtype = 0;
  uintptr_t in_kept = 0;
  int in_kept_type = 0;
  int n_in_kept = 0;
  int T = 0, E = 0, k = 0;
  int route = 0;
  int renormalize = 0;
  int score_mode = 0;
  int budget = -1;
  double coverage = -1.0;
  int min_budget = 0;
  int all_candidates = 0;  // 1: candidates "all" (every expert), 0: "union"
  int policy = 0;
  int csr_mode = 0;
  uintptr_t ids = 0, weights = 0, row_max = 0, row_sum = 0, scores = 0, meta = 0;
  uintptr_t union_experts = 0, kept_experts = 0, act_experts = 0, act_offsets = 0;
  uintptr_t pair_token = 0, pair_slot = 0, pair_position = 0;
  // Plan generation: 1 (one CTA, routing.cuh) or 2 (multi-CTA, routing_v2.cuh; the same outputs).
  // Generation 2 needs `contrib` (fp32 [T*E], when score_mode != 0) and `sync` (int32 [4], zeroed
  // once; the kernel leaves it zeroed), and may prefetch into L2, for each of the first pf_experts
  // kept experts e (highest score first), [pf_base[g] + e * pf_stride[g], + pf_bytes[g]) (g < 2,
  // pf_base 0: unused; addresses, strides and sizes multiples of 16). Generation 1 ignores them.
  int generation = 1;
  uintptr_t contrib = 0, sync = 0;
  uintptr_t pf_base0 = 0, pf_base1 = 0;
  int64_t pf_stride0 = 0, pf_stride1 = 0;
  int64_t pf_bytes0 = 0, pf_bytes1 = 0;
  int pf_experts = 0;
};

// Largest E and k the single-CTA routing plan supports.
int plan_max_experts();
int plan_max_topk();

// One launch on `stream` (a cudaStream_t as an integer). Returns "" or an error message.
std::string launch_routing_plan(const PlanArgs& a, int64_t stream);

// ---------------------------------------------------------------------------- experts
// Mirrors moespec::experts::ExpertsParams; the plan pointers come from a PlanArgs launch with
// csr_mode 2 over the same routing. dtype: 1 bf16, 2 fp16. order: 0 gate_up, 1 up_gate,
// 2 interleaved; activation: 0 silu, 1 clamped_swiglu. max_experts bounds the grid (>= the
// number of active experts).
struct ExpertsArgs {
  int dtype = 1;
  int transposed = 0;
  uintptr_t x = 0;
  int64_t x_stride = 0;
  uintptr_t w_gu = 0, w_down = 0, b_gu = 0, b_down = 0;
  int T = 0, k = 0, H = 0, I = 0;
  int order = 0, activation = 0;
  double alpha = 1.702, limit = 7.0;
  uintptr_t meta = 0, act_experts = 0, act_offsets = 0, pair_token = 0, pair_slot = 0, pair_position = 0;
  uintptr_t weights = 0;
  uintptr_t hbuf = 0, ybuf = 0, out = 0;
  int atomic = 0;
  int max_experts = 0;
  int ksplit = 1;  // GEMM2 K splits asked for (deterministic mode needs ksplit*T*k*H floats of ybuf)
  int ksplit1 = 1;    // GEMM1 K splits asked for; used only with gubuf
  uintptr_t gubuf = 0;  // fp32 [ksplit1, T*k, I, 2] partials of a split GEMM1, or 0
  // Kernel generation: 1 (GEMM1, [SwiGLU], GEMM2, combine launches) or 2 (a persistent kernel and
  // its combine kernel, docs/kernels-v2.md). Generation 2 ignores hbuf, ksplit, ksplit1, gubuf and
  // max_experts, needs `counters` (int32 [experts_v2_counters_len(grid)]: the stream-K flags and
  // workspace) and a deterministic ybuf of T*k*ceil(I/experts_v2_slice()) rows.
  int generation = 1;
  uintptr_t counters = 0;
  int64_t counters_len = 0;  // ints in `counters` (checked against experts_v2_counters_len(grid))
  int grid = 0;              // generation 2: persistent CTAs; 0: experts_v2_grid()
  int64_t wait_ns = -1;      // generation 2: a cut item's wait for its h before recomputing (ns); -1: default
};

// I columns per generation-2 work item (sizes the deterministic ybuf).
int experts_v2_slice();
// The generation-2 grid on the current device: its SM count x the CTAs per SM the occupancy
// calculator allows (1), or -1 if the device cannot be queried.
int experts_v2_grid();
// Ints of the generation-2 counters buffer for a grid of `grid` CTAs.
int64_t experts_v2_counters_len(int grid);

// Generation 1: GEMM1+SwiGLU, GEMM2+weights, combine (plus a memset in atomic mode) on `stream`.
// Generation 2: the persistent kernel, launched as a programmatic dependent of the plan, and its
// combine kernel, launched as a programmatic dependent of it (each only where its loaded image was
// built for sm_90+); the counters (and, atomic mode, the accumulator ybuf) must be zero on entry,
// and the combine kernel leaves them zero.
std::string launch_moe_experts(const ExpertsArgs& a, int64_t stream);

}  // namespace moespec
