// Small torch-free device helpers shared by the routing and expert kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moespec {

// Element type codes used across the host/device boundary (see api.h).
enum DTypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum IdTypeCode : int { kInt32 = 0, kInt64 = 1 };

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load_float(const void* p, int dtype, int64_t i) {
  if (dtype == kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ int64_t load_index(const void* p, int type, int64_t i) {
  if (type == kInt64) return static_cast<const int64_t*>(p)[i];
  return static_cast<const int32_t*>(p)[i];
}

// fp32 -> 16-bit storage (round to nearest even, like torch's .to()).
template <bool BF16>
__device__ __forceinline__ uint16_t float_to_bits(float v) {
  if constexpr (BF16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

template <bool BF16>
__device__ __forceinline__ float bits_to_float(uint16_t b) {
  if constexpr (BF16) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  } else {
    return __half2float(__ushort_as_half(b));
  }
}

}  // namespace moespec
