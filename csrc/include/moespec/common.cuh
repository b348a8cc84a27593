// Small torch-free device helpers shared by the routing and expert kernels.
//
// The same device code builds for the GPU (nvcc) and for the CPU emulator (MOESPEC_CUDA=EMU, the
// host compiler with csrc/emu/include first on the include path, which defines MOESPEC_EMU). The
// two builds differ only inside the wrapper functions marked "emulation seam": kernel launches
// (plain and programmatic-dependent), dynamic shared memory, the grid-dependency controls, the
// cross-CTA flags (flag_or_release, flag_wait_bits), the performance trace and the L2 prefetch
// here, and the PTX wrappers (cp.async, mma.sync) in experts.cuh.
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

// Whether the loaded image of `kernel` was compiled for sm_90 or newer, so that its griddep_wait()
// is a real griddepcontrol.wait (below sm_90 it compiles to nothing, common.cuh below). Asked of the
// runtime about the image it loaded (cudaFuncGetAttributes: binaryVersion is the SASS, ptxVersion the
// virtual architecture it came from; a compute_80 PTX image JIT-compiled on a Hopper GPU has
// binaryVersion 90 but ptxVersion 80, and no wait). Cached per kernel and device on a GPU; the
// emulator answers from its image architecture (emu_set_image_arch), which tests change.
template <class... Params>
inline cudaError_t image_waits_for_grid(void (*kernel)(Params...), bool* yes) {
  *yes = false;
#ifndef MOESPEC_EMU
  struct Entry {
    const void* kernel;
    int dev, answer;  // answer: 0 unknown, 1 no, 2 yes
  };
  static Entry cache[16];  // host-side; a benign race at worst (the same answer is written)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const void* key = reinterpret_cast<const void*>(kernel);
  for (const Entry& e : cache)
    if (e.kernel == key && e.dev == dev && e.answer != 0) {
      *yes = e.answer == 2;
      return cudaSuccess;
    }
#endif
  cudaFuncAttributes attr{};
  cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  if (e != cudaSuccess) return e;
  *yes = attr.binaryVersion >= 90 && attr.ptxVersion >= 90;
#ifndef MOESPEC_EMU
  for (Entry& c : cache)
    if (c.answer == 0 || (c.kernel == key && c.dev == dev)) {
      c = Entry{key, dev, *yes ? 2 : 1};
      break;
    }
#endif
  return cudaSuccess;
}

// Emulation seam: launch `kernel` as a programmatic dependent launch (PDL): it may start while the
// previous kernel in the stream still runs (once every block of that kernel called
// griddep_launch_dependents or exited), so it must call griddep_wait() before it reads anything the
// previous kernel writes. Only when the kernel's loaded image has a real griddepcontrol.wait
// (image_waits_for_grid: built for sm_90+, which also means a cc >= 9.0 device): otherwise a plain
// launch, which the previous kernel's completion orders. The emulator runs launches in order and
// fails a PDL launch whose threads exit without griddep_wait().
template <class... Params, class... Args>
inline cudaError_t launch_kernel_pdl(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                     cudaStream_t stream, Args&&... args) {
  bool pdl = false;
  cudaError_t err = image_waits_for_grid(kernel, &pdl);
  if (err != cudaSuccess) return err;
  if (!pdl) return launch_kernel(name, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
#ifdef MOESPEC_EMU
  return moespec_emu::launch_kernel_pdl(name, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
#else
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

// Emulation seam: sets `bits` in *flag as a release at GPU scope, for data the whole CTA stored
// before: call from ONE thread after a __syncthreads that follows every thread's stores (the barrier
// orders them before this thread's fence; one fence.acq_rel per CTA instead of a fence.sc per thread).
__device__ __forceinline__ void flag_or_release(int* flag, int bits) {
#if defined(MOESPEC_EMU)
  *flag |= bits;  // fibers never interleave here: atomic, and stores are visible at once
#elif defined(__CUDA_ARCH__)
  asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.or.b32 [%0], %1;" ::"l"(flag), "r"(bits) : "memory");
#else
  (void)flag;
  (void)bits;
#endif
}

// Emulation seam: a bounded acquire wait, from ONE thread (then __syncthreads, then the CTA reads
// the data with __ldcg). Returns *flag once it holds every bit of `need`, or what it holds when
// budget_ns have passed (0: one look) — the caller must then do without the missing part (recompute
// it). On a GPU: ld.acquire.gpu polls with __nanosleep, timed by %globaltimer. The emulator times a
// wait out only when no resident block can make progress (the producer is not resident: another
// kernel holds its SM), at once for budget 0, or at the random rate of emu_set_wait_timeout_rate.
__device__ __forceinline__ int flag_wait_bits(const int* flag, int need, uint32_t budget_ns) {
#if defined(MOESPEC_EMU)
  if (budget_ns == 0) return *flag;
  return moespec_emu::wait_bits(flag, need);
#elif defined(__CUDA_ARCH__)
  int v;
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (;;) {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(flag) : "memory");
    if ((v & need) == need) return v;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 >= budget_ns) return v;
    __nanosleep(128);
  }
#else
  (void)need;
  (void)budget_ns;
  return *flag;
#endif
}

// Emulation seam: performance trace events for the trace-driven model (tools/kernel_perf_model.py,
// docs/kernels-v2.md). Nothing on a GPU; the emulator records them (emu.h, "Performance trace").
// Kinds: kPerfStage (a pipeline stage is computed: a = token fragments, b = 0 a v1 stage of 64 k,
// 1 / 2 a v2 GEMM1 / GEMM2 stage of 128 k, + 4 when it recomputes another CTA's columns),
// kPerfPublish (a = flag, b = units published), kPerfWait (a = flag, b = units needed), kPerfRoundTrips
// (a = dependent global round trips this thread now waits for), kPerfBytes (a = global bytes this
// thread reads or writes outside cp.async), kPerfRecompute (a = flag, b = units recomputed locally).
enum PerfKind : int { kPerfStage = 1, kPerfPublish = 2, kPerfWait = 3, kPerfRoundTrips = 4, kPerfBytes = 5,
                      kPerfRecompute = 6 };
__device__ __forceinline__ void perf_event(int kind, int64_t a = 0, int64_t b = 0) {
#if defined(MOESPEC_EMU)
  moespec_emu::perf_event(kind, a, b);
#else
  (void)kind;
  (void)a;
  (void)b;
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
