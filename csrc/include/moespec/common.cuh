// Small torch-free device helpers shared by the routing and expert kernels.
//
// The same device code builds for the GPU (nvcc) and for the CPU emulator (MOESPEC_CUDA=EMU, the
// host compiler with csrc/emu/include first on the include path, which defines MOESPEC_EMU). The
// two builds differ only inside the wrapper functions marked "emulation seam": kernel launches
// (plain and programmatic-dependent), dynamic shared memory, the grid-dependency controls and the
// L2 prefetch here, and the PTX wrappers (cp.async, mma.sync) in experts.cuh.
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

// Emulation seam: launch `kernel` as a programmatic dependent launch (PDL): on cc >= 9.0 it may
// start while the previous kernel in the stream still runs (once every block of that kernel called
// griddep_launch_dependents or exited), so it must call griddep_wait() before it reads anything the
// previous kernel writes. Below cc 9.0 a plain launch (the attribute does not exist there). The
// emulator runs launches in order and fails one whose threads exit without griddep_wait().
template <class... Params, class... Args>
inline cudaError_t launch_kernel_pdl(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                     cudaStream_t stream, Args&&... args) {
#ifdef MOESPEC_EMU
  return moespec_emu::launch_kernel_pdl(name, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
#else
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (major < 9) return launch_kernel(name, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
#endif
}

// Emulation seam: griddepcontrol.wait. Blocks until the grid this one depends on (PDL) completed
// and its memory is visible; returns at once without a programmatic dependency. Call it from every
// thread before the first read of the previous kernel's outputs (the emulator checks that every
// thread of a PDL launch called it).
__device__ __forceinline__ void griddep_wait() {
#if defined(MOESPEC_EMU)
  moespec_emu::griddep_wait();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Emulation seam: griddepcontrol.launch_dependents. Lets a PDL-launched successor start before this
// grid ends (it still waits for this grid's completion in griddep_wait). A no-op below sm_90 and in
// the emulator (launches run in order there).
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(MOESPEC_EMU)
  moespec_emu::griddep_launch_dependents();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Emulation seam: prefetch [p, p + bytes) into L2 (p and bytes multiples of 16). One bulk prefetch
// on sm_90, one prefetch.global.L2 per 128-byte line below. The emulator checks that the range lies
// in memory it can read (touching its first and last byte, which the ASan lane checks) and logs it.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(MOESPEC_EMU)
  moespec_emu::prefetch_l2(p, bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#elif defined(__CUDA_ARCH__)
  const char* c = static_cast<const char*>(p);
  for (uint32_t off = 0; off < bytes; off += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace moespec
