// Self-tests of the emulator itself (tests/test_emu.py calls them through moespec._C in an
// emulation build). Plain C++ signatures: bindings.cpp includes this without the emulated CUDA.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace moespec_emu {

void set_seed(uint64_t seed);
uint64_t seed();
// Emulated SM count (default 5): cudaDevAttrMultiProcessorCount and the resident blocks per launch.
int sm_count();
void set_sm_count(int n);

// One warp-wide mma.m16n8k16: a [16x16] row-major, b [16x8] (k, n) row-major, both as 16-bit
// float bits (bf16 or fp16), c and d [16x8] fp32. Fragments are packed by this test's own code.
std::string selftest_mma(bool bf16, const uint16_t* a, const uint16_t* b, const float* c, float* d);

// Runs the named scenario; returns "" when the launch succeeded or the emulator's error message.
// `out` receives whatever values the scenario reports (documented next to each in selftest.cpp).
std::string selftest(const std::string& name, std::vector<int64_t>* out);

// Competing resident blocks (0: none), the loaded image's architecture, random timeouts of bounded
// waits and their count (emu.h has the details).
int resident_limit();
void set_resident_limit(int n);
int image_arch();
void set_image_arch(int arch);
void set_wait_timeout_rate(double rate);
int64_t take_wait_timeouts();
// The launches since the last call: (kernel name, launched as a programmatic dependent?).
std::vector<std::pair<std::string, bool>> take_launches();
// Performance trace (emu.h): tracing on/off, count-only mode; the launches traced since the last call.
void set_perf(bool on, bool count_only);
struct PerfLaunchPlain {
  std::string name;
  uint64_t grid[3];
  uint64_t threads, smem;
  bool pdl;
  // per block: (linear index, cp.async bytes, explicit bytes, longest round-trip chain,
  //             thread 0's events (kind, a, b, cp.async bytes before it))
  std::vector<std::tuple<uint64_t, uint64_t, uint64_t, uint64_t,
                         std::vector<std::tuple<int, int64_t, int64_t, uint64_t>>>> blocks;
};
std::vector<PerfLaunchPlain> take_perf_plain();

// The L2 prefetch ranges (address, bytes) emulated kernels issued since the last call; clears them.
std::vector<std::pair<uintptr_t, uint32_t>> take_prefetches();
std::vector<std::string> selftest_names();

uint16_t to_bf16(float f);
uint16_t to_half(float f);
float from_bf16(uint16_t b);
float from_half(uint16_t b);

}  // namespace moespec_emu
