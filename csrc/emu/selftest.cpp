// Scenarios that check the emulator's semantics (run by tests/test_emu.py). Each is a tiny kernel
// written in the CUDA dialect of csrc/include, so it exercises exactly what the kernels use.
#include "moespec_emu/selftest.h"

#include <functional>
#include <map>

#include "moespec_emu/emu.h"
#include "moespec/common.cuh"  // the launch and flag seams the kernels use

namespace moespec_emu {

// ---- static shared memory of template kernels. GCC drops emu.h's section attribute in template
// instantiations (csrc/emu/shared.ld), and the instantiation's linkage decides where the variable
// lands without it: a COMDAT .bss.<symbol> section for external linkage (like the kernels of
// csrc/include/moespec), a .bss.<symbol> section (-fdata-sections) for internal linkage, which an
// argument of a type from an anonymous namespace gives (Linkage below). The scenarios run both.
// Outside the anonymous namespace, with plain pointer parameters, so that Linkage = void keeps
// external linkage.

// out[b*128 + t] = s[t] and out[b*128 + 64 + t] = w[t] (64 threads), read before the block writes
// them; then the block writes both. s has a dependent type, w does not.
template <int N, class Linkage>
__global__ void poison_template_kernel(int64_t* out) {
  __shared__ int s[N];
  __shared__ int w[64];
  const int t = threadIdx.x, b = blockIdx.x;
  out[b * 128 + t] = s[t];
  out[b * 128 + 64 + t] = w[t];
  __syncthreads();
  s[t] = 1000 + b;
  w[t] = 2000 + b;
}
// flag_chain_kernel (below) as a template, static shared memory only: out[b] = mine, out[16 + b] =
// arr[N - 1], out[32 + i] = the i-th block to pass its wait.
template <int N, class Linkage>
__global__ void flag_chain_template_kernel(int64_t* out, int* counter, int* flags) {
  __shared__ int mine;
  __shared__ int arr[N];
  const int b = blockIdx.x;
  if (threadIdx.x == 0) mine = 100 + b, arr[N - 1] = 300 + b;
  __syncthreads();
  if (b + 1 < static_cast<int>(gridDim.x) && threadIdx.x == 0) wait_geq(flags + b + 1, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    out[b] = mine;
    out[16 + b] = arr[N - 1];
    out[32 + (*counter)++] = b;
    flags[b] = 1;
  }
}

std::vector<PerfLaunchPlain> take_perf_plain() {
  std::vector<PerfLaunchPlain> out;
  for (PerfLaunch& l : take_perf()) {
    PerfLaunchPlain q;
    q.name = l.name;
    q.grid[0] = l.grid.x, q.grid[1] = l.grid.y, q.grid[2] = l.grid.z;
    q.threads = static_cast<uint64_t>(l.block.x) * l.block.y * l.block.z;
    q.smem = l.smem;
    q.pdl = l.pdl;
    for (PerfBlock& b : l.blocks) {
      std::vector<std::tuple<int, int64_t, int64_t, uint64_t>> ev;
      ev.reserve(b.events.size());
      for (const PerfEventRec& e : b.events) ev.emplace_back(e.kind, e.a, e.b, e.cp_bytes);
      q.blocks.emplace_back(b.block, b.cp_bytes, b.mem_bytes, b.round_trips, std::move(ev));
    }
    out.push_back(std::move(q));
  }
  return out;
}

namespace {

struct Internal {};  // a template argument that gives an instantiation internal linkage

struct Out {
  int64_t* v;  // per-scenario results
  int* counter;
};

std::string error_text(cudaError_t err) { return err == cudaSuccess ? "" : cudaGetErrorString(err); }

// ---- mma: fragments packed from the PTX ISA tables (written here independently of emu.cpp)
struct MmaParams {
  bool bf16;
  const uint16_t* a;  // [16][16]
  const uint16_t* b;  // [16][8]
  const float* c;     // [16][8]
  float* d;
};
__global__ void mma_kernel(MmaParams p) {
  const int lane = threadIdx.x, gid = lane / 4, t = lane % 4;
  auto pk = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  // a0,a1: (gid, 2t..2t+1); a2,a3: (gid+8, ...); a4,a5: (gid, 2t+8..); a6,a7: (gid+8, 2t+8..)
  const uint32_t a[4] = {pk(p.a[gid * 16 + 2 * t], p.a[gid * 16 + 2 * t + 1]),
                         pk(p.a[(gid + 8) * 16 + 2 * t], p.a[(gid + 8) * 16 + 2 * t + 1]),
                         pk(p.a[gid * 16 + 2 * t + 8], p.a[gid * 16 + 2 * t + 9]),
                         pk(p.a[(gid + 8) * 16 + 2 * t + 8], p.a[(gid + 8) * 16 + 2 * t + 9])};
  // b0,b1: (k = 2t..2t+1, n = gid); b2,b3: (k = 2t+8.., n = gid)
  const uint32_t b0 = pk(p.b[(2 * t) * 8 + gid], p.b[(2 * t + 1) * 8 + gid]);
  const uint32_t b1 = pk(p.b[(2 * t + 8) * 8 + gid], p.b[(2 * t + 9) * 8 + gid]);
  // c0,c1: (gid, 2t..2t+1); c2,c3: (gid+8, 2t..2t+1)
  float c[4] = {p.c[gid * 8 + 2 * t], p.c[gid * 8 + 2 * t + 1], p.c[(gid + 8) * 8 + 2 * t],
                p.c[(gid + 8) * 8 + 2 * t + 1]};
  mma_m16n8k16(p.bf16, c, a, b0, b1);
  p.d[gid * 8 + 2 * t] = c[0];
  p.d[gid * 8 + 2 * t + 1] = c[1];
  p.d[(gid + 8) * 8 + 2 * t] = c[2];
  p.d[(gid + 8) * 8 + 2 * t + 1] = c[3];
}

// ---- barriers and collectives
__global__ void neighbour_kernel(Out o, int with_barrier) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  s[t] = t;
  if (with_barrier) __syncthreads();
  o.v[t] = s[(t + 1) % 64];  // without the barrier the neighbour may not have written yet
}
__global__ void early_exit_kernel(Out o) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  o.v[threadIdx.x] = 1;
}
__global__ void partial_mask_kernel(Out o) {
  o.v[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}
__global__ void divergent_kernel(Out o) {
  const int lane = threadIdx.x % 32;
  if (lane < 16)
    o.v[threadIdx.x] = __all_sync(0xffffffffu, 1);
  else
    o.v[threadIdx.x] = __shfl_xor_sync(0xffffffffu, lane, 1);
}
__global__ void warp_vs_block_kernel(Out o) {
  if (threadIdx.x == 0)
    __syncthreads();
  else
    __syncwarp();
  o.v[threadIdx.x] = 1;
}
// Per thread (64 threads, 2 warps), 7 results: xor 5, up 3, down 7, idx 9, all(lane < 40),
// any(lane == 31), ballot(lane % 3 == 0); the value shuffled is 10 * threadIdx.x.
__global__ void shuffles_kernel(Out o) {
  const int t = threadIdx.x, lane = t % 32;
  const int v = 10 * t;
  int64_t* r = o.v + 7 * t;
  r[0] = __shfl_xor_sync(0xffffffffu, v, 5);
  r[1] = __shfl_up_sync(0xffffffffu, v, 3);
  r[2] = __shfl_down_sync(0xffffffffu, v, 7);
  r[3] = __shfl_sync(0xffffffffu, v, 9);
  r[4] = __all_sync(0xffffffffu, t < 40);
  r[5] = __any_sync(0xffffffffu, lane == 31);
  r[6] = static_cast<int64_t>(__ballot_sync(0xffffffffu, lane % 3 == 0));
}
// 32 threads: each copies 16 bytes (4 ints) src[4t..4t+3] -> smem; even threads with zero-fill.
// out[3t + 0]: smem word read right after issue; [3t + 1]: after wait_group 0; [3t + 2]: a
// neighbour's word after this thread's own wait (no barrier: may still be in flight).
__global__ void cp_async_kernel(Out o, const int* src, int misalign) {
  __shared__ __align__(16) int s[32 * 4];
  const int t = threadIdx.x;
  const char* from = reinterpret_cast<const char*>(src + 4 * t) + (misalign && t == 3 ? 4 : 0);
  cp_async(&s[4 * t], from, 16, t % 2 == 0 ? 0 : 16);
  o.v[3 * t] = s[4 * t];
  cp_async_commit();
  cp_async_wait(0);
  o.v[3 * t + 1] = s[4 * t];
  o.v[3 * t + 2] = s[4 * ((t + 1) % 32)];
}
// out[t] = a static shared word and out[64 + t] = a dynamic shared word, both read before any write.
__global__ void poison_kernel(Out o) {
  __shared__ int s[64];
  const int* d = static_cast<const int*>(dynamic_smem());
  o.v[threadIdx.x] = s[threadIdx.x];
  o.v[64 + threadIdx.x] = d[threadIdx.x];
}
__global__ void smem_user_a(Out o) { static_cast<char*>(dynamic_smem())[0] = 1, o.v[0] = 1; }
__global__ void smem_user_b(Out o) { static_cast<char*>(dynamic_smem())[0] = 1, o.v[0] = 2; }
__global__ void smem_user_c(Out o) { static_cast<char*>(dynamic_smem())[0] = 1, o.v[0] = 3; }
// The order in which blocks, then threads of block 0, first run.
__global__ void block_order_kernel(Out o) {
  if (threadIdx.x == 0) o.v[(*o.counter)++] = blockIdx.x;
}
__global__ void thread_order_kernel(Out o) {
  __shared__ int n;
  if (threadIdx.x == 0) n = 0;
  __syncthreads();
  o.v[n++] = threadIdx.x;
}

// PDL: threads with threadIdx.x < skip leave without griddepcontrol.wait; the others wait, then write.
__global__ void griddep_kernel(Out o, int skip) {
  if (static_cast<int>(threadIdx.x) < skip) return;
  griddep_launch_dependents();
  griddep_wait();
  o.v[threadIdx.x] = 1;
}
// L2 prefetch of [src + off, src + off + bytes).
__global__ void prefetch_kernel(Out o, const char* src, int off, int bytes) {
  if (threadIdx.x == 0) prefetch_l2(src + off, static_cast<uint32_t>(bytes));
  o.v[threadIdx.x] = 1;
}

template <class... P, class... A>
std::string run_pdl(const char* name, void (*k)(P...), dim3 grid, dim3 block, A... args) {
  return error_text(launch_kernel_pdl(name, k, grid, block, 0, nullptr, args...));
}

// Co-resident blocks: block b waits for block b+1's flag (a chain, so blocks must interleave),
// with static and dynamic shared memory written before the wait and read after it.
// out[b] = the static word read back, out[16 + b] = the dynamic word, out[32 + i] = the i-th
// block to pass its wait; flags[] are zero on entry.
__global__ void flag_chain_kernel(Out o, int* flags) {
  __shared__ int mine;
  int* d = static_cast<int*>(dynamic_smem());
  const int b = blockIdx.x;
  if (threadIdx.x == 0) mine = 100 + b, d[0] = 200 + b;
  __syncthreads();
  if (b + 1 < static_cast<int>(gridDim.x) && threadIdx.x == 0) wait_geq(flags + b + 1, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    o.v[b] = mine;
    o.v[16 + b] = d[0];
    o.v[32 + (*o.counter)++] = b;
    flags[b] = 1;
  }
}
// Every block waits until all blocks arrived (a grid barrier): completes only while the whole
// grid is resident. out[b] = arrivals seen after the wait.
__global__ void grid_barrier_kernel(Out o, int* arrived) {
  if (threadIdx.x == 0) {
    ++*arrived;
    wait_geq(arrived, static_cast<int>(gridDim.x));
    o.v[blockIdx.x] = *arrived;
  }
  __syncthreads();
}
// Block 0 waits on a flag nobody sets.
__global__ void flag_never_set_kernel(Out o, int* flags) {
  if (threadIdx.x == 0 && blockIdx.x == 0) wait_geq(flags, 1);
  __syncthreads();
  o.v[blockIdx.x] = 1;
}

// Bounded waits: block b waits (moespec::flag_wait_bits) for bits 0x5 of block b+1's flag, then
// "computes" its result whether the wait saw them or timed out (a kernel recomputes what it waited
// for), then publishes both bits. out[b] = 100 + b, out[64 + b] = 1 when its wait timed out.
__global__ void bounded_chain_kernel(Out o, int* flags) {
  __shared__ int seen;
  const int b = blockIdx.x;
  if (threadIdx.x == 0) seen = b + 1 < static_cast<int>(gridDim.x) ? moespec::flag_wait_bits(flags + b + 1, 0x5, 1000) : 0x5;
  __syncthreads();
  if (threadIdx.x == 0) {
    o.v[b] = 100 + b;
    o.v[64 + b] = (seen & 0x5) == 0x5 ? 0 : 1;
    moespec::flag_or_release(flags + b, 0x1);
    moespec::flag_or_release(flags + b, 0x4);
  }
}
// Performance trace: every thread issues one 16-byte cp.async (odd threads copy, even ones
// zero-fill: 16 * 16 = 256 source bytes), reports 8 explicit bytes and thread t a chain of t % 5
// round trips; thread 0 reports two stage events (and one after its copy).
__global__ void perf_kernel(Out o, const int* src) {
  __shared__ __align__(16) int s[32 * 4];
  const int t = threadIdx.x;
  if (t == 0) moespec::perf_event(moespec::kPerfStage, 2, 0);
  cp_async(&s[4 * t], src + 4 * t, 16, t % 2 == 0 ? 0 : 16);
  cp_async_commit();
  cp_async_wait(0);
  moespec::perf_event(moespec::kPerfBytes, 8);
  moespec::perf_event(moespec::kPerfRoundTrips, t % 5);
  if (t == 0) moespec::perf_event(moespec::kPerfStage, 7, 1);
  o.v[t] = s[4 * t];
}

template <class... P, class... A>
std::string run(const char* name, void (*k)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
  return error_text(launch_kernel(name, k, grid, block, smem, nullptr, args...));
}

using Scenario = std::function<std::string(Out)>;
const std::map<std::string, Scenario>& scenarios() {
  static const std::map<std::string, Scenario> m = {
      {"barrier_ok", [](Out o) { return run("neighbour_kernel", neighbour_kernel, 1, 64, 0, o, 1); }},
      {"missing_barrier", [](Out o) { return run("neighbour_kernel", neighbour_kernel, 1, 64, 0, o, 0); }},
      {"early_exit_barrier", [](Out o) { return run("early_exit_kernel", early_exit_kernel, 1, 64, 0, o); }},
      {"partial_mask", [](Out o) { return run("partial_mask_kernel", partial_mask_kernel, 1, 32, 0, o); }},
      {"divergent_collective", [](Out o) { return run("divergent_kernel", divergent_kernel, 1, 32, 0, o); }},
      {"warp_vs_block", [](Out o) { return run("warp_vs_block_kernel", warp_vs_block_kernel, 1, 32, 0, o); }},
      {"shuffles", [](Out o) { return run("shuffles_kernel", shuffles_kernel, 1, 64, 0, o); }},
      {"cp_async",
       [](Out o) {
         static int src[32 * 4 + 4] __attribute__((aligned(16)));
         for (int i = 0; i < 32 * 4 + 4; ++i) src[i] = 1000 + i;
         return run("cp_async_kernel", cp_async_kernel, 1, 32, 0, o, static_cast<const int*>(src), 0);
       }},
      {"cp_async_misaligned",
       [](Out o) {
         static int src[32 * 4 + 4] __attribute__((aligned(16)));
         return run("cp_async_kernel", cp_async_kernel, 1, 32, 0, o, static_cast<const int*>(src), 1);
       }},
      {"smem_poison", [](Out o) { return run("poison_kernel", poison_kernel, 1, 64, 256, o); }},
      {"dyn_smem_without_opt_in", [](Out o) { return run("smem_user_c", smem_user_c, 1, 32, 64 * 1024, o); }},
      // Opting in for one kernel must not let another kernel of the same type use more.
      {"dyn_smem_opt_in_per_kernel",
       [](Out o) {
         cudaError_t e = cudaFuncSetAttribute(smem_user_a, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024);
         if (e != cudaSuccess) return error_text(e);
         std::string r = run("smem_user_a", smem_user_a, 1, 32, 96 * 1024, o);
         if (!r.empty()) return "opted-in kernel failed: " + r;
         return run("smem_user_b", smem_user_b, 1, 32, 96 * 1024, o);
       }},
      {"block_too_large", [](Out o) { return run("neighbour_kernel", neighbour_kernel, 1, 2048, 0, o, 1); }},
      {"grid_y_too_large", [](Out o) { return run("neighbour_kernel", neighbour_kernel, dim3(1, 70000), 64, 0, o, 1); }},
      {"block_order", [](Out o) { return run("block_order_kernel", block_order_kernel, 16, 32, 0, o); }},
      {"thread_order", [](Out o) { return run("thread_order_kernel", thread_order_kernel, 1, 64, 0, o); }},
      {"pdl_wait", [](Out o) { return run_pdl("griddep_kernel", griddep_kernel, 2, 64, o, 0); }},
      {"pdl_missing_wait", [](Out o) { return run_pdl("griddep_kernel", griddep_kernel, 2, 64, o, 1); }},
      {"plain_launch_skips_wait", [](Out o) { return run("griddep_kernel", griddep_kernel, 2, 64, 0, o, 1); }},
      {"prefetch_ok",
       [](Out o) {
         static char buf[4096] __attribute__((aligned(16)));
         std::string r = run("prefetch_kernel", prefetch_kernel, 1, 32, 0, o, static_cast<const char*>(buf), 256, 1024);
         const auto log = take_prefetches();
         if (r.empty() && (log.size() != 1 || log[0].first != reinterpret_cast<uintptr_t>(buf + 256) ||
                           log[0].second != 1024))
           return std::string("prefetch log does not hold the one range issued");
         return r;
       }},
      {"prefetch_misaligned",
       [](Out o) {
         static char buf[4096] __attribute__((aligned(16)));
         std::string r = run("prefetch_kernel", prefetch_kernel, 1, 32, 0, o, static_cast<const char*>(buf), 8, 1024);
         take_prefetches();
         return r;
       }},
      {"flag_chain",
       [](Out o) {
         static int flags[16];
         for (int& f : flags) f = 0;
         return run("flag_chain_kernel", flag_chain_kernel, sm_count(), 64, 256, o, static_cast<int*>(flags));
       }},
      // Template kernels: out[0, 256) from the external-linkage instantiation, out[256, 512) from the
      // internal one (2 blocks of 64 threads each).
      {"smem_poison_template",
       [](Out o) {
         std::string r = run("poison_template_kernel", poison_template_kernel<64, void>, 2, 64, 0, o.v);
         if (!r.empty()) return r;
         return run("poison_template_kernel", poison_template_kernel<64, Internal>, 2, 64, 0, o.v + 256);
       }},
      // flag_chain with template kernels: out[0, 64) external linkage, out[64, 128) internal.
      {"flag_chain_template",
       [](Out o) {
         static int flags[16];
         for (int& f : flags) f = 0;
         std::string r = run("flag_chain_template_kernel", flag_chain_template_kernel<8, void>, sm_count(), 64,
                             0, o.v, o.counter, static_cast<int*>(flags));
         if (!r.empty()) return r;
         for (int& f : flags) f = 0;
         int counter = 0;
         return run("flag_chain_template_kernel", flag_chain_template_kernel<8, Internal>, sm_count(), 64, 0,
                    o.v + 64, &counter, static_cast<int*>(flags));
       }},
      {"grid_barrier_resident",
       [](Out o) {
         static int arrived;
         arrived = 0;
         return run("grid_barrier_kernel", grid_barrier_kernel, sm_count(), 32, 0, o, &arrived);
       }},
      {"grid_barrier_oversubscribed",
       [](Out o) {
         static int arrived;
         arrived = 0;
         return run("grid_barrier_kernel", grid_barrier_kernel, sm_count() + 1, 32, 0, o, &arrived);
       }},
      {"bounded_chain",
       [](Out o) {
         static int flags[64];
         for (int& f : flags) f = 0;
         return run("bounded_chain_kernel", bounded_chain_kernel, sm_count(), 32, 0, o, static_cast<int*>(flags));
       }},
      // griddep_kernel through the kernels' own seam (moespec::launch_kernel_pdl): a PDL launch only
      // when the image has griddepcontrol.wait (emu_set_image_arch >= 90), else a plain one.
      {"pdl_by_image",
       [](Out o) {
         return error_text(moespec::launch_kernel_pdl("griddep_kernel", griddep_kernel, 2, 64, 0, nullptr, o, 0));
       }},
      {"perf_counts",
       [](Out o) {
         static int src[32 * 4] __attribute__((aligned(16)));
         for (int i = 0; i < 32 * 4; ++i) src[i] = 1000 + i;
         return run("perf_kernel", perf_kernel, 2, 32, 0, o, static_cast<const int*>(src));
       }},
      {"flag_never_set",
       [](Out o) {
         static int flags[1];
         flags[0] = 0;
         return run("flag_never_set_kernel", flag_never_set_kernel, 3, 32, 0, o, static_cast<int*>(flags));
       }},
  };
  return m;
}

}  // namespace

std::string selftest_mma(bool bf16, const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  return error_text(launch_kernel("mma_kernel", mma_kernel, 1, 32, 0, nullptr, MmaParams{bf16, a, b, c, d}));
}

std::string selftest(const std::string& name, std::vector<int64_t>* out) {
  const auto it = scenarios().find(name);
  if (it == scenarios().end()) return "no such self-test: " + name;
  out->assign(512, -7);  // -7: never written
  int counter = 0;
  return it->second(Out{out->data(), &counter});
}

std::vector<std::string> selftest_names() {
  std::vector<std::string> names;
  for (const auto& kv : scenarios()) names.push_back(kv.first);
  return names;
}

uint16_t to_bf16(float f) { return float_to_bf16_rn(f); }
uint16_t to_half(float f) { return float_to_half_rn(f); }
float from_bf16(uint16_t b) { return bf16_to_float(b); }
float from_half(uint16_t b) { return half_to_float(b); }

}  // namespace moespec_emu
