// Host entry points of moespec's C++ CPU kernels (docs/cpu-kernels.md), as seen by csrc/bindings.cpp.
// Torch-free like the CUDA launchers: tensors arrive as raw addresses plus sizes, and every
// function returns "" or an error message instead of throwing across the library boundary.
// Compiled in every build (MOESPEC_CUDA=ON, OFF and EMU).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moespec {
namespace cpu {

// ---------------------------------------------------------------------------- ISA dispatch
// Levels in increasing order; the kernels run at min(detected, MOESPEC_CPU_ISA cap).
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* isa_name(int isa);
int detected_isa();                       // best level this CPU (and build) supports
std::vector<std::string> compiled_isas();  // levels compiled into this build, lowest first
// The level in use now: detected_isa() capped by the environment variable MOESPEC_CPU_ISA
// (scalar | avx2 | avx512 | avx512bf16), read at every call. -1 and *err set on a bad value.
int active_isa(std::string* err);

// ---------------------------------------------------------------------------- routing plan
// The outputs and codes of moespec::PlanArgs (csrc/include/moespec/api.h), computed on the host:
// dtypes 0 fp32, 1 bf16, 2 fp16; id types 0 int32, 1 int64; score_mode 0 none, 1 prob, 2 topk;
// policy 0 substitute, 1 truncate; csr_mode 0 none, 1 all pairs, 2 active pairs.
// Unlike the CUDA plan it starts from the softmax probabilities and the unbudgeted top-k that the
// caller computed with torch (torch.softmax + torch.topk, exactly as the models' routers do), so
// that an unbudgeted routing is bit-identical to the model's; route=1 means "in_ids/in_weights are
// that routing and probs its probabilities". row_max/row_sum are not written.
// Extras over the CUDA plan: all_candidates (1: the kept set is chosen among every expert,
// 0: among the union) and an optional token mask (uint8 [T], 0 = padding).
struct CpuPlanArgs {
  uintptr_t probs = 0;  // fp32 [T, E], row stride probs_stride; a row with a NaN is invalid
  int64_t probs_stride = 0;
  uintptr_t in_ids = 0;
  int in_ids_type = 0;
  uintptr_t in_weights = 0;
  int in_weights_dtype = 0;
  uintptr_t in_kept = 0;
  int in_kept_type = 0;
  int n_in_kept = 0;
  uintptr_t token_mask = 0;
  int T = 0, E = 0, k = 0;
  int route = 0;
  int renormalize = 0;
  int score_mode = 0;
  int budget = -1;
  double coverage = -1.0;
  int min_budget = 0;
  int policy = 0;
  int all_candidates = 0;
  int csr_mode = 0;
  uintptr_t ids = 0, weights = 0, row_max = 0, row_sum = 0, scores = 0, meta = 0;
  uintptr_t union_experts = 0, kept_experts = 0, act_experts = 0, act_offsets = 0;
  uintptr_t pair_token = 0, pair_slot = 0, pair_position = 0;
};

std::string routing_plan(const CpuPlanArgs& a);

// ---------------------------------------------------------------------------- experts
// Budgeted grouped gated-MLP experts over a plan built with csr_mode 2 (active pairs). dtype of
// x, weights and out: 0 fp32, 1 bf16, 2 fp16; biases are fp32 (or 0). order: 0 gate_up,
// 1 up_gate, 2 interleaved; activation: 0 silu, 1 clamped_swiglu. threads >= 1.
struct CpuExpertsArgs {
  int dtype = 0;
  int transposed = 0;
  uintptr_t x = 0;
  int64_t x_stride = 0;
  uintptr_t w_gu = 0, w_down = 0, b_gu = 0, b_down = 0;
  int T = 0, k = 0, H = 0, I = 0;
  int order = 0, activation = 0;
  double alpha = 1.702, limit = 7.0;
  uintptr_t meta = 0, act_experts = 0, act_offsets = 0, pair_token = 0, pair_slot = 0, pair_position = 0;
  uintptr_t weights = 0;
  uintptr_t out = 0;
  int threads = 1;  // at most this many threads ...
  // ... and one per this many bytes of expert weights read: below it, waking and joining workers
  // costs more than it saves (and a worker preempted mid-item stalls the join). 0: no limit.
  int64_t min_thread_bytes = 512 << 10;
};

std::string moe_experts(const CpuExpertsArgs& a);

// Reads [p, p + bytes) once with the active ISA level's vector loads on up to `threads` threads of
// the kernels' pool (1 MiB chunks claimed dynamically): the streaming read that the layer
// benchmark's byte floor divides by. *checksum gets the sum of the fp32 words read.
std::string stream_read(uintptr_t p, int64_t bytes, int threads, double* checksum);

}  // namespace cpu
}  // namespace moespec
