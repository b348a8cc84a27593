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
  static float hsum(R r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
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
  static const IsaKernels k{isa_avx2::gemm1, isa_avx2::gemm2, false};
  return &k;
}
}  // namespace cpu
}  // namespace moespec
