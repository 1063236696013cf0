// llamalab decode attention on CPU: RoPE + KV-cache append + grouped-query attention of one new token, one call.
//
// llamalab::decode_attention(q, k, v, cos, signed_sin, cache_k, cache_v, row0, start) -> (B, 1, H·D)
//
//   q (B, H, 1, D), k / v (B, KV, 1, D): the new token's projections (any strides; H a multiple of KV);
//   cos / signed_sin (B or 1, 1, 1, D) float32: the RoPE tables of rope.py's rope_tables;
//   cache_k / cache_v (Bc, KV, S, D): one layer's cache, batch row b of the call is cache row row0 + b.
//
// With rot(x) = x·cos + roll(x, D/2)·signed_sin (in float32: two products, one sum, as rope.rotate does) and
// round() the rounding to the cache dtype (nearest even, as Tensor.to):
//
//   cache_k[row0+b, g, start] = round(rot(k[b, g]));   cache_v[row0+b, g, start] = v[b, g]
//   for query head h, kv head g = h / (H/KV), keys/values K, V = cache[row0+b, g, 0..start]:
//     s_j = round(rot(q[b, h])) · K_j / sqrt(D),   p_j = exp(s_j - max s),   out = Σ_j p_j V_j / Σ_j p_j
//
// i.e. exactly what kv_cache.write_layer writes, then softmax(Q Kᵀ / sqrt(D)) V over slots 0..start (SDPA's
// default scale), returned as (B, 1, H·D) in q's dtype (the heads side by side: what o_proj takes). Scores,
// softmax and the weighted sum are float32. Work is split over (row, kv head) with at::parallel_for; each
// task does its n_rep = H/KV query heads (up to 4 at a time) in one pass over the keys and one over the
// values, so every cached key/value row is read once per task. The dot products, exponentials and sums are
// vectorised for AVX-512F (16 lanes, masked tails), AVX2 + FMA + F16C (8 lanes) or portable code (8-lane
// arrays the compiler vectorises), chosen at run time from the ISA blocks.cpp dispatches on. exp is a
// Cephes-style polynomial on the vector paths (within ~2 ulp; std::exp on the portable path).
//
// llamalab::decode_attention_rows(q, k, v, cos, signed_sin, cache_k, cache_v, rows, slots) -> (B, 1, H·D)
//
// is the same step for rows of different lengths (continuous batching): rows / slots (B,) int64, batch row b
// writes into cache row rows[b] (any order, each row once) at slot slots[b] and attends to its slots
// 0..slots[b] — the formulas above with row0+b -> rows[b] and start -> slots[b] — which is what write_layer
// writes for a ragged step and what its causal-by-length mask lets SDPA see. Both ops run the same task per
// (row, kv head), so a row's output does not depend on the batch it is in (bit for bit).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LL_X86 1
#else
#define LL_X86 0
#endif

namespace llamalab {
int64_t current_isa();  // blocks.cpp: 0 scalar, 1 AVX2, 2 AVX-VNNI, 3 AVX-512 VNNI
}

namespace {

constexpr int RB_MAX = 4;  // query heads per pass over the keys / values (4·4 accumulators in the value pass)

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return (float)x; }
inline float widen(c10::Half x) { return (float)x; }

// ------------------------------------------------------------------------------------------ portable
// 8 float lanes as a plain array: element-wise loops the compiler turns into SSE / NEON code
struct VP {
  static constexpr int W = 8;
  struct reg {
    float v[W];
  };
  static inline reg zero() {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = 0.f;
    return r;
  }
  static inline reg set1(float x) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  template <typename T>
  static inline reg load(const T* p) {
    reg r;
    for (int i = 0; i < W; ++i) r.v[i] = widen(p[i]);
    return r;
  }
  template <typename T>
  static inline reg load_part(const T* p, int n) {
    reg r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = widen(p[i]);
    return r;
  }
  static inline reg fma(reg a, reg b, reg c) {
    for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static inline reg add(reg a, reg b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static inline reg mul(reg a, reg b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static inline reg max(reg a, reg b) {
    for (int i = 0; i < W; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return a;
  }
  static inline float sum(reg a) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
  static inline float hmax(reg a) {
    float m = a.v[0];
    for (int i = 1; i < W; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
  }
  static inline reg exp(reg x) {
    for (int i = 0; i < W; ++i) x.v[i] = std::exp(x.v[i]);
    return x;
  }
  static inline void store(float* p, reg a) { std::memcpy(p, a.v, sizeof(a.v)); }
  static inline void store_part(float* p, reg a, int n) { std::memcpy(p, a.v, n * sizeof(float)); }
};

#if LL_X86
// exp(x) = 2^n · e^r, n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), e^r by Cephes' expf polynomial;
// x clamped to [-87.3, 88] (the softmax only takes x <= 0: below -87.3 the result is ~1e-38, not 0)
#define LL_EXP_CONSTS                                                                                          \
  constexpr float lo = -87.33654f, hi = 88.0f, log2e = 1.44269504088896341f, c1 = 0.693359375f,               \
                  c2 = -2.12194440e-4f, p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f, \
                  p3 = 4.1665795894e-2f, p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f;

// ------------------------------------------------------------------------------------------ AVX2
#define LL_ATT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LL_ATT_AVX2_INL __attribute__((target("avx2,fma,f16c"), always_inline))

struct V256 {
  static constexpr int W = 8;
  using reg = __m256;
  LL_ATT_AVX2_INL static inline reg zero() { return _mm256_setzero_ps(); }
  LL_ATT_AVX2_INL static inline reg set1(float x) { return _mm256_set1_ps(x); }
  LL_ATT_AVX2_INL static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  LL_ATT_AVX2_INL static inline reg load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128((const __m128i*)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  LL_ATT_AVX2_INL static inline reg load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  }
  template <typename T>
  LL_ATT_AVX2_INL static inline reg load_part(const T* p, int n) {
    T tmp[W];
    std::memset(tmp, 0, sizeof(tmp));
    std::memcpy(tmp, p, n * sizeof(T));
    return load(tmp);
  }
  LL_ATT_AVX2_INL static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  LL_ATT_AVX2_INL static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  LL_ATT_AVX2_INL static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  LL_ATT_AVX2_INL static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  LL_ATT_AVX2_INL static inline float sum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  LL_ATT_AVX2_INL static inline float hmax(reg v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  LL_ATT_AVX2_INL static inline reg exp(reg x) {
    LL_EXP_CONSTS
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT |
                                                                                 _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c1), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(c2), r);
    __m256 p = _mm256_set1_ps(p0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p5));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
  LL_ATT_AVX2_INL static inline void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  LL_ATT_AVX2_INL static inline void store_part(float* p, reg a, int n) {
    float tmp[W];
    _mm256_storeu_ps(tmp, a);
    std::memcpy(p, tmp, n * sizeof(float));
  }
};

// ------------------------------------------------------------------------------------------ AVX-512F
#define LL_ATT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2")))
#define LL_ATT_AVX512_INL __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2"), always_inline))

struct V512 {
  static constexpr int W = 16;
  using reg = __m512;
  LL_ATT_AVX512_INL static inline __mmask16 first(int n) { return (__mmask16)_bzhi_u32(0xffffu, (unsigned)n); }
  LL_ATT_AVX512_INL static inline reg zero() { return _mm512_setzero_ps(); }
  LL_ATT_AVX512_INL static inline reg set1(float x) { return _mm512_set1_ps(x); }
  LL_ATT_AVX512_INL static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  LL_ATT_AVX512_INL static inline reg load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  LL_ATT_AVX512_INL static inline reg load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
  }
  LL_ATT_AVX512_INL static inline reg load_part(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  LL_ATT_AVX512_INL static inline reg load_part(const c10::BFloat16* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(first(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  LL_ATT_AVX512_INL static inline reg load_part(const c10::Half* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
  }
  LL_ATT_AVX512_INL static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  LL_ATT_AVX512_INL static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  LL_ATT_AVX512_INL static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  LL_ATT_AVX512_INL static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  LL_ATT_AVX512_INL static inline float sum(reg a) { return _mm512_reduce_add_ps(a); }
  LL_ATT_AVX512_INL static inline float hmax(reg a) { return _mm512_reduce_max_ps(a); }
  LL_ATT_AVX512_INL static inline reg exp(reg x) {
    LL_EXP_CONSTS
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(log2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c2), r);
    __m512 p = _mm512_set1_ps(p0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p5));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  }
  LL_ATT_AVX512_INL static inline void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  LL_ATT_AVX512_INL static inline void store_part(float* p, reg a, int n) {
    _mm512_mask_storeu_ps(p, first(n), a);
  }
};
#endif

// Rows of the cache are read from memory (the weights streamed since the last step evicted them): beside the
// hardware's sequential prefetch, the key pass asks for the keys PF_KEYS rows ahead and for the values the
// value pass will read, so both streams are in flight at once.
constexpr int64_t PF_KEYS = 16;

template <typename T>
inline void prefetch_rows(const T* p, int64_t stride, int64_t D) {  // two rows of D, `stride` elements apart
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t o = 0; o < D * (int64_t)sizeof(T); o += 64)
      __builtin_prefetch((const char*)(p + r * stride) + o, 0, 3);
}

// One kv head's attention for RB of its query heads (rotated, float32, row stride `qs`) over L cached
// keys / values (T, row stride `ss` elements, D each): out[r·D + d] (float32) = softmax(q_r·K / sqrt(D)) · V.
// `s` is RB·L floats of scratch. Keys go two at a time (2·RB independent dot products in flight); values
// in chunks of 4 vectors of D with 4·RB accumulators held over all L rows, so each row is loaded once.
// (A macro: the same body is compiled once per instruction set, each with its own target attribute.)
#define LL_ATT_GROUP(NAME, ATTR, V)                                                                            \
  template <typename T, int RB>                                                                               \
  ATTR void NAME(const float* q, int64_t qs, const T* kc, const T* vc, int64_t ss, int64_t L, int64_t D,      \
                 float scale, float* s, float* out) {                                                         \
    using reg = typename V::reg;                                                                              \
    constexpr int W = V::W;                                                                                   \
    const int64_t Df = D / W * W; /* full vectors; D - Df tail lanes */                                       \
    const int tail = (int)(D - Df);                                                                           \
    int64_t j = 0;                                                                                            \
    for (; j + 2 <= L; j += 2) {                                                                              \
      const T* k0 = kc + j * ss;                                                                              \
      const T* k1 = k0 + ss;                                                                                  \
      prefetch_rows(k0 + PF_KEYS * ss, ss, D); /* keys ahead, and the values the next pass reads */           \
      prefetch_rows(vc + j * ss, ss, D);                                                                      \
      reg a0[RB], a1[RB];                                                                                     \
      for (int r = 0; r < RB; ++r) a0[r] = a1[r] = V::zero();                                                 \
      int64_t d = 0;                                                                                          \
      for (; d < Df; d += W) {                                                                                \
        const reg x0 = V::load(k0 + d), x1 = V::load(k1 + d);                                                 \
        for (int r = 0; r < RB; ++r) {                                                                        \
          const reg qv = V::load(q + r * qs + d);                                                             \
          a0[r] = V::fma(qv, x0, a0[r]);                                                                      \
          a1[r] = V::fma(qv, x1, a1[r]);                                                                      \
        }                                                                                                     \
      }                                                                                                       \
      if (tail) {                                                                                             \
        const reg x0 = V::load_part(k0 + d, tail), x1 = V::load_part(k1 + d, tail);                           \
        for (int r = 0; r < RB; ++r) {                                                                        \
          const reg qv = V::load_part(q + r * qs + d, tail);                                                  \
          a0[r] = V::fma(qv, x0, a0[r]);                                                                      \
          a1[r] = V::fma(qv, x1, a1[r]);                                                                      \
        }                                                                                                     \
      }                                                                                                       \
      for (int r = 0; r < RB; ++r) {                                                                          \
        s[r * L + j] = V::sum(a0[r]) * scale;                                                                 \
        s[r * L + j + 1] = V::sum(a1[r]) * scale;                                                             \
      }                                                                                                       \
    }                                                                                                         \
    for (; j < L; ++j) {                                                                                      \
      const T* k0 = kc + j * ss;                                                                              \
      reg a0[RB];                                                                                             \
      for (int r = 0; r < RB; ++r) a0[r] = V::zero();                                                         \
      int64_t d = 0;                                                                                          \
      for (; d < Df; d += W) {                                                                                \
        const reg x0 = V::load(k0 + d);                                                                       \
        for (int r = 0; r < RB; ++r) a0[r] = V::fma(V::load(q + r * qs + d), x0, a0[r]);                      \
      }                                                                                                       \
      if (tail) {                                                                                             \
        const reg x0 = V::load_part(k0 + d, tail);                                                            \
        for (int r = 0; r < RB; ++r) a0[r] = V::fma(V::load_part(q + r * qs + d, tail), x0, a0[r]);           \
      }                                                                                                       \
      for (int r = 0; r < RB; ++r) s[r * L + j] = V::sum(a0[r]) * scale;                                      \
    }                                                                                                         \
    /* softmax numerators in place: p_j = exp(s_j - max), and their sums */                                   \
    const int64_t Lf = L / W * W;                                                                             \
    const int ltail = (int)(L - Lf);                                                                          \
    float inv[RB];                                                                                            \
    for (int r = 0; r < RB; ++r) {                                                                            \
      float* sr = s + r * L;                                                                                  \
      float m = sr[0];                                                                                        \
      if (Lf) {                                                                                               \
        reg mv = V::load(sr);                                                                                 \
        for (int64_t i = W; i < Lf; i += W) mv = V::max(mv, V::load(sr + i));                                 \
        m = V::hmax(mv);                                                                                      \
      }                                                                                                       \
      for (int64_t i = Lf; i < L; ++i) m = sr[i] > m ? sr[i] : m;                                             \
      const reg neg = V::set1(-m);                                                                            \
      reg sum = V::zero();                                                                                    \
      float tsum = 0.f;                                                                                       \
      for (int64_t i = 0; i < Lf; i += W) {                                                                   \
        const reg p = V::exp(V::add(V::load(sr + i), neg));                                                   \
        V::store(sr + i, p);                                                                                  \
        sum = V::add(sum, p);                                                                                 \
      }                                                                                                       \
      if (ltail) {                                                                                            \
        const reg p = V::exp(V::add(V::load_part(sr + Lf, ltail), neg));                                      \
        V::store_part(sr + Lf, p, ltail);                                                                     \
        for (int i = 0; i < ltail; ++i) tsum += sr[Lf + i];                                                   \
      }                                                                                                       \
      inv[r] = 1.f / (V::sum(sum) + tsum);                                                                    \
    }                                                                                                         \
    /* out_r = Σ_j p_rj V_j / Σ_j p_rj, D in chunks of 4 vectors */                                          \
    for (int64_t d0 = 0; d0 < D; d0 += 4 * W) {                                                               \
      int n[4];                                                                                               \
      for (int u = 0; u < 4; ++u) n[u] = (int)std::max<int64_t>(0, std::min<int64_t>(W, D - d0 - u * W));    \
      reg acc[RB][4];                                                                                         \
      for (int r = 0; r < RB; ++r)                                                                            \
        for (int u = 0; u < 4; ++u) acc[r][u] = V::zero();                                                    \
      for (int64_t jj = 0; jj < L; ++jj) {                                                                    \
        const T* vr = vc + jj * ss + d0;                                                                      \
        reg x[4];                                                                                             \
        for (int u = 0; u < 4; ++u)                                                                           \
          x[u] = n[u] == W ? V::load(vr + u * W) : (n[u] ? V::load_part(vr + u * W, n[u]) : V::zero());       \
        for (int r = 0; r < RB; ++r) {                                                                        \
          const reg p = V::set1(s[r * L + jj]);                                                               \
          for (int u = 0; u < 4; ++u)                                                                         \
            if (n[u]) acc[r][u] = V::fma(p, x[u], acc[r][u]);                                                 \
        }                                                                                                     \
      }                                                                                                       \
      for (int r = 0; r < RB; ++r) {                                                                          \
        const reg iv = V::set1(inv[r]);                                                                       \
        for (int u = 0; u < 4; ++u) {                                                                         \
          if (n[u] == W)                                                                                      \
            V::store(out + r * D + d0 + u * W, V::mul(acc[r][u], iv));                                        \
          else if (n[u])                                                                                      \
            V::store_part(out + r * D + d0 + u * W, V::mul(acc[r][u], iv), n[u]);                             \
        }                                                                                                     \
      }                                                                                                       \
    }                                                                                                         \
  }

LL_ATT_GROUP(group_portable, , VP)
#if LL_X86
LL_ATT_GROUP(group_avx2, LL_ATT_AVX2, V256)
LL_ATT_GROUP(group_avx512, LL_ATT_AVX512, V512)
#endif

template <typename T, int RB>
void group_any(int64_t isa, const float* q, int64_t qs, const T* kc, const T* vc, int64_t ss, int64_t L, int64_t D,
               float scale, float* s, float* out) {
#if LL_X86
  if (isa == 3) return group_avx512<T, RB>(q, qs, kc, vc, ss, L, D, scale, s, out);
  if (isa == 1 || isa == 2) return group_avx2<T, RB>(q, qs, kc, vc, ss, L, D, scale, s, out);
#endif
  group_portable<T, RB>(q, qs, kc, vc, ss, L, D, scale, s, out);
}

// rot(x)[d] = x[d]·cos[d] + x[(d + D/2) mod D]·signed_sin[d], float32 (two products and a sum, unfused, as
// the element-wise torch ops of rope.rotate compute it), rounded to T
template <typename T>
inline void rotate_row(const T* x, const float* c, const float* sn, int64_t D, T* dst) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float a = widen(x[d]) * c[d];
    const float b = widen(x[d < half ? d + half : d - half]) * sn[d];
    dst[d] = (T)(a + b);
  }
}

struct Args {
  int64_t B, H, KV, D, row0, start, isa;
  const int64_t *rows, *slots;  // decode_attention_rows: row b is cache row rows[b] at slot slots[b] (else null)
  const void *q, *k, *v;
  int64_t qs0, qs1, ks0, ks1, vs0, vs1;  // element strides of q / k / v over (row, head); the last dim is dense
  const float *cos, *sin;
  int64_t cs0, ss0;  // row strides of cos / signed_sin (0: one table for every row)
  void *ck, *cv;
  int64_t kcs0, kcs1, kcs2, vcs0, vcs1, vcs2;  // cache strides (row, head, slot)
  void* out;
  float scale;
};

// row b, kv head g: append its key / value to the cache, then attention for its n_rep query heads
// (What a task computes depends only on its own row's inputs and cache row, never on B, the other rows or the
// thread that runs it: a row's output is bit-identical whether it is decoded alone or in any batch, through
// either op.)
template <typename T>
void task(const Args& a, int64_t b, int64_t g) {
  const int64_t row = a.rows ? a.rows[b] : a.row0 + b;
  const int64_t start = a.slots ? a.slots[b] : a.start;
  const int64_t D = a.D, R = a.H / a.KV, L = start + 1;
  const float* c = a.cos + b * a.cs0;
  const float* sn = a.sin + b * a.ss0;
  T* ckr = (T*)a.ck + row * a.kcs0 + g * a.kcs1;
  T* cvr = (T*)a.cv + row * a.vcs0 + g * a.vcs1;
  rotate_row<T>((const T*)a.k + b * a.ks0 + g * a.ks1, c, sn, D, ckr + start * a.kcs2);
  std::memcpy(cvr + start * a.vcs2, (const T*)a.v + b * a.vs0 + g * a.vs1, D * sizeof(T));

  thread_local std::vector<T> qrot;
  thread_local std::vector<float> qf, s, o;
  qrot.resize(D);
  qf.resize(std::max<size_t>(qf.size(), R * D));
  s.resize(std::max<size_t>(s.size(), RB_MAX * L));
  o.resize(std::max<size_t>(o.size(), RB_MAX * D));
  for (int64_t r = 0; r < R; ++r) {  // rotated queries, rounded to T as the unfused path does, then widened
    rotate_row<T>((const T*)a.q + b * a.qs0 + (g * R + r) * a.qs1, c, sn, D, qrot.data());
    for (int64_t d = 0; d < D; ++d) qf[r * D + d] = widen(qrot[d]);
  }
  T* out = (T*)a.out + b * a.H * D;
  for (int64_t h0 = 0; h0 < R; h0 += RB_MAX) {
    const int64_t rb = std::min<int64_t>(RB_MAX, R - h0);
    const float* qp = qf.data() + h0 * D;
    switch (rb) {
      case 1: group_any<T, 1>(a.isa, qp, D, ckr, cvr, a.kcs2, L, D, a.scale, s.data(), o.data()); break;
      case 2: group_any<T, 2>(a.isa, qp, D, ckr, cvr, a.kcs2, L, D, a.scale, s.data(), o.data()); break;
      case 3: group_any<T, 3>(a.isa, qp, D, ckr, cvr, a.kcs2, L, D, a.scale, s.data(), o.data()); break;
      default: group_any<T, 4>(a.isa, qp, D, ckr, cvr, a.kcs2, L, D, a.scale, s.data(), o.data()); break;
    }
    T* dst = out + (g * R + h0) * D;
    for (int64_t i = 0; i < rb * D; ++i) dst[i] = (T)o[i];
  }
}

// Both ops: check the arguments, then one task per (row, kv head). `rows` / `slots` null: the uniform op (rows
// row0.., slot start); else the (B,) int64 row and slot of each batch row, checked here.
at::Tensor run(const char* op, const at::Tensor& q_arg, const at::Tensor& k_arg, const at::Tensor& v_arg,
               const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& cache_k,
               const at::Tensor& cache_v, int64_t row0, int64_t start, const at::Tensor* rows_in,
               const at::Tensor* slots_in) {
  // q, k, v as the projections return them, (B, 1, heads·D): viewed here as (B, heads, 1, D), the same memory
  // where they are contiguous (one view each in C++ instead of a Python call each per layer)
  const bool flat = q_arg.dim() == 3 && k_arg.dim() == 3 && v_arg.dim() == 3;
  if (flat) {
    TORCH_CHECK(cache_k.dim() == 4 && cache_k.size(3) > 0, op, "the cache tensors must be (rows, KV, slots, D)");
    const int64_t Dc = cache_k.size(3);
    for (const at::Tensor* t : {&q_arg, &k_arg, &v_arg})
      TORCH_CHECK(t->size(1) == 1 && t->size(2) % Dc == 0, op, "flat q, k, v must be (B, 1, heads·D) with D = ", Dc,
                  ", got ", t->sizes());
  }
  auto heads = [&](const at::Tensor& t) {
    return flat ? t.reshape({t.size(0), t.size(2) / cache_k.size(3), 1, cache_k.size(3)}) : t;
  };
  const at::Tensor q_in = heads(q_arg), k_in = heads(k_arg), v_in = heads(v_arg);
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, op,
              "q, k, v must be 4-D (B, heads, 1, D) or 3-D (B, 1, heads·D)");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3), KV = k_in.size(1);
  TORCH_CHECK(q_in.size(2) == 1 && k_in.size(2) == 1 && v_in.size(2) == 1, op, "one new token per row (T = 1)");
  TORCH_CHECK(k_in.sizes() == v_in.sizes() && k_in.size(0) == B && k_in.size(3) == D, op,
              "k and v must be (B, KV, 1, D) with q's B and D, got ", k_in.sizes(), " and ", v_in.sizes());
  TORCH_CHECK(KV > 0 && H % KV == 0, op, "the query heads (", H, ") must be a multiple of the kv heads (", KV, ")");
  TORCH_CHECK(D > 0 && D % 2 == 0, op, "head_dim must be even (RoPE pairs its halves), got ", D);
  const at::ScalarType dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              "q must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k_in.scalar_type() == dt && v_in.scalar_type() == dt && cache_k.scalar_type() == dt &&
                  cache_v.scalar_type() == dt,
              op, "q, k, v and the cache must share one dtype");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() && cache_k.size(1) == KV &&
                  cache_k.size(3) == D,
              op, "the cache tensors must be (rows, KV, slots, D) = (*, ", KV, ", *, ", D, "), got ", cache_k.sizes(),
              " and ", cache_v.sizes());
  at::Tensor rows, slots;  // the per-row form's indices, contiguous
  int64_t max_start = start;
  if (rows_in == nullptr) {
    TORCH_CHECK(row0 >= 0 && row0 + B <= cache_k.size(0), op, "cache rows ", row0, "..", row0 + B,
                " out of range (", cache_k.size(0), " rows)");
    TORCH_CHECK(start >= 0 && start < cache_k.size(2), op, "slot ", start, " out of range (", cache_k.size(2),
                " slots)");
  } else {
    for (const at::Tensor* t : {rows_in, slots_in})
      TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kLong && t->device().is_cpu(), op,
                  "rows and slots must be (B,) = (", B, ",) int64 CPU tensors, got ", t->sizes(), " ",
                  t->scalar_type());
    rows = rows_in->contiguous();
    slots = slots_in->contiguous();
    const int64_t* rp = rows.data_ptr<int64_t>();
    const int64_t* sp = slots.data_ptr<int64_t>();
    max_start = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(rp[b] >= 0 && rp[b] < cache_k.size(0), op, "cache row ", rp[b], " out of range (",
                  cache_k.size(0), " rows)");
      TORCH_CHECK(sp[b] >= 0 && sp[b] < cache_k.size(2), op, "slot ", sp[b], " out of range (", cache_k.size(2),
                  " slots)");
      max_start = std::max(max_start, sp[b]);
    }
    std::vector<int64_t> sorted(rp, rp + B);  // two batch rows writing one cache row would race
    std::sort(sorted.begin(), sorted.end());
    TORCH_CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(), op,
                "each cache row may appear once in rows");
  }
  TORCH_CHECK(cache_k.stride(3) == 1 && cache_v.stride(3) == 1 && cache_k.stride(2) == cache_v.stride(2), op,
              "the cache tensors must be dense along head_dim, with the same slot stride");
  for (const at::Tensor* t : {&q_in, &k_in, &v_in, &cos_in, &sin_in, &cache_k, &cache_v})
    TORCH_CHECK(t->device().is_cpu(), op, "CPU tensors only");
  TORCH_CHECK(cos_in.scalar_type() == at::kFloat && sin_in.scalar_type() == at::kFloat, op,
              "the RoPE tables must be float32");
  for (const at::Tensor* t : {&cos_in, &sin_in})
    TORCH_CHECK(t->dim() == 4 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == 1 && t->size(2) == 1 &&
                    t->size(3) == D,
                op, "the RoPE tables must be (B or 1, 1, 1, D), got ", t->sizes());

  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const at::Tensor cs = cos_in.stride(3) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor sn = sin_in.stride(3) == 1 ? sin_in : sin_in.contiguous();
  at::Tensor out = at::empty({B, 1, H * D}, q.options());
  if (B == 0 || H == 0) return out;

  Args a;
  a.B = B, a.H = H, a.KV = KV, a.D = D, a.row0 = row0, a.start = start;
  a.rows = rows_in ? rows.data_ptr<int64_t>() : nullptr;
  a.slots = rows_in ? slots.data_ptr<int64_t>() : nullptr;
  a.isa = llamalab::current_isa();
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
  a.qs0 = q.stride(0), a.qs1 = q.stride(1), a.ks0 = k.stride(0), a.ks1 = k.stride(1);
  a.vs0 = v.stride(0), a.vs1 = v.stride(1);
  a.cos = cs.data_ptr<float>(), a.sin = sn.data_ptr<float>();
  a.cs0 = cs.size(0) == 1 ? 0 : cs.stride(0), a.ss0 = sn.size(0) == 1 ? 0 : sn.stride(0);
  a.ck = cache_k.data_ptr(), a.cv = cache_v.data_ptr();
  a.kcs0 = cache_k.stride(0), a.kcs1 = cache_k.stride(1), a.kcs2 = cache_k.stride(2);
  a.vcs0 = cache_v.stride(0), a.vcs1 = cache_v.stride(1), a.vcs2 = cache_v.stride(2);
  a.out = out.data_ptr();
  a.scale = 1.f / std::sqrt((float)D);

  // one task per (row, kv head); a task reads L keys and values of D and does H/KV heads' worth of products
  const int64_t work = std::max<int64_t>(1, (max_start + 1) * D * (H / KV + 1));
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, B * KV, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (dt == at::kFloat)
        task<float>(a, t / KV, t % KV);
      else if (dt == at::kBFloat16)
        task<c10::BFloat16>(a, t / KV, t % KV);
      else
        task<c10::Half>(a, t / KV, t % KV);
    }
  });
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t row0,
                            int64_t start) {
  return run("llamalab decode_attention: ", q, k, v, cos, sin, cache_k, cache_v, row0, start, nullptr, nullptr);
}

at::Tensor decode_attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache_k,
                                 const at::Tensor& cache_v, const at::Tensor& rows, const at::Tensor& slots) {
  return run("llamalab decode_attention_rows: ", q, k, v, cos, sin, cache_k, cache_v, 0, 0, &rows, &slots);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamalab, lib) {
  lib.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor signed_sin, Tensor(a!) cache_k, "
      "Tensor(b!) cache_v, int row0, int start) -> Tensor");
  lib.def(
      "decode_attention_rows(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor signed_sin, Tensor(a!) cache_k, "
      "Tensor(b!) cache_v, Tensor rows, Tensor slots) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
  lib.impl("decode_attention_rows", &decode_attention_rows);
}
