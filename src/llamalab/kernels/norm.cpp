// llamalab fused ops of the model's forward (norm): RMSNorm and the SwiGLU gate, one call each.
//
// llamalab::rms_norm(x, weight, eps) -> y, over the last dim (n = weight.numel()), any leading dims:
//
//   inv = 1 / sqrt(Σ_i x_i² / n + eps)                        (float32)
//   y_i = round_O( w_i · round_X(x_i · inv) )                  (the product in float32)
//
// where round_X rounds to x's dtype and round_O to the result dtype promote(x, weight), both to nearest
// even as Tensor.to does. For float32 x this is x · rsqrt(mean(x²) + eps) · w in float32 (F.rms_norm);
// for bfloat16 / float16 it is RMSNorm.forward's  weight * F.rms_norm(x.float(), ..., eps).to(x.dtype).
//
// llamalab::silu_mul(gate, up) -> y, same shape and dtype T:
//
//   y = round_T( round_T(silu(g)) · u ),   silu(g) = g / (1 + exp(-g))  (float32)
//
// i.e. F.silu(gate) * up with torch's rounding (identity roundings for float32).
//
// llamalab::add_rms_norm(x, residual, weight, eps) -> (s, y):  s = round_X(x + residual), y = rms_norm(s, ...)
// (the residual add of a pre-norm block and the next norm in one pass; x and residual of one dtype).
//
// The rows are vectorised for AVX-512F/BW (16 lanes, masked tails), AVX2 + FMA + F16C (8 lanes) or portable
// scalar code, chosen at run time from the ISA blocks.cpp dispatches on (llamalab::current_isa, which
// LLAMALAB_KERNEL_ISA / set_isa force). The sum of squares is accumulated in float32 lanes (its order differs
// from torch's, within float32 rounding). exp on the vector paths is a Cephes-style polynomial (≤ 2 ulp);
// the portable path uses std::exp. Unsupported dtype mixes / shapes go through the same math in ATen ops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/add.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/silu.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LL_NORM_X86 1
#else
#define LL_NORM_X86 0
#endif

namespace llamalab {
int64_t current_isa();  // blocks.cpp: 0 scalar, 1 AVX2, 2 AVX-VNNI, 3 AVX-512 VNNI
}

namespace {

using bf16 = c10::BFloat16;
using f16 = c10::Half;

// ------------------------------------------------------------------------------------------------ scalar
template <class T>
inline float to_f(T v) {
  return static_cast<float>(v);
}
template <class T>
inline T from_f(float v) {
  return T(v);  // float: identity; BFloat16 / Half: round to nearest even
}
template <class T>
inline float round_through(float v) {  // round_T as a float
  return to_f<T>(from_f<T>(v));
}

inline float silu_f(float g) { return g / (1.0f + std::exp(-g)); }

template <class T>
float sumsq_scalar(const T* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 lanes, like the AVX2 path
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = to_f(x[i + j]);
      acc[j] += v * v;
    }
  for (int j = 0; i < n; ++i, ++j) {
    const float v = to_f(x[i]);
    acc[j] += v * v;
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

template <class T, class W, class O>
void scale_scalar(const T* x, float inv, const W* w, O* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = from_f<O>(to_f(w[i]) * round_through<T>(to_f(x[i]) * inv));
}

template <class T>
void add_scalar(const T* x, const T* r, T* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = from_f<T>(to_f(x[i]) + to_f(r[i]));
}

template <class T>
void silu_mul_scalar(const T* g, const T* u, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = from_f<T>(round_through<T>(silu_f(to_f(g[i]))) * to_f(u[i]));
}

#if LL_NORM_X86
// ------------------------------------------------------------------------------------------------ AVX2
#define LL_NORM_AVX2 __attribute__((target("avx2,fma,f16c")))

// load up to 8 elements (n < 8: the rest read as 0) as float32 lanes
template <class T>
LL_NORM_AVX2 inline __m256 load8(const T* p, int n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 8) return _mm256_loadu_ps(p);
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(t, p, n * sizeof(float));
    return _mm256_load_ps(t);
  } else {
    __m128i h;
    if (n >= 8) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(t, p, n * sizeof(uint16_t));
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
    }
    if constexpr (std::is_same_v<T, bf16>) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

LL_NORM_AVX2 inline __m128i bf16_round8(__m256 v) {  // float32 -> bfloat16 bits, nearest even, NaN -> 0x7fc0
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: r0..3 r0..3 | r4..7 r4..7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

template <class T>
LL_NORM_AVX2 inline void store8(T* p, __m256 v, int n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 8) return _mm256_storeu_ps(p, v);
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    std::memcpy(p, t, n * sizeof(float));
  } else {
    __m128i h;
    if constexpr (std::is_same_v<T, bf16>) h = bf16_round8(v);
    else h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (n >= 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    alignas(16) uint16_t t[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
    std::memcpy(p, t, n * sizeof(uint16_t));
  }
}

template <class T>
LL_NORM_AVX2 inline __m256 round_through8(__m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, bf16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16_round8(v)), 16));
  } else {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// exp(x): x = n·ln2 + r, |r| ≤ ln2/2, exp(r) by a degree-7 polynomial (Cephes expf), times 2^n applied as
// 2^(n/2) · 2^(n - n/2) (each factor a normal float for n in [-150, 128]: overflow to inf, underflow to 0)
LL_NORM_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_cvtps_epi32(fx), h = _mm256_srai_epi32(n, 1), bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(n, h), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
}

template <class T>
LL_NORM_AVX2 float sumsq_avx2(const T* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = load8(x + i, 8), v1 = load8(x + i + 8, 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  for (; i < n; i += 8) {
    const __m256 v = load8(x + i, (int)std::min<int64_t>(8, n - i));
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  const __m256 a = _mm256_add_ps(a0, a1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class T, class W, class O>
LL_NORM_AVX2 void scale_avx2(const T* x, float inv, const W* w, O* y, int64_t n) {
  const __m256 s = _mm256_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 8) {
    const int m = (int)std::min<int64_t>(8, n - i);
    const __m256 v = round_through8<T>(_mm256_mul_ps(load8(x + i, m), s));
    store8(y + i, _mm256_mul_ps(load8(w + i, m), v), m);
  }
}

template <class T>
LL_NORM_AVX2 void add_avx2(const T* x, const T* r, T* s, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    const int m = (int)std::min<int64_t>(8, n - i);
    store8(s + i, _mm256_add_ps(load8(x + i, m), load8(r + i, m)), m);
  }
}

template <class T>
LL_NORM_AVX2 void silu_mul_avx2(const T* g, const T* u, T* y, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const int m = (int)std::min<int64_t>(8, n - i);
    const __m256 gv = load8(g + i, m);
    const __m256 sv = round_through8<T>(_mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv)))));
    store8(y + i, _mm256_mul_ps(sv, load8(u + i, m)), m);
  }
}

// ------------------------------------------------------------------------------------------------ AVX-512
#define LL_NORM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

template <class T>
LL_NORM_AVX512 inline __m512 load16(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    if constexpr (std::is_same_v<T, bf16>) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

LL_NORM_AVX512 inline __m256i bf16_round16(__m512 v) {  // float32 -> bfloat16 bits, nearest even, NaN -> 0x7fc0
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

template <class T>
LL_NORM_AVX512 inline void store16(T* p, __m512 v, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, k, v);
  } else if constexpr (std::is_same_v<T, bf16>) {
    _mm256_mask_storeu_epi16(p, k, bf16_round16(v));
  } else {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <class T>
LL_NORM_AVX512 inline __m512 round_through16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, bf16>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_round16(v)), 16));
  } else {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

LL_NORM_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

// exp(x) as exp8, with 2^n applied by scalef (overflow to inf and underflow to 0 as exp does)
LL_NORM_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}

template <class T>
LL_NORM_AVX512 float sumsq_avx512(const T* x, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 v0 = load16(x + i, 0xffff), v1 = load16(x + i + 16, 0xffff);
    a0 = _mm512_fmadd_ps(v0, v0, a0);
    a1 = _mm512_fmadd_ps(v1, v1, a1);
  }
  for (; i < n; i += 16) {
    const __m512 v = load16(x + i, tail_mask(n - i));
    a0 = _mm512_fmadd_ps(v, v, a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

template <class T, class W, class O>
LL_NORM_AVX512 void scale_avx512(const T* x, float inv, const W* w, O* y, int64_t n) {
  const __m512 s = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = round_through16<T>(_mm512_mul_ps(load16(x + i, k), s));
    store16(y + i, _mm512_mul_ps(load16(w + i, k), v), k);
  }
}

template <class T>
LL_NORM_AVX512 void add_avx512(const T* x, const T* r, T* s, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    store16(s + i, _mm512_add_ps(load16(x + i, k), load16(r + i, k)), k);
  }
}

template <class T>
LL_NORM_AVX512 void silu_mul_avx512(const T* g, const T* u, T* y, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 gv = load16(g + i, k);
    const __m512 sv = round_through16<T>(_mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, gv)))));
    store16(y + i, _mm512_mul_ps(sv, load16(u + i, k)), k);
  }
}
#endif  // LL_NORM_X86

// ------------------------------------------------------------------------------------------------ dispatch
enum Path { SCALAR = 0, AVX2 = 1, AVX512 = 3 };

inline Path path() {
#if LL_NORM_X86
  const int64_t isa = llamalab::current_isa();  // 3 = AVX-512 VNNI (has F/BW/VL/DQ), 1-2 = AVX2 + FMA + F16C
  if (isa >= 3) return AVX512;
  if (isa >= 1) return AVX2;
#endif
  return SCALAR;
}

template <class T>
float sumsq(Path p, const T* x, int64_t n) {
#if LL_NORM_X86
  if (p == AVX512) return sumsq_avx512(x, n);
  if (p == AVX2) return sumsq_avx2(x, n);
#endif
  return sumsq_scalar(x, n);
}

template <class T, class W, class O>
void scale(Path p, const T* x, float inv, const W* w, O* y, int64_t n) {
#if LL_NORM_X86
  if (p == AVX512) return scale_avx512(x, inv, w, y, n);
  if (p == AVX2) return scale_avx2(x, inv, w, y, n);
#endif
  scale_scalar(x, inv, w, y, n);
}

template <class T>
void add(Path p, const T* x, const T* r, T* s, int64_t n) {
#if LL_NORM_X86
  if (p == AVX512) return add_avx512(x, r, s, n);
  if (p == AVX2) return add_avx2(x, r, s, n);
#endif
  add_scalar(x, r, s, n);
}

template <class T>
void silu_mul_rows(Path p, const T* g, const T* u, T* y, int64_t n) {
#if LL_NORM_X86
  if (p == AVX512) return silu_mul_avx512(g, u, y, n);
  if (p == AVX2) return silu_mul_avx2(g, u, y, n);
#endif
  silu_mul_scalar(g, u, y, n);
}

inline bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// rows of `n`: rows in parallel when there is enough work (a decode row stays on the calling thread)
template <class F>
void for_rows(int64_t rows, int64_t n, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n));
  if (rows <= grain) return f(0, rows);
  at::parallel_for(0, rows, grain, f);
}

// y = rms_norm(src) for rows of src (contiguous, dtype T) with weight W into y (dtype O); if `add_src` is given,
// src = round_T(x + add_src) is formed first and written to `sum` (dtype T).
template <class T, class W, class O>
void rms_rows(const T* x, const T* add_src, T* sum, const W* w, O* y, int64_t rows, int64_t n, double eps) {
  const Path p = path();
  for_rows(rows, n, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = x + r * n;
      if (add_src != nullptr) {
        add(p, src, add_src + r * n, sum + r * n, n);
        src = sum + r * n;
      }
      const float ms = sumsq(p, src, n) / (float)n;
      const float inv = 1.0f / std::sqrt(ms + (float)eps);
      scale(p, src, inv, w, y + r * n, n);
    }
  });
}

template <class T>
void rms_dispatch_w(const at::Tensor& x, const at::Tensor* res, at::Tensor* sum, const at::Tensor& w, at::Tensor& y,
                    int64_t rows, int64_t n, double eps) {
  const T* xp = x.data_ptr<T>();
  const T* rp = res ? res->data_ptr<T>() : nullptr;
  T* sp = sum ? sum->data_ptr<T>() : nullptr;
  const at::ScalarType wt = w.scalar_type(), yt = y.scalar_type();
  if (wt == at::kFloat) {
    if (yt == at::kFloat) return rms_rows<T, float, float>(xp, rp, sp, w.data_ptr<float>(), y.data_ptr<float>(), rows, n, eps);
  } else if (wt == at::kBFloat16) {
    if (yt == at::kBFloat16) return rms_rows<T, bf16, bf16>(xp, rp, sp, w.data_ptr<bf16>(), y.data_ptr<bf16>(), rows, n, eps);
    if (yt == at::kFloat) return rms_rows<T, bf16, float>(xp, rp, sp, w.data_ptr<bf16>(), y.data_ptr<float>(), rows, n, eps);
  } else if (wt == at::kHalf) {
    if (yt == at::kHalf) return rms_rows<T, f16, f16>(xp, rp, sp, w.data_ptr<f16>(), y.data_ptr<f16>(), rows, n, eps);
    if (yt == at::kFloat) return rms_rows<T, f16, float>(xp, rp, sp, w.data_ptr<f16>(), y.data_ptr<float>(), rows, n, eps);
  }
  TORCH_CHECK(false, "llamalab rms_norm: unsupported dtypes");  // not reached: rms_norm checks first
}

// the same math in ATen ops (dtype mixes / devices the kernel does not take)
at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat)
    return at::rms_norm(x, weight.sizes(), weight, eps);
  return at::mul(weight, at::rms_norm(x.to(at::kFloat), weight.sizes(), c10::nullopt, eps).to(x.scalar_type()));
}

bool rms_kernel_ok(const at::Tensor& x, const at::Tensor& weight) {
  if (!x.device().is_cpu() || !weight.device().is_cpu() || weight.dim() != 1 || x.dim() < 1) return false;
  if (x.size(-1) != weight.size(0) || !kernel_dtype(x.scalar_type()) || !kernel_dtype(weight.scalar_type()))
    return false;
  const at::ScalarType xt = x.scalar_type(), wt = weight.scalar_type();
  return wt == at::kFloat || xt == at::kFloat || wt == xt;  // bf16 x with f16 gain (or back) -> ATen
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  if (!rms_kernel_ok(x_in, weight_in)) return rms_norm_aten(x_in, weight_in, eps);
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  const at::ScalarType yt = c10::promoteTypes(x.scalar_type(), w.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(yt));
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return y;
  switch (x.scalar_type()) {
    case at::kFloat: rms_dispatch_w<float>(x, nullptr, nullptr, w, y, rows, n, eps); break;
    case at::kBFloat16: rms_dispatch_w<bf16>(x, nullptr, nullptr, w, y, rows, n, eps); break;
    default: rms_dispatch_w<f16>(x, nullptr, nullptr, w, y, rows, n, eps); break;
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& res_in,
                                                const at::Tensor& weight_in, double eps) {
  if (!rms_kernel_ok(x_in, weight_in) || res_in.scalar_type() != x_in.scalar_type() ||
      res_in.sizes() != x_in.sizes() || !res_in.device().is_cpu()) {
    at::Tensor s = at::add(x_in, res_in);
    return {s, rms_norm_aten(s, weight_in, eps)};
  }
  const at::Tensor x = x_in.contiguous(), r = res_in.contiguous(), w = weight_in.contiguous();
  const at::ScalarType yt = c10::promoteTypes(x.scalar_type(), w.scalar_type());
  at::Tensor s = at::empty(x.sizes(), x.options());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(yt));
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return {s, y};
  switch (x.scalar_type()) {
    case at::kFloat: rms_dispatch_w<float>(x, &r, &s, w, y, rows, n, eps); break;
    case at::kBFloat16: rms_dispatch_w<bf16>(x, &r, &s, w, y, rows, n, eps); break;
    default: rms_dispatch_w<f16>(x, &r, &s, w, y, rows, n, eps); break;
  }
  return {s, y};
}

at::Tensor silu_mul(const at::Tensor& gate_in, const at::Tensor& up_in) {
  if (gate_in.sizes() != up_in.sizes() || gate_in.scalar_type() != up_in.scalar_type() ||
      !kernel_dtype(gate_in.scalar_type()) || !gate_in.device().is_cpu() || !up_in.device().is_cpu())
    return at::mul(at::silu(gate_in), up_in);
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor y = at::empty(g.sizes(), g.options());
  const int64_t numel = g.numel();
  if (numel == 0) return y;
  const Path p = path();
  const int64_t n = g.dim() == 0 ? 1 : g.size(-1), rows = numel / n;
  switch (g.scalar_type()) {
#define LL_SILU_CASE(TYPE, CT)                                                              \
  case TYPE: {                                                                              \
    const CT *gp = g.data_ptr<CT>(), *up = u.data_ptr<CT>();                                \
    CT* yp = y.data_ptr<CT>();                                                              \
    for_rows(rows, n, [&](int64_t r0, int64_t r1) {                                         \
      silu_mul_rows(p, gp + r0 * n, up + r0 * n, yp + r0 * n, (r1 - r0) * n);               \
    });                                                                                     \
    break;                                                                                  \
  }
    LL_SILU_CASE(at::kFloat, float)
    LL_SILU_CASE(at::kBFloat16, bf16)
    LL_SILU_CASE(at::kHalf, f16)
#undef LL_SILU_CASE
    default: break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamalab, lib) {
  lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  lib.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  lib.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, lib) {
  lib.impl("rms_norm", &rms_norm);
  lib.impl("add_rms_norm", &add_rms_norm);
  lib.impl("silu_mul", &silu_mul);
}
