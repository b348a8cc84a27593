// Scalar conversions between fp32 and the 16-bit storage types (bf16, IEEE fp16), round to
// nearest even like torch's .to(). `static inline` on purpose: every translation unit (each
// compiled for its own ISA) gets a private copy, so the linker never swaps in a copy compiled
// with instructions another ISA level lacks.
#pragma once

#include <cstdint>
#include <cstring>

namespace moespec {
namespace cpu {

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // Subnormal: value = man * 2^-24, exact in fp32.
    const float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // Below the smallest normal half (2^-14): subnormal or zero, in units of 2^-24.
    if (a < 0x33000000u) return sign;  // < 2^-25: rounds to zero
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - (int)e;  // m * 2^(e-150) / 2^-24 = m >> (126 - e)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  // Normal: rebias the exponent and round the mantissa to 10 bits (a carry bumps the exponent).
  uint32_t v = a - (112u << 23);
  v = (v + 0xfffu + ((v >> 13) & 1u)) >> 13;
  return (uint16_t)(sign | v);
}

// Element i of a float tensor of dtype code 0 fp32, 1 bf16, 2 fp16.
static inline float load_as_float(const void* p, int dtype, int64_t i) {
  if (dtype == 1) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  if (dtype == 2) return half_to_float(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// v rounded to the activation dtype and back (the kernels store the SwiGLU output that way).
static inline float round_to(float v, int dtype) {
  if (dtype == 1) return bf16_to_float(float_to_bf16(v));
  if (dtype == 2) return half_to_float(float_to_half(v));
  return v;
}

}  // namespace cpu
}  // namespace moespec
