// Host launcher of the budgeted grouped SwiGLU experts (device code: csrc/include/moespec/experts.cuh).
#include <cuda_runtime.h>

#include <string>

#include "moespec/api.h"
#include "moespec/experts.cuh"
#include "moespec/experts_v2.cuh"

namespace moespec {
namespace {

using experts::ExpertsParams;

// Opt in to more than 48 KiB of dynamic shared memory, once per kernel and device. The driver
// keeps this attribute per kernel, so the "done" record must be per kernel too: the kernel is a
// template argument (all GEMM kernels share one function type, so a static keyed by type would
// let only the first kernel launched opt in).
template <auto Kernel>
cudaError_t allow_smem(int bytes) {
  static unsigned done_mask = 0;  // bit d: done on device d (host-side, a benign race at worst)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const unsigned bit = dev < 32 ? (1u << dev) : 0u;
  if (bit != 0 && (done_mask & bit)) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done_mask |= bit;
  return err;
}

template <bool BF16, bool TRANS>
std::string launch_typed(const ExpertsParams& p, int max_experts, cudaStream_t stream) {
  constexpr int smem = experts::smem_bytes<TRANS>();
  constexpr auto k1 = experts::gemm1_swiglu_kernel<BF16, TRANS>;
  constexpr auto k2 = experts::gemm2_combine_kernel<BF16, TRANS>;
  cudaError_t err = allow_smem<k1>(smem);
  if (err == cudaSuccess) err = allow_smem<k2>(smem);
  if (err != cudaSuccess) return std::string("moe_experts: cannot reserve shared memory: ") + cudaGetErrorString(err);

  const dim3 grid1((p.I + experts::kGateUpTile - 1) / experts::kGateUpTile, max_experts, p.ksplit1);
  err = launch_kernel("gemm1_swiglu_kernel", k1, grid1, dim3(experts::kThreads), smem, stream, p);
  if (err != cudaSuccess) return std::string("moe_experts: GEMM1 launch failed: ") + cudaGetErrorString(err);
  if (p.ksplit1 > 1) {
    const dim3 grid_act((p.I + 127) / 128, max_experts);
    err = launch_kernel("swiglu_kernel", experts::swiglu_kernel<BF16>, grid_act, dim3(128), 0, stream, p);
    if (err != cudaSuccess) return std::string("moe_experts: SwiGLU launch failed: ") + cudaGetErrorString(err);
  }

  if (p.atomic) {
    err = cudaMemsetAsync(p.ybuf, 0, sizeof(float) * static_cast<size_t>(p.T) * p.H, stream);
    if (err != cudaSuccess) return std::string("moe_experts: memset failed: ") + cudaGetErrorString(err);
  }
  const dim3 grid2((p.H + experts::kBM - 1) / experts::kBM, max_experts, p.ksplit);
  err = launch_kernel("gemm2_combine_kernel", k2, grid2, dim3(experts::kThreads), smem, stream, p);
  if (err != cudaSuccess) return std::string("moe_experts: GEMM2 launch failed: ") + cudaGetErrorString(err);

  const long long total = static_cast<long long>(p.T) * p.H;
  long long blocks = (total + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  err = launch_kernel("combine_kernel", experts::combine_kernel<BF16>, dim3(static_cast<unsigned>(blocks)), dim3(256), 0,
                      stream, p);
  if (err != cudaSuccess) return std::string("moe_experts: combine launch failed: ") + cudaGetErrorString(err);
  return "";
}

// The generation-2 grid: the SM count x the CTAs per SM the occupancy calculator allows for its
// shared memory (1 on sm_80/sm_90). Any grid is correct (the waits are bounded); this one is the
// largest that can be resident at once on an otherwise idle device.
template <bool BF16, bool TRANS>
cudaError_t v2_resident_grid(int smem, int* grid) {
  int dev = 0, sms = 0, per = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, experts_v2::persistent_experts_kernel<BF16, TRANS>,
                                                        experts_v2::kThreads, smem);
  if (err != cudaSuccess) return err;
  *grid = (sms > 0 ? sms : 1) * (per > 0 ? per : 1);
  return cudaSuccess;
}

// Generation 2: the persistent kernel (PDL dependent of the plan), then its combine kernel (PDL
// dependent of the persistent kernel).
template <bool BF16, bool TRANS>
std::string launch_v2_typed(const ExpertsParams& p, int64_t counters_len, int asked_grid, cudaStream_t stream) {
  int dev = 0, major = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return std::string("moe_experts v2: cannot query the device: ") + cudaGetErrorString(err);
  const int smem = experts_v2::smem_bytes(major);
  // All of the kernel's shared memory is dynamic (no static __shared__: docs/kernel-resources.md).
  if (smem > optin)
    return "moe_experts v2: needs " + std::to_string(smem) +
           " bytes of shared memory per block, this GPU allows " + std::to_string(optin) +
           " (A100/H100/H200 class parts have enough); use MOESPEC_KERNELS=v1";
  constexpr auto kern = experts_v2::persistent_experts_kernel<BF16, TRANS>;
  err = allow_smem<kern>(smem);
  if (err != cudaSuccess)
    return std::string("moe_experts v2: cannot reserve shared memory: ") + cudaGetErrorString(err);
  int grid = asked_grid;
  if (grid <= 0) {
    err = v2_resident_grid<BF16, TRANS>(smem, &grid);
    if (err != cudaSuccess) return std::string("moe_experts v2: cannot size the grid: ") + cudaGetErrorString(err);
  }
  if (counters_len < experts_v2::counters_len(grid))
    return "moe_experts v2: the counters buffer has " + std::to_string(counters_len) + " ints, needs " +
           std::to_string(experts_v2::counters_len(grid)) + " for a grid of " + std::to_string(grid) +
           " (experts_v2_counters_len)";
  // No memset here: the flags (and the atomic accumulator) are zero on entry and the combine kernel
  // leaves them zero (the caller allocates them zeroed once), so nothing sits between the routing
  // plan and this programmatic dependent launch.
  err = launch_kernel_pdl("persistent_experts_kernel", kern, dim3(grid), dim3(experts_v2::kThreads), smem,
                          stream, p);
  if (err != cudaSuccess) return std::string("moe_experts v2: launch failed: ") + cudaGetErrorString(err);
  // The combine: enough blocks to cover the outputs once (a grid-stride loop takes the rest).
  const int split = p.atomic ? 1 : experts_v2::combine_split(p.nslices);
  const long long groups = static_cast<long long>(p.T) * (p.H / 4);
  const long long per_block = experts_v2::kCombineThreads / split;
  long long blocks = (groups + per_block - 1) / per_block;
  if (blocks > 4096) blocks = 4096;
  err = launch_kernel_pdl("combine_v2_kernel", experts_v2::combine_v2_kernel<BF16>,
                          dim3(static_cast<unsigned>(blocks)), dim3(experts_v2::kCombineThreads), 0, stream, p,
                          grid);
  if (err != cudaSuccess) return std::string("moe_experts v2: combine launch failed: ") + cudaGetErrorString(err);
  return "";
}

void split_k(int K, int asked, int* splits, int* chunk) {
  const int ktiles = (K + experts::kBK - 1) / experts::kBK;
  const int want = asked < 1 ? 1 : (asked > ktiles ? ktiles : asked);
  const int tiles_per = (ktiles + want - 1) / want;
  *chunk = tiles_per * experts::kBK;
  *splits = (ktiles + tiles_per - 1) / tiles_per;
}

}  // namespace

int experts_v2_slice() { return experts_v2::kSlice; }

int experts_v2_grid() {
  int dev = 0, major = 0, grid = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return -1;
  // Both instantiations have the same shared memory and block, so one answers for all.
  if (v2_resident_grid<true, false>(experts_v2::smem_bytes(major), &grid) != cudaSuccess) return -1;
  return grid;
}

int64_t experts_v2_counters_len(int grid) { return grid < 1 ? -1 : experts_v2::counters_len(grid); }

std::string launch_moe_experts(const ExpertsArgs& a, int64_t stream) {
  if (a.dtype != 1 && a.dtype != 2) return "moe_experts: only bf16 (1) and fp16 (2) activations have kernels";
  if (a.T < 1 || a.k < 1 || a.H < 8 || a.I < 8) return "moe_experts: T, k must be >= 1 and H, I >= 8";
  if (a.H % 8 != 0 || a.I % 8 != 0)
    return "moe_experts: H and I must be multiples of 8, got H=" + std::to_string(a.H) + " I=" + std::to_string(a.I);
  if (a.x_stride % 8 != 0) return "moe_experts: x row stride must be a multiple of 8 elements";
  const uintptr_t aligned = a.x | a.w_gu | a.w_down | a.hbuf;
  if (aligned % 16 != 0) return "moe_experts: x, weights and workspace must be 16-byte aligned";
  if (a.order < 0 || a.order > 2 || a.activation < 0 || a.activation > 1) return "moe_experts: bad layout codes";
  if (a.generation != 1 && a.generation != 2) return "moe_experts: generation must be 1 or 2";
  if (a.generation == 2 && a.counters == 0) return "moe_experts: generation 2 needs the counters buffer";
  if (a.generation == 2 && a.k > experts_v2::kMaxSlots)
    return "moe_experts: generation 2 handles top-k up to " + std::to_string(experts_v2::kMaxSlots);
  if (a.max_experts < 1 || a.max_experts > 65535) return "moe_experts: max_experts must be in [1, 65535]";
  if (a.x == 0 || a.w_gu == 0 || a.w_down == 0 || a.meta == 0 || a.act_experts == 0 || a.act_offsets == 0 ||
      a.pair_token == 0 || a.pair_slot == 0 || a.pair_position == 0 || a.weights == 0 || a.hbuf == 0 ||
      a.ybuf == 0 || a.out == 0)
    return "moe_experts: a buffer is missing";
  ExpertsParams p{};
  p.x = reinterpret_cast<const uint16_t*>(a.x);
  p.x_stride = a.x_stride;
  p.w_gu = reinterpret_cast<const uint16_t*>(a.w_gu);
  p.w_down = reinterpret_cast<const uint16_t*>(a.w_down);
  p.b_gu = reinterpret_cast<const float*>(a.b_gu);
  p.b_down = reinterpret_cast<const float*>(a.b_down);
  p.T = a.T;
  p.k = a.k;
  p.H = a.H;
  p.I = a.I;
  p.order = a.order;
  p.activation = a.activation;
  p.alpha = static_cast<float>(a.alpha);
  p.limit = static_cast<float>(a.limit);
  p.meta = reinterpret_cast<const int*>(a.meta);
  p.act_experts = reinterpret_cast<const int*>(a.act_experts);
  p.act_offsets = reinterpret_cast<const int*>(a.act_offsets);
  p.pair_token = reinterpret_cast<const int*>(a.pair_token);
  p.pair_slot = reinterpret_cast<const int*>(a.pair_slot);
  p.pair_position = reinterpret_cast<const int*>(a.pair_position);
  p.weights = reinterpret_cast<const float*>(a.weights);
  p.hbuf = reinterpret_cast<uint16_t*>(a.hbuf);
  p.ybuf = reinterpret_cast<float*>(a.ybuf);
  p.out = reinterpret_cast<uint16_t*>(a.out);
  p.atomic = a.atomic;
  // Split K into chunks of whole pipeline stages; the effective count can be smaller than asked
  // (never larger, so buffers sized for the request suffice), and every split has work.
  split_k(a.I, a.ksplit, &p.ksplit, &p.kchunk);
  split_k(a.H, a.gubuf != 0 ? a.ksplit1 : 1, &p.ksplit1, &p.kchunk1);
  p.gubuf = reinterpret_cast<float*>(a.gubuf);
  p.counters = reinterpret_cast<int*>(a.counters);
  p.nslices = (a.I + experts_v2::kSlice - 1) / experts_v2::kSlice;
  p.wait_ns = a.wait_ns;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool bf16 = a.dtype == 1;
  if (a.generation == 2) {
    const int64_t n = a.counters_len;
    const int g = a.grid;
    if (bf16) return a.transposed ? launch_v2_typed<true, true>(p, n, g, s) : launch_v2_typed<true, false>(p, n, g, s);
    return a.transposed ? launch_v2_typed<false, true>(p, n, g, s) : launch_v2_typed<false, false>(p, n, g, s);
  }
  if (bf16) return a.transposed ? launch_typed<true, true>(p, a.max_experts, s) : launch_typed<true, false>(p, a.max_experts, s);
  return a.transposed ? launch_typed<false, true>(p, a.max_experts, s) : launch_typed<false, false>(p, a.max_experts, s);
}

}  // namespace moespec
