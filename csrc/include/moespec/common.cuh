// Small torch-free device helpers shared by the routing and expert kernels.
//
// The same device code builds for the GPU (nvcc) and for the CPU emulator (MOESPEC_CUDA=EMU, the
// host compiler with csrc/emu/include first on the include path, which defines MOESPEC_EMU). The
// two builds differ only inside the wrapper functions marked "emulation seam": kernel launches,
// dynamic shared memory here and the PTX wrappers (cp.async, mma.sync) in experts.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

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

// Emulation seam: the block's dynamic shared memory.
template <class T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef MOESPEC_EMU
  return static_cast<T*>(moespec_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char moespec_dynamic_smem[];
  return reinterpret_cast<T*>(moespec_dynamic_smem);
#endif
}

// Emulation seam: launch `kernel` (for error messages: `name`) and return the launch error.
template <class... Params, class... Args>
inline cudaError_t launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, Args&&... args) {
#ifdef MOESPEC_EMU
  return moespec_emu::launch_kernel(name, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
#else
  (void)name;
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace moespec
