// Portable scalar level of the CPU experts (no vector intrinsics; any architecture).
#include <cmath>
#include <cstdint>

#include "convert.h"

#define MOESPEC_ISA_NS isa_scalar
namespace moespec {
namespace cpu {
namespace isa_scalar {
struct V {
  using R = float;
  static constexpr int W = 1;
  static R zero() { return 0.f; }
  static R set1(float f) { return f; }
  static R loadf(const float* p) { return *p; }
  static void storef(float* p, R r) { *p = r; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R add(R a, R b) { return a + b; }
  static R mul(R a, R b) { return a * b; }
  static R div(R a, R b) { return a / b; }
  static R min(R a, R x) { return x > a ? a : x; }  // NaN x propagates, as with the vector levels
  static R max(R a, R x) { return x < a ? a : x; }
  static R exp(R x) { return std::exp(x); }
  static float hsum(R r) { return r; }
  static void hsum4(R a, R b, R c, R d, float* out) { out[0] = a, out[1] = b, out[2] = c, out[3] = d; }
  template <class Tag>
  static R load(const typename Tag::T* p, Tag) { return Tag::scalar(p); }
};
}  // namespace isa_scalar
}  // namespace cpu
}  // namespace moespec

#include "experts_impl.h"

namespace moespec {
namespace cpu {
const IsaKernels* kernels_scalar() {
  static const IsaKernels k{isa_scalar::prep, isa_scalar::gemm1, isa_scalar::gemm2, false, isa_scalar::read_sum};
  return &k;
}
}  // namespace cpu
}  // namespace moespec
