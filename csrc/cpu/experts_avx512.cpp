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
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  // min(a, x) / max(a, x) return x when x is NaN (the second operand), so NaN propagates.
  static R min(R a, R x) { return _mm512_min_ps(a, x); }
  static R max(R a, R x) { return _mm512_max_ps(a, x); }
  // exp(x), Cephes' single-precision polynomial (about 1 ulp); x is clamped to [-87.3, 88.0], so
  // the result stays finite and normal; NaN propagates.
  static R exp(R x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x));
    const R fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    R y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i n = _mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127));
    return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
  }
  static float hsum(R r) { return _mm512_reduce_add_ps(r); }
  // out[j] = the lane sum of the j-th argument; one reduction tree for four (fewer shuffles).
  static void hsum4(R a, R b, R c, R d, float* out) {
    const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), hi256(a));
    const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), hi256(b));
    const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), hi256(c));
    const __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), hi256(d));
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  }
  static __m256 hi256(R r) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)); }
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
  static const IsaKernels k{MOESPEC_ISA_NS::prep, MOESPEC_ISA_NS::gemm1, MOESPEC_ISA_NS::gemm2, MOESPEC_ISA_NS::kBf16Dot,
                            MOESPEC_ISA_NS::read_sum};
  return &k;
}
}  // namespace cpu
}  // namespace moespec
