// Run-time ISA detection and the MOESPEC_CPU_ISA cap (docs/cpu-kernels.md).
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace moespec {
namespace cpu {

const char* isa_name(int isa) {
  switch (isa) {
    case kScalar: return "scalar";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    case kAvx512Bf16: return "avx512bf16";
    default: return "?";
  }
}

// Highest level compiled into this build (the ISA sources are built only on x86-64 compilers
// that accept the flags; see CMakeLists.txt).
static int compiled_max() {
#if defined(MOESPEC_CPU_HAVE_AVX512BF16)
  return kAvx512Bf16;
#elif defined(MOESPEC_CPU_HAVE_AVX512)
  return kAvx512;
#elif defined(MOESPEC_CPU_HAVE_AVX2)
  return kAvx2;
#else
  return kScalar;
#endif
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= compiled_max(); ++i) out.push_back(isa_name(i));
  return out;
}

static int detect() {
  int best = kScalar;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = kAvx2;
  if (best == kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = kAvx512;
  if (best == kAvx512 && __builtin_cpu_supports("avx512bf16")) best = kAvx512Bf16;
#endif
  return best < compiled_max() ? best : compiled_max();
}

int detected_isa() {
  static const int isa = detect();
  return isa;
}

int active_isa(std::string* err) {
  const int best = detected_isa();
  const char* env = std::getenv("MOESPEC_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) return best;
  for (int i = kScalar; i <= kAvx512Bf16; ++i) {
    if (std::strcmp(env, isa_name(i)) == 0) return i < best ? i : best;  // a cap, never a raise
  }
  if (err != nullptr)
    *err = std::string("MOESPEC_CPU_ISA must be one of auto, scalar, avx2, avx512, avx512bf16, got '") + env + "'";
  return -1;
}

}  // namespace cpu
}  // namespace moespec
