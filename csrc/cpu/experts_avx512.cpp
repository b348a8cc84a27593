// AVX-512 level of the CPU experts (16 fp32 lanes). Built with -mavx512f -mavx512bw -mavx512vl
// -mfma -mf16c; experts_avx512bf16.cpp reuses this file with VDPBF16PS dot products for bf16.
#include <immintrin.h>

#include <cstdint>

#ifndef MOESPEC_ISA_NS
#define MOESPEC_ISA_NS isa_avx512
#define MOESPEC_KERNELS_FN kernels_avx512
#endif
namespace moespec {
namespace cpu {
namespace MOESPEC_ISA_NS {
struct V {
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float f) { return _mm512_set1_ps(f); }
  static R loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, R r) { _mm512_storeu_ps(p, r); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(R r) { return _mm512_reduce_add_ps(r); }
  template <class Tag>
  static R load(const float* p, Tag) { return _mm512_loadu_ps(p); }
  template <class Tag>
  static R load(const uint16_t* p, Tag) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if (Tag::kBf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
};
}  // namespace MOESPEC_ISA_NS
}  // namespace cpu
}  // namespace moespec

#include "experts_impl.h"

namespace moespec {
namespace cpu {
const IsaKernels* MOESPEC_KERNELS_FN() {
  static const IsaKernels k{MOESPEC_ISA_NS::gemm1, MOESPEC_ISA_NS::gemm2, MOESPEC_ISA_NS::kBf16Dot};
  return &k;
}
}  // namespace cpu
}  // namespace moespec
