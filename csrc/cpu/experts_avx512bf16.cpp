// AVX-512-BF16 level: the AVX-512 kernels plus bf16 x bf16 dot products with VDPBF16PS (exact
// products, fp32 accumulation) for bf16 weights in the output-major layouts. Built with the
// AVX-512 flags plus -mavx512bf16.
#define MOESPEC_ISA_NS isa_avx512bf16
#define MOESPEC_KERNELS_FN kernels_avx512bf16
#define MOESPEC_BF16_DOT 1
#include "experts_avx512.cpp"
