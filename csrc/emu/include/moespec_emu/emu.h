// moespec's CUDA emulation layer (MOESPEC_CUDA=EMU): just enough of the CUDA language and runtime
// for the device code in csrc/include/moespec/*.cuh and the launchers in csrc/*.cu to compile with
// the host C++ compiler and run on the CPU, faithfully enough to catch kernel bugs.
//
// Model (csrc/emu/README.md has the full list):
//  - every CUDA thread of a block is a fiber on the calling OS thread; blocks run one after
//    another in a seeded random order, threads are scheduled in a seeded random order and switch
//    only at barriers and warp collectives;
//  - __syncthreads / __syncwarp / shuffles / votes / mma.sync are cooperative barriers: a barrier
//    that cannot complete (exited or diverged threads, mismatched collectives, partial masks)
//    aborts the launch with a message instead of hanging;
//  - shared memory (static: the `moespec_emu_shared` section, template kernels' included; dynamic:
//    a per-launch arena) is poisoned with 0xFF bytes (NaN in every float type) before every block
//    and kept per resident block;
//  - cp.async copies are deferred to the issuing thread's wait_group, their destination is
//    poisoned when issued;
//  - launches are checked like the driver does (grid/block limits, dynamic shared memory above
//    48 KiB only after a per-kernel cudaFuncAttributeMaxDynamicSharedMemorySize opt-in).
// Nothing here is used by the real CUDA build.
#pragma once

#include <math.h>  // expf, fmaxf, isnan, INFINITY in the global namespace, as in device code

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define MOESPEC_EMU 1

// ------------------------------------------------------------------------ language keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared variables become statics in one ELF section, moespec_emu_shared, so the emulator
// can poison them all before every block and keep a copy per resident block. GCC drops the section
// attribute in template instantiations; the abi_tag survives there, marks the variable's mangled
// name (and, with -fdata-sections, its section's name), and csrc/emu/shared.ld moves those
// sections into moespec_emu_shared at link time.
#define __shared__ \
  static __attribute__((section("moespec_emu_shared"), abi_tag("moespec_emu_shared"), aligned(16)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};

// ------------------------------------------------------------------------ runtime API subset
typedef struct moespec_emu_stream* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaGetDeviceCount(int* n);
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
namespace moespec_emu {
// Emulated SMs (default 5; tests change it): the attribute below, and how many blocks of a launch
// are resident at once (one per SM), which is what a block's wait for another block relies on.
int sm_count();
void set_sm_count(int n);
// Competing resident blocks: other kernels (another stream, an MPS or green-context limit) hold all
// but `n` SMs, so at most n blocks of a launch are resident at once although the device reports
// sm_count() SMs (0: no limit). Persistent kernels must still complete (bounded waits).
int resident_limit();
void set_resident_limit(int n);
// The architecture the loaded kernel image was built for (default 90): what cudaFuncGetAttributes
// reports (binaryVersion, ptxVersion), and below 90 griddep_wait() is compiled out (a no-op that
// does not count as the wait), as in a compute_80 image JIT-compiled on a Hopper GPU.
int image_arch();
void set_image_arch(int arch);
}  // namespace moespec_emu
// The emulated device: an sm_90 part with few SMs, so persistent kernels loop over many items per
// block and uneven shares are exercised.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  if (attr == cudaDevAttrMultiProcessorCount) *value = moespec_emu::sm_count();
  else if (attr == cudaDevAttrComputeCapabilityMajor) *value = 9;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = 227 * 1024;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}

namespace moespec_emu {
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return moespec_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
// The loaded image's attributes: binaryVersion / ptxVersion from image_arch(); the emulator does not
// know a kernel's own static shared memory or registers (0: the resource table covers them).
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion;
};
template <class F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* kernel) {
  (void)kernel;
  *attr = cudaFuncAttributes{0, 0, 0, 1024, 0, moespec_emu::image_arch(), moespec_emu::image_arch()};
  return cudaSuccess;
}
// Blocks per SM as the occupancy calculator gives them for an sm_90 SM: 2048 threads, 32 blocks,
// 228 KiB of shared memory with 1 KiB reserved per block (registers are not modelled).
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* kernel, int block_size,
                                                                 size_t dynamic_smem) {
  (void)kernel;
  if (block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  const int by_threads = 2048 / (((block_size + 31) / 32) * 32);
  const int by_smem = static_cast<int>((228u * 1024u) / (dynamic_smem + 1024u));
  *n = by_threads < by_smem ? by_threads : by_smem;
  if (*n > 32) *n = 32;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* kernel, int block_size, size_t dynamic_smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, reinterpret_cast<const void*>(kernel), block_size,
                                                       dynamic_smem);
}

// ------------------------------------------------------------------------ 16-bit float types
struct __nv_bfloat16 {
  uint16_t __x;
};
struct __half {
  uint16_t __x;
};

namespace moespec_emu {
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16_rn(float f);
float half_to_float(uint16_t b);
uint16_t float_to_half_rn(float f);
}  // namespace moespec_emu

inline float __bfloat162float(__nv_bfloat16 h) { return moespec_emu::bf16_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{moespec_emu::float_to_bf16_rn(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline float __half2float(__half h) { return moespec_emu::half_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{moespec_emu::float_to_half_rn(f)}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }

// ------------------------------------------------------------------------ per-thread state
namespace moespec_emu {

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
// The running fiber's coordinates (one emulated launch at a time per process).
extern ThreadState* g_thread;

// Warp collectives. Every lane named in `mask` must arrive at the same kind of collective.
enum Collective : int { kSyncWarp, kShflIdx, kShflUp, kShflDown, kShflXor, kVoteAll, kVoteAny, kVoteBallot, kMma };
const char* collective_name(int kind);
uint64_t warp_collective(int kind, unsigned mask, uint64_t value, int arg);
void syncthreads();

// PTX stand-ins used by the device code's wrapper functions (experts.cuh, common.cuh).
void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d = a * b + c for the whole warp.
void mma_m16n8k16(bool bf16, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void* dynamic_smem();
// griddepcontrol.wait / .launch_dependents (PDL) and the L2 prefetch (common.cuh's seams).
void griddep_wait();
void griddep_launch_dependents();
void prefetch_l2(const void* p, uint32_t bytes);
// The ranges prefetch_l2 saw since the last call (address, bytes), in issue order; clears the log.
std::vector<std::pair<uintptr_t, uint32_t>> take_prefetches();
// Waits until *flag >= value (another block's release): polls, and between polls lets the other
// resident blocks run. Deadlock (no block can make progress) fails the launch.
void wait_geq(const volatile int* flag, int value);
// A bounded wait: returns *flag once it holds every bit of `need`, or earlier when the wait times
// out: when no resident block can make progress (the blocks it waits for are not resident), or at
// random with the rate set_wait_timeout_rate() gives (so tests reach the timeout path without a
// deadlock). The caller must cope with missing bits (recompute them).
int wait_bits(const volatile int* flag, int need);
void set_wait_timeout_rate(double rate);
// Bounded waits that timed out since the last call (clears the count).
int64_t take_wait_timeouts();

// Performance trace (tests/test_perf_model.py, tools/kernel_perf_model.py): with tracing on, every
// launch records, per block, the bytes its cp.async copies read, the bytes its explicit perf_event
// (kBytes) calls report, the longest chain of dependent global round trips any of its threads
// reported, and thread 0's events in program order (each stamped with the block's cp.async bytes so
// far). Count-only mode skips the work the counts do not need: cp.async copies and mma.sync (their
// results are garbage then, so only launches whose control flow does not depend on the loaded
// data may run this way).
enum PerfKind : int { kPerfStage = 1, kPerfPublish = 2, kPerfWait = 3, kPerfRoundTrips = 4, kPerfBytes = 5,
                      kPerfRecompute = 6 };
void perf_event(int kind, int64_t a, int64_t b);
struct PerfEventRec {
  int kind;
  int64_t a, b;
  uint64_t cp_bytes;  // the block's cp.async source bytes issued before the event
};
struct PerfBlock {
  uint64_t block = 0;  // linear block index
  uint64_t cp_bytes = 0, mem_bytes = 0, round_trips = 0;
  std::vector<PerfEventRec> events;
};
struct PerfLaunch {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  bool pdl = false;
  std::vector<PerfBlock> blocks;
};
void set_perf(bool on, bool count_only);
std::vector<PerfLaunch> take_perf();
// The launches since the last call: (kernel name, programmatic dependent launch?), in order.
std::vector<std::pair<std::string, bool>> take_launches();

// A kernel body, called once per emulated thread (a non-owning callable reference).
struct Body {
  void (*call)(void*);
  void* ctx;
};
// pdl: launched with the programmatic-stream-serialization attribute (every thread must call
// griddep_wait before it exits).
cudaError_t launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Body body, bool pdl = false);

// Scheduling seed (also MOESPEC_EMU_SEED); the order of blocks and threads follows from it.
void set_seed(uint64_t seed);
uint64_t seed();

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace moespec_emu

#define threadIdx (::moespec_emu::g_thread->thread_idx)
#define blockIdx (::moespec_emu::g_thread->block_idx)
#define blockDim (::moespec_emu::g_thread->block_dim)
#define gridDim (::moespec_emu::g_thread->grid_dim)

// ------------------------------------------------------------------------ device intrinsics
inline void __syncthreads() { moespec_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  moespec_emu::warp_collective(moespec_emu::kSyncWarp, mask, 0, 0);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  (void)width;
  return moespec_emu::from_bits<T>(moespec_emu::warp_collective(moespec_emu::kShflIdx, mask, moespec_emu::to_bits(v), src));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  (void)width;
  return moespec_emu::from_bits<T>(
      moespec_emu::warp_collective(moespec_emu::kShflUp, mask, moespec_emu::to_bits(v), static_cast<int>(delta)));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  (void)width;
  return moespec_emu::from_bits<T>(
      moespec_emu::warp_collective(moespec_emu::kShflDown, mask, moespec_emu::to_bits(v), static_cast<int>(delta)));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  (void)width;
  return moespec_emu::from_bits<T>(
      moespec_emu::warp_collective(moespec_emu::kShflXor, mask, moespec_emu::to_bits(v), lane_mask));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(moespec_emu::warp_collective(moespec_emu::kVoteAll, mask, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(moespec_emu::warp_collective(moespec_emu::kVoteAny, mask, pred != 0, 0));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(moespec_emu::warp_collective(moespec_emu::kVoteBallot, mask, pred != 0, 0));
}

// Fibers never interleave between two switch points, so read-modify-write is atomic here.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}

// One OS thread runs every block (they interleave only at barriers, collectives and flag waits):
// every store is visible to every later load, so fences have nothing to do.
inline void __threadfence() {}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// ------------------------------------------------------------------------ kernel launch
namespace moespec_emu {
// Calls kernel(args...) in every emulated thread (each thread gets its own copy of the arguments).
template <class... Params, class... Args>
cudaError_t launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<Args&...> args;
  };
  (void)sizeof...(Params);
  Ctx ctx{kernel, std::tuple<Args&...>(args...)};
  Body body{[](void* c) {
              Ctx& x = *static_cast<Ctx*>(c);
              std::apply([&](auto&... a) { x.kernel(a...); }, x.args);
            },
            &ctx};
  return launch(reinterpret_cast<const void*>(kernel), name, grid, block, smem, stream, body);
}

// The same as a programmatic dependent launch (PDL): still synchronous and in order, but every thread
// must call griddep_wait() (the launch fails otherwise).
template <class... Params, class... Args>
cudaError_t launch_kernel_pdl(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                              cudaStream_t stream, Args&&... args) {
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<Args&...> args;
  };
  Ctx ctx{kernel, std::tuple<Args&...>(args...)};
  Body body{[](void* c) {
              Ctx& x = *static_cast<Ctx*>(c);
              std::apply([&](auto&... a) { x.kernel(a...); }, x.args);
            },
            &ctx};
  return launch(reinterpret_cast<const void*>(kernel), name, grid, block, smem, stream, body, true);
}
}  // namespace moespec_emu
