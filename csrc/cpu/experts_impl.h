// The experts' work items, written once over a vector type `V` and compiled once per ISA level
// (experts_scalar.cpp, experts_avx2.cpp, experts_avx512.cpp, experts_avx512bf16.cpp). Each
// including file defines MOESPEC_ISA_NS and, inside moespec::cpu::MOESPEC_ISA_NS, a struct V:
//   R (register type), W (fp32 lanes), zero(), set1(f), loadf(p), storef(p, r), fma(a, b, c),
//   hsum(r), hsum4(a, b, c, d, out4), and load(p, TagF32 / TagBF16 / TagF16) converting W weights to fp32.
// Everything here lives in that per-ISA namespace and has internal linkage, so no symbol compiled
// with one ISA's instructions can be picked by the linker for another level.
//
// Summation order (determinism): every output element is one dot product over K, accumulated
// in W lanes in K order, reduced by hsum (a short last vector zero-padded); it does not depend on the
// thread count or on which thread runs an item. Weights stream once per item: a tile of rows
// (or columns) is loaded once per block of 4 tokens, which it serves from L1.
#pragma once

#include <cmath>
#include <cstdint>

#include "convert.h"
#include "experts_ctx.h"

namespace moespec {
namespace cpu {
namespace MOESPEC_ISA_NS {
namespace {

struct TagF32 {
  using T = float;
  static constexpr bool kBf16 = false;
  static float scalar(const float* p) { return *p; }
};
struct TagBF16 {
  using T = uint16_t;
  static constexpr bool kBf16 = true;
  static float scalar(const uint16_t* p) { return bf16_to_float(*p); }
};
struct TagF16 {
  using T = uint16_t;
  static constexpr bool kBf16 = false;
  static float scalar(const uint16_t* p) { return half_to_float(*p); }
};

inline int imin(int a, int b) { return a < b ? a : b; }

// outs[t][r_off + r] = dot(w + r * ldw, xs[t], K) for r < RB, t < TB. Lane l of the accumulator
// sums the positions k = l (mod W) in K order, whatever K is (a short last vector is zero-padded),
// so appending positions whose products are zero (zero-padded intermediate columns) changes no bit.
template <class Tag, int RB, int TB>
inline void dot_tile(const typename Tag::T* w, int64_t ldw, const float* const* xs, int K, float* const* outs,
                     int r_off) {
  using T = typename Tag::T;
  typename V::R acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = V::zero();
  int kk = 0;
  for (; kk + V::W <= K; kk += V::W) {
    typename V::R wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = V::load(w + r * ldw + kk, Tag());
    for (int t = 0; t < TB; ++t) {
      const typename V::R xv = V::loadf(xs[t] + kk);
      for (int r = 0; r < RB; ++r) acc[r][t] = V::fma(wv[r], xv, acc[r][t]);
    }
  }
  if (kk < K) {  // the last, partial vector, zero-padded
    T wpad[RB][V::W];
    float xpad[V::W];
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < V::W; ++j) wpad[r][j] = kk + j < K ? w[r * ldw + kk + j] : T(0);
    typename V::R wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = V::load(wpad[r], Tag());
    for (int t = 0; t < TB; ++t) {
      for (int j = 0; j < V::W; ++j) xpad[j] = kk + j < K ? xs[t][kk + j] : 0.f;
      const typename V::R xv = V::loadf(xpad);
      for (int r = 0; r < RB; ++r) acc[r][t] = V::fma(wv[r], xv, acc[r][t]);
    }
  }
  for (int t = 0; t < TB; ++t) {
    // Each sum depends only on its own accumulator, so padding a short tile changes no bits.
    float s[4];
    const typename V::R z = V::zero();
    V::hsum4(acc[0][t], RB > 1 ? acc[RB > 1 ? 1 : 0][t] : z, RB > 2 ? acc[RB > 2 ? 2 : 0][t] : z,
             RB > 3 ? acc[RB > 3 ? 3 : 0][t] : z, s);
    for (int r = 0; r < RB; ++r) outs[t][r_off + r] = s[r];
  }
}

// out[p * ldo + r] = dot(W row r, xs[p]) for rows [r0, r1) of w (row stride ldw) and p < n.
template <class Tag>
void dot_rows(const typename Tag::T* w, int64_t ldw, int r0, int r1, const float* const* xs, int n, int K,
              float* out, int64_t ldo) {
  float* outs[4];
  for (int r = r0; r < r1; r += 4) {  // rows outer: each weight tile is read from memory once
    const int rb = imin(4, r1 - r);
    const typename Tag::T* wr = w + (int64_t)r * ldw;
    for (int p = 0; p < n; p += 4) {
      const int tb = imin(4, n - p);
      for (int t = 0; t < tb; ++t) outs[t] = out + (int64_t)(p + t) * ldo;
#define MOESPEC_DOT(RB, TB) \
  case (RB - 1) * 4 + (TB - 1): dot_tile<Tag, RB, TB>(wr, ldw, xs + p, K, outs, r); break;
      switch ((rb - 1) * 4 + (tb - 1)) {
        MOESPEC_DOT(1, 1) MOESPEC_DOT(1, 2) MOESPEC_DOT(1, 3) MOESPEC_DOT(1, 4)
        MOESPEC_DOT(2, 1) MOESPEC_DOT(2, 2) MOESPEC_DOT(2, 3) MOESPEC_DOT(2, 4)
        MOESPEC_DOT(3, 1) MOESPEC_DOT(3, 2) MOESPEC_DOT(3, 3) MOESPEC_DOT(3, 4)
        MOESPEC_DOT(4, 1) MOESPEC_DOT(4, 2) MOESPEC_DOT(4, 3) MOESPEC_DOT(4, 4)
        default: break;
      }
#undef MOESPEC_DOT
    }
  }
}

// outs[t][c + j] = sum_k xs[t][k] * w[k * ldw + c + j] for j < CV * W, t < TB.
template <class Tag, int CV, int TB>
inline void axpy_tile(const typename Tag::T* w, int64_t ldw, int c, const float* const* xs, int K,
                      float* const* outs) {
  typename V::R acc[CV][TB];
  for (int j = 0; j < CV; ++j)
    for (int t = 0; t < TB; ++t) acc[j][t] = V::zero();
  for (int kk = 0; kk < K; ++kk) {
    const typename Tag::T* wr = w + (int64_t)kk * ldw + c;
    typename V::R wv[CV];
    for (int j = 0; j < CV; ++j) wv[j] = V::load(wr + j * V::W, Tag());
    for (int t = 0; t < TB; ++t) {
      const typename V::R xb = V::set1(xs[t][kk]);
      for (int j = 0; j < CV; ++j) acc[j][t] = V::fma(wv[j], xb, acc[j][t]);
    }
  }
  for (int j = 0; j < CV; ++j)
    for (int t = 0; t < TB; ++t) V::storef(outs[t] + c + j * V::W, acc[j][t]);
}

// out[p * ldo + c] = sum_k xs[p][k] * w[k * ldw + c] for columns [c0, c1) and p < n
// (transposed weights: K rows of ldw columns).
template <class Tag>
void axpy_cols(const typename Tag::T* w, int64_t ldw, int c0, int c1, const float* const* xs, int n, int K,
               float* out, int64_t ldo) {
  float* outs[4];
  constexpr int kBlock = 4 * V::W;
  int c = c0;
  for (; c < c1; c += kBlock) {
    const int cv = imin(4, (c1 - c) / V::W);
    if (cv == 0) break;
    for (int p = 0; p < n; p += 4) {
      const int tb = imin(4, n - p);
      for (int t = 0; t < tb; ++t) outs[t] = out + (int64_t)(p + t) * ldo;
#define MOESPEC_AXPY(CV, TB) \
  case (CV - 1) * 4 + (TB - 1): axpy_tile<Tag, CV, TB>(w, ldw, c, xs + p, K, outs); break;
      switch ((cv - 1) * 4 + (tb - 1)) {
        MOESPEC_AXPY(1, 1) MOESPEC_AXPY(1, 2) MOESPEC_AXPY(1, 3) MOESPEC_AXPY(1, 4)
        MOESPEC_AXPY(2, 1) MOESPEC_AXPY(2, 2) MOESPEC_AXPY(2, 3) MOESPEC_AXPY(2, 4)
        MOESPEC_AXPY(3, 1) MOESPEC_AXPY(3, 2) MOESPEC_AXPY(3, 3) MOESPEC_AXPY(3, 4)
        MOESPEC_AXPY(4, 1) MOESPEC_AXPY(4, 2) MOESPEC_AXPY(4, 3) MOESPEC_AXPY(4, 4)
        default: break;
      }
#undef MOESPEC_AXPY
    }
    if (cv < 4) {
      c += cv * V::W;
      break;
    }
  }
  for (; c < c1; ++c)  // fewer than W columns left: one column at a time, K in order
    for (int p = 0; p < n; ++p) {
      float s = 0.f;
      for (int kk = 0; kk < K; ++kk) s += xs[p][kk] * Tag::scalar(w + (int64_t)kk * ldw + c);
      out[(int64_t)p * ldo + c] = s;
    }
}

#ifdef MOESPEC_BF16_DOT
// bf16 x bf16 dot products with VDPBF16PS (pairs of exact products, fp32 accumulation).
template <int RB, int TB>
inline void dot_tile_bf16(const uint16_t* w, int64_t ldw, const uint16_t* const* xs, int K, float* const* outs,
                          int r_off) {
  __m512 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  int kk = 0;
  for (; kk + 32 <= K; kk += 32) {
    __m512i wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_si512(w + r * ldw + kk);
    for (int t = 0; t < TB; ++t) {
      const __m512i xv = _mm512_loadu_si512(xs[t] + kk);
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (kk < K) {  // masked tail: the lanes past K load zeros and add nothing
    const __mmask32 m = (__mmask32)((1ull << (K - kk)) - 1ull);
    __m512i wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * ldw + kk);
    for (int t = 0; t < TB; ++t) {
      const __m512i xv = _mm512_maskz_loadu_epi16(m, xs[t] + kk);
      for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int t = 0; t < TB; ++t) {
    float s[4];
    const __m512 z = _mm512_setzero_ps();
    V::hsum4(acc[0][t], RB > 1 ? acc[RB > 1 ? 1 : 0][t] : z, RB > 2 ? acc[RB > 2 ? 2 : 0][t] : z,
             RB > 3 ? acc[RB > 3 ? 3 : 0][t] : z, s);
    for (int r = 0; r < RB; ++r) outs[t][r_off + r] = s[r];
  }
}

void dot_rows_bf16(const uint16_t* w, int64_t ldw, int r0, int r1, const uint16_t* const* xs, int n, int K,
                   float* out, int64_t ldo) {
  float* outs[4];
  for (int r = r0; r < r1; r += 4) {
    const int rb = imin(4, r1 - r);
    const uint16_t* wr = w + (int64_t)r * ldw;
    for (int p = 0; p < n; p += 4) {
      const int tb = imin(4, n - p);
      for (int t = 0; t < tb; ++t) outs[t] = out + (int64_t)(p + t) * ldo;
#define MOESPEC_DOT(RB, TB) \
  case (RB - 1) * 4 + (TB - 1): dot_tile_bf16<RB, TB>(wr, ldw, xs + p, K, outs, r); break;
      switch ((rb - 1) * 4 + (tb - 1)) {
        MOESPEC_DOT(1, 1) MOESPEC_DOT(1, 2) MOESPEC_DOT(1, 3) MOESPEC_DOT(1, 4)
        MOESPEC_DOT(2, 1) MOESPEC_DOT(2, 2) MOESPEC_DOT(2, 3) MOESPEC_DOT(2, 4)
        MOESPEC_DOT(3, 1) MOESPEC_DOT(3, 2) MOESPEC_DOT(3, 3) MOESPEC_DOT(3, 4)
        MOESPEC_DOT(4, 1) MOESPEC_DOT(4, 2) MOESPEC_DOT(4, 3) MOESPEC_DOT(4, 4)
        default: break;
      }
#undef MOESPEC_DOT
    }
  }
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// ---- token-major path: when an expert has enough tokens to fill most of a vector, the vector
// runs over its tokens instead of over K: out[r][t] = sum_k w[r][k] * xt[k][t] with the weight
// broadcast, so no horizontal reductions at all (they dominate the dot products for small K).
// Each output is one FMA chain over k in order: deterministic.

inline bool token_major(int n) { return V::W > 1 && 4 * n >= 3 * V::W; }
inline int pad_tokens(int n) { return (n + V::W - 1) / V::W * V::W; }

// out[r * ldo + v * W + lane] = sum_k w[r * ldw + k] * xt[k * ldx + v * W + lane], r < RB, v < TV.
template <int RB, int TV>
inline void tm_tile(const float* w, int64_t ldw, const float* xt, int64_t ldx, int K, float* out, int64_t ldo) {
  typename V::R acc[RB][TV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < TV; ++v) acc[r][v] = V::zero();
  for (int kk = 0; kk < K; ++kk) {
    typename V::R xv[TV];
    for (int v = 0; v < TV; ++v) xv[v] = V::loadf(xt + (int64_t)kk * ldx + v * V::W);
    for (int r = 0; r < RB; ++r) {
      const typename V::R wb = V::set1(w[r * ldw + kk]);
      for (int v = 0; v < TV; ++v) acc[r][v] = V::fma(wb, xv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < TV; ++v) V::storef(out + r * ldo + v * V::W, acc[r][v]);
}

// Up to 4 weight rows as fp32 (converted into scratch unless they already are): returns the row pointer and stride.
template <class Tag>
inline const float* rows_f32(const typename Tag::T* w, int64_t ldw, int rb, int K, float* scratch, int64_t* ld) {
  if (sizeof(typename Tag::T) == 4) {
    *ld = ldw;
    return reinterpret_cast<const float*>(w);
  }
  for (int r = 0; r < rb; ++r) {
    int kk = 0;
    for (; kk + V::W <= K; kk += V::W) V::storef(scratch + (int64_t)r * K + kk, V::load(w + r * ldw + kk, Tag()));
    for (; kk < K; ++kk) scratch[(int64_t)r * K + kk] = Tag::scalar(w + r * ldw + kk);
  }
  *ld = K;
  return scratch;
}

// Rows [r0, r1) of w times the token-major xt [K, npad]: out[r * ldo + t] for t < npad.
// `scratch` holds 4 * K floats. After each block of rows, epi(r, rb) may consume them.
template <class Tag, class Epi>
void tm_rows(const typename Tag::T* w, int64_t ldw, int r0, int r1, const float* xt, int npad, int K, float* out,
             int64_t ldo, float* scratch, Epi epi) {
  const int nv = npad / V::W;
  for (int r = r0; r < r1; r += 4) {
    const int rb = imin(4, r1 - r);
    int64_t lds;
    const float* wf = rows_f32<Tag>(w + (int64_t)r * ldw, ldw, rb, K, scratch, &lds);
    float* o = out + (int64_t)r * ldo;
    for (int v = 0; v < nv; v += 4) {
      const int tv = imin(4, nv - v);
#define MOESPEC_TM(RB, TV) \
  case (RB - 1) * 4 + (TV - 1): tm_tile<RB, TV>(wf, lds, xt + v * V::W, npad, K, o + v * V::W, ldo); break;
      switch ((rb - 1) * 4 + (tv - 1)) {
        MOESPEC_TM(1, 1) MOESPEC_TM(1, 2) MOESPEC_TM(1, 3) MOESPEC_TM(1, 4)
        MOESPEC_TM(2, 1) MOESPEC_TM(2, 2) MOESPEC_TM(2, 3) MOESPEC_TM(2, 4)
        MOESPEC_TM(3, 1) MOESPEC_TM(3, 2) MOESPEC_TM(3, 3) MOESPEC_TM(3, 4)
        MOESPEC_TM(4, 1) MOESPEC_TM(4, 2) MOESPEC_TM(4, 3) MOESPEC_TM(4, 4)
        default: break;
      }
#undef MOESPEC_TM
    }
    epi(r, rb);
  }
}

inline float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// The gated activation of one (gate, up) pair, as moespec.reference._gated_activation.
inline float activate(const ExpertsCtx& c, float g, float u) {
  if (c.activation == 0) return g / (1.f + std::exp(-g)) * u;
  g = g > c.limit ? c.limit : g;  // comparisons keep NaN, like torch.clamp
  u = u > c.limit ? c.limit : (u < -c.limit ? -c.limit : u);
  return g * sigmoid(g * c.alpha) * (u + 1.f);
}

// The gated activation on W lanes (silu, or gpt-oss's clamped SwiGLU); NaN propagates.
inline typename V::R activate_vec(const ExpertsCtx& c, typename V::R g, typename V::R u) {
  const typename V::R one = V::set1(1.f), neg = V::set1(-1.f), zero = V::zero();
  if (c.activation == 0)  // silu(g) * u = g / (1 + exp(-g)) * u
    return V::mul(V::div(g, V::add(one, V::exp(V::fma(g, neg, zero)))), u);
  const typename V::R lim = V::set1(c.limit);
  g = V::min(lim, g);
  u = V::max(V::set1(-c.limit), V::min(lim, u));
  const typename V::R sg = V::div(one, V::add(one, V::exp(V::mul(V::mul(g, V::set1(c.alpha)), neg))));
  return V::mul(V::mul(g, sg), V::add(u, one));
}

// Token-major copy of an expert's inputs: xt[k][t] = x[token of pair p0 + t][k], zero past n.
void prep(const ExpertsCtx& c, int a) {
  const int p0 = c.act_offsets[a];
  const int n = c.act_offsets[a + 1] - p0;
  if (!token_major(n) || c.transposed) return;
  const int npad = pad_tokens(n), H = c.H;
  float* xt = c.xt + (int64_t)(p0 + a * kLanePad) * H;
  for (int t = 0; t < npad; ++t) {
    const float* x = t < n ? c.xrows[p0 + t] : nullptr;
    for (int kk = 0; kk < H; ++kk) xt[(int64_t)kk * npad + t] = x != nullptr ? x[kk] : 0.f;
  }
}

template <class Tag>
void gemm1_tm(const ExpertsCtx& c, int a, int i0, int i1, float* scratch) {
  using T = typename Tag::T;
  const int e = c.act_experts[a];
  const int p0 = c.act_offsets[a];
  const int n = c.act_offsets[a + 1] - p0;
  const int npad = pad_tokens(n), H = c.H, I = c.I, I2 = 2 * c.I;
  const int64_t sb = p0 + (int64_t)a * kLanePad;
  const T* w = static_cast<const T*>(c.w_gu) + (int64_t)e * I2 * H;
  const float* xt = c.xt + sb * H;
  float* gut = c.gu + sb * I2;  // [2I, npad]
  auto none = [](int, int) {};
  if (c.order == 2) {
    tm_rows<Tag>(w, H, 2 * i0, 2 * i1, xt, npad, H, gut, npad, scratch, none);
  } else {
    tm_rows<Tag>(w, H, i0, i1, xt, npad, H, gut, npad, scratch, none);
    tm_rows<Tag>(w, H, I + i0, I + i1, xt, npad, H, gut, npad, scratch, none);
  }
  const float* b = c.b_gu != nullptr ? c.b_gu + (int64_t)e * I2 : nullptr;
  float* ht = c.h + sb * I;  // [I, npad]
  for (int i = i0; i < i1; ++i) {
    const int gi = c.order == 0 ? i : (c.order == 1 ? I + i : 2 * i);
    const int ui = c.order == 0 ? I + i : (c.order == 1 ? i : 2 * i + 1);
    const typename V::R bg = V::set1(b != nullptr ? b[gi] : 0.f), bu = V::set1(b != nullptr ? b[ui] : 0.f);
    for (int t = 0; t < npad; t += V::W) {
      const typename V::R g = V::add(V::loadf(gut + (int64_t)gi * npad + t), bg);
      const typename V::R u = V::add(V::loadf(gut + (int64_t)ui * npad + t), bu);
      float* dst = ht + (int64_t)i * npad + t;
      V::storef(dst, activate_vec(c, g, u));
      if (c.dtype != 0)  // stored in the activation dtype, as the reference rounds it
        for (int j = 0; j < V::W; ++j) dst[j] = round_to(dst[j], c.dtype);
    }
  }
}

template <class Tag>
void gemm2_tm(const ExpertsCtx& c, int a, int h0, int h1, float* scratch) {
  using T = typename Tag::T;
  const int e = c.act_experts[a];
  const int p0 = c.act_offsets[a];
  const int n = c.act_offsets[a + 1] - p0;
  const int npad = pad_tokens(n), H = c.H, I = c.I;
  const int64_t sb = p0 + (int64_t)a * kLanePad;
  const T* w = static_cast<const T*>(c.w_down) + (int64_t)e * H * I;
  const float* ht = c.h + sb * I;
  // Output tiles of 4 rows x npad tokens land in scratch after the converted weight rows, then go
  // to y[pair][row] with the bias and the routing weight.
  float* tile = scratch + 4 * (int64_t)I;
  const float* b = c.b_down != nullptr ? c.b_down + (int64_t)e * H : nullptr;
  auto epi = [&](int r, int rb) {
    for (int rr = 0; rr < rb; ++rr) {
      const float bias = b != nullptr ? b[r + rr] : 0.f;
      const float* src = tile + (int64_t)rr * npad;
      for (int t = 0; t < n; ++t) {
        const int pair = p0 + t;
        const float wt = c.weights[(int64_t)c.pair_token[pair] * c.k + c.pair_slot[pair]];
        c.y[(int64_t)pair * H + r + rr] = b != nullptr ? (src[t] + bias) * wt : src[t] * wt;
      }
    }
  };
  for (int r = h0; r < h1; r += 4) {  // one block of rows at a time, so the tile holds rows 0..3
    tm_rows<Tag>(w + (int64_t)r * I, I, 0, imin(h1 - r, 4), ht, npad, I, tile, npad, scratch,
                 [&](int r0, int rb) { epi(r + r0, rb); });
  }
}

template <class Tag>
void gemm1_t(const ExpertsCtx& c, int a, int i0, int i1, float* scratch) {
  if (!c.transposed && token_major(c.act_offsets[a + 1] - c.act_offsets[a]))
    return gemm1_tm<Tag>(c, a, i0, i1, scratch);
  using T = typename Tag::T;
  const int e = c.act_experts[a];
  const int p0 = c.act_offsets[a];
  const int n = c.act_offsets[a + 1] - p0;
  const int H = c.H, I = c.I, I2 = 2 * c.I;
  const T* w = static_cast<const T*>(c.w_gu) + (int64_t)e * I2 * H;
  const int64_t sb = p0 + (int64_t)a * kLanePad;
  float* gu = c.gu + sb * I2;
  // Storage ranges holding this item's gate and up columns.
  int ranges[2][2];
  int nr = 0;
  if (c.order == 2) {
    ranges[nr][0] = 2 * i0, ranges[nr][1] = 2 * i1, ++nr;
  } else {
    ranges[nr][0] = i0, ranges[nr][1] = i1, ++nr;
    ranges[nr][0] = I + i0, ranges[nr][1] = I + i1, ++nr;
  }
  for (int q = 0; q < nr; ++q) {
    if (c.transposed) {
      axpy_cols<Tag>(w, I2, ranges[q][0], ranges[q][1], c.xrows + p0, n, H, gu, I2);
    } else {
#ifdef MOESPEC_BF16_DOT
      if (c.x16rows != nullptr) {
        dot_rows_bf16(reinterpret_cast<const uint16_t*>(w), H, ranges[q][0], ranges[q][1], c.x16rows + p0, n, H, gu,
                      I2);
        continue;
      }
#endif
      dot_rows<Tag>(w, H, ranges[q][0], ranges[q][1], c.xrows + p0, n, H, gu, I2);
    }
  }
  const float* b = c.b_gu != nullptr ? c.b_gu + (int64_t)e * I2 : nullptr;
  // Gate and up columns are contiguous unless interleaved: W at a time, with the vector exp.
  const int goff = c.order == 1 ? I : 0, uoff = c.order == 1 ? 0 : I;
  const typename V::R one = V::set1(1.f), lim = V::set1(c.limit), nlim = V::set1(-c.limit), alpha = V::set1(c.alpha);
  const typename V::R zero = V::zero();
  for (int p = 0; p < n; ++p) {
    const float* row = gu + (int64_t)p * I2;
    float* hrow = c.h + (sb + p) * I;
    int i = i0;
    if (c.order != 2) {
      for (; i + V::W <= i1; i += V::W) {
        typename V::R g = V::loadf(row + goff + i), u = V::loadf(row + uoff + i);
        if (b != nullptr) {
          g = V::add(g, V::loadf(b + goff + i));
          u = V::add(u, V::loadf(b + uoff + i));
        }
        typename V::R hv;
        if (c.activation == 0) {  // silu(g) * u = g / (1 + exp(-g)) * u
          hv = V::mul(V::div(g, V::add(one, V::exp(V::fma(g, V::set1(-1.f), zero)))), u);
        } else {  // g * sigmoid(alpha * g) * (u + 1) with g <= limit, |u| <= limit
          g = V::min(lim, g);
          u = V::max(nlim, V::min(lim, u));
          const typename V::R sg = V::div(one, V::add(one, V::exp(V::mul(V::mul(g, alpha), V::set1(-1.f)))));
          hv = V::mul(V::mul(g, sg), V::add(u, one));
        }
        float tmp[V::W];
        V::storef(tmp, hv);
        for (int j = 0; j < V::W; ++j) {
          const float h = round_to(tmp[j], c.dtype);
          hrow[i + j] = h;
          if (c.h16 != nullptr) c.h16[(sb + p) * I + i + j] = float_to_bf16(h);
        }
      }
    }
    for (; i < i1; ++i) {
      const int gi = c.order == 0 ? i : (c.order == 1 ? I + i : 2 * i);
      const int ui = c.order == 0 ? I + i : (c.order == 1 ? i : 2 * i + 1);
      float g = row[gi], u = row[ui];
      if (b != nullptr) {
        g += b[gi];
        u += b[ui];
      }
      // The intermediate is stored in the activation dtype (as moespec.reference rounds it).
      const float h = round_to(activate(c, g, u), c.dtype);
      hrow[i] = h;
      if (c.h16 != nullptr) c.h16[(sb + p) * I + i] = float_to_bf16(h);
    }
  }
}

template <class Tag>
void gemm2_t(const ExpertsCtx& c, int a, int h0, int h1, float* scratch) {
  if (!c.transposed && token_major(c.act_offsets[a + 1] - c.act_offsets[a]))
    return gemm2_tm<Tag>(c, a, h0, h1, scratch);
  using T = typename Tag::T;
  const int e = c.act_experts[a];
  const int p0 = c.act_offsets[a];
  const int n = c.act_offsets[a + 1] - p0;
  const int H = c.H, I = c.I;
  const T* w = static_cast<const T*>(c.w_down) + (int64_t)e * H * I;
  float* y = c.y + (int64_t)p0 * H;
  if (c.transposed) {
    axpy_cols<Tag>(w, H, h0, h1, c.hrows + p0, n, I, y, H);
  } else {
#ifdef MOESPEC_BF16_DOT
    if (c.h16rows != nullptr) {
      dot_rows_bf16(reinterpret_cast<const uint16_t*>(w), I, h0, h1, c.h16rows + p0, n, I, y, H);
    } else
#endif
      dot_rows<Tag>(w, I, h0, h1, c.hrows + p0, n, I, y, H);
  }
  const float* b = c.b_down != nullptr ? c.b_down + (int64_t)e * H : nullptr;
  for (int p = 0; p < n; ++p) {
    const int pair = p0 + p;
    const float wt = c.weights[(int64_t)c.pair_token[pair] * c.k + c.pair_slot[pair]];
    float* row = y + (int64_t)p * H;
    if (b != nullptr) {
      for (int j = h0; j < h1; ++j) row[j] = (row[j] + b[j]) * wt;
    } else {
      for (int j = h0; j < h1; ++j) row[j] = row[j] * wt;
    }
  }
}

// The streaming read of the byte floor: four independent vector sums (enough loads in flight to
// reach the memory bandwidth), then the words past the last whole block one at a time.
double read_sum(const void* p, int64_t bytes) {
  const float* f = static_cast<const float*>(p);
  const int64_t n = bytes / 4;
  typename V::R a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  int64_t i = 0;
  for (; i + 4 * V::W <= n; i += 4 * V::W) {
    a0 = V::add(a0, V::loadf(f + i));
    a1 = V::add(a1, V::loadf(f + i + V::W));
    a2 = V::add(a2, V::loadf(f + i + 2 * V::W));
    a3 = V::add(a3, V::loadf(f + i + 3 * V::W));
  }
  double s = V::hsum(V::add(V::add(a0, a1), V::add(a2, a3)));
  for (; i < n; ++i) s += f[i];
  return s;
}

void gemm1(const ExpertsCtx& c, int a, int i0, int i1, float* scratch) {
  if (c.dtype == 1) return gemm1_t<TagBF16>(c, a, i0, i1, scratch);
  if (c.dtype == 2) return gemm1_t<TagF16>(c, a, i0, i1, scratch);
  return gemm1_t<TagF32>(c, a, i0, i1, scratch);
}

void gemm2(const ExpertsCtx& c, int a, int h0, int h1, float* scratch) {
  if (c.dtype == 1) return gemm2_t<TagBF16>(c, a, h0, h1, scratch);
  if (c.dtype == 2) return gemm2_t<TagF16>(c, a, h0, h1, scratch);
  return gemm2_t<TagF32>(c, a, h0, h1, scratch);
}

}  // namespace
}  // namespace MOESPEC_ISA_NS
}  // namespace cpu
}  // namespace moespec
