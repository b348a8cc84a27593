// What the experts driver (experts.cpp) hands to the per-ISA work items (experts_impl.h).
// Plain data only: this header is included by translation units compiled for different ISAs.
#pragma once

#include <cstdint>

namespace moespec {
namespace cpu {

// Per-expert buffers (gu, h, h16, xt) start at row p0 + a * kLanePad of their buffer (p0: the
// expert's first CSR pair, a: its index among the active experts), so that an expert's token count
// can be rounded up to a whole vector in the token-major layouts.
constexpr int kLanePad = 16;

struct ExpertsCtx {
  int dtype;  // 0 fp32, 1 bf16, 2 fp16 (x, weights, out)
  int transposed, order, activation;
  float alpha, limit;
  int T, k, H, I;
  const void* w_gu;
  const void* w_down;
  const float* b_gu;    // [E, 2I] or nullptr
  const float* b_down;  // [E, H] or nullptr
  const int* act_experts;
  const int* act_offsets;
  const int* pair_token;
  const int* pair_slot;
  const float* weights;       // [T, k] plan weights
  const float* const* xrows;  // [P] fp32 input row of each CSR pair
  const uint16_t* const* x16rows;  // [P] bf16 input rows (bf16 dot products only), else nullptr
  float* xt;                  // per expert [H, n rounded up to W]: the expert's inputs transposed (token-major)
  float* gu;                  // per expert [n, 2I] (dot products) or [2I, n_pad] (token-major) GEMM1 output
  float* h;                   // per expert [n, I] or [I, n_pad]: activation, rounded to the activation dtype
  uint16_t* h16;              // [P, I] the same in bf16 (bf16 dot products only), else nullptr
  const float* const* hrows;  // [P] rows of h
  const uint16_t* const* h16rows;  // [P] rows of h16, or nullptr
  float* y;                   // [P, H] weighted expert outputs, fp32
  float* scratch;             // per thread: scratch_stride floats (weight rows in fp32, output tiles)
  int64_t scratch_stride;
};

// One ISA level's work items: GEMM1 + activation for expert slot `a` (index into act_experts)
// and intermediate columns [i0, i1); GEMM2 + bias + routing weight for hidden columns [h0, h1).
struct IsaKernels {
  void (*prep)(const ExpertsCtx& c, int a);  // per expert, before GEMM1 (the token-major input copy)
  void (*gemm1)(const ExpertsCtx& c, int a, int i0, int i1, float* scratch);
  void (*gemm2)(const ExpertsCtx& c, int a, int h0, int h1, float* scratch);
  bool bf16_dot;  // wants x16rows / h16 / h16rows for bf16 activations
  // Sum of the fp32 words of [p, p + bytes) read with this level's widest loads (the streaming
  // read of the benchmark's byte floor; the sum keeps the loads from being optimised away).
  double (*read_sum)(const void* p, int64_t bytes);
};

const IsaKernels* kernels_scalar();
const IsaKernels* kernels_avx2();
const IsaKernels* kernels_avx512();
const IsaKernels* kernels_avx512bf16();

}  // namespace cpu
}  // namespace moespec
