// AVX2 + FMA + F16C level of the CPU experts (8 fp32 lanes). Built with -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include <cstdint>

#define MOESPEC_ISA_NS isa_avx2
namespace moespec {
namespace cpu {
namespace isa_avx2 {
struct V {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float f) { return _mm256_set1_ps(f); }
  static R loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, R r) { _mm256_storeu_ps(p, r); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  // min(a, x) / max(a, x) return x when x is NaN (the second operand), so NaN propagates.
  static R min(R a, R x) { return _mm256_min_ps(a, x); }
  static R max(R a, R x) { return _mm256_max_ps(a, x); }
  // exp(x), Cephes' single-precision polynomial (about 1 ulp); x clamped to [-87.3, 88.0].
  static R exp(R x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
    const R fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    R y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
  }
  static float hsum(R r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[j] = the lane sum of the j-th argument; one reduction tree for four (fewer shuffles).
  static void hsum4(R a, R b, R c, R d, float* out) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  }
  template <class Tag>
  static R load(const float* p, Tag) { return _mm256_loadu_ps(p); }
  template <class Tag>
  static R load(const uint16_t* p, Tag) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (Tag::kBf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
};
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace moespec

#include "experts_impl.h"

namespace moespec {
namespace cpu {
const IsaKernels* kernels_avx2() {
  static const IsaKernels k{isa_avx2::prep, isa_avx2::gemm1, isa_avx2::gemm2, false, isa_avx2::read_sum};
  return &k;
}
}  // namespace cpu
}  // namespace moespec
