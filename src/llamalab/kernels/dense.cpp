// llamalab dense linears on CPU for few activation rows: y = x · Wᵀ (+ b), W (N, K) in float32, bfloat16 or
// float16, x (M, K) converted to float32, products and sums in float32.
//
// Decode (M = 1) is a matrix-vector product that reads every weight once: its speed is the speed at which the weight
// streams from memory. Each weight row is read in address order (rows one after the other, as the hardware
// prefetchers like it), loaded once and multiplied by up to 8 activation rows held in L1 (4 on AVX2); more
// activation rows go by chunks over the same (now cached) weight row; one activation row is a plain loop over the
// weight rows. Once per 4 KB of weight a prefetch a few pages ahead keeps the stream going across page boundaries
// (`prefetch_page_ahead`); where blocks.cpp's far prefetch mode is on, every line of a 16-bit weight is also
// prefetched 4 KB ahead, non-temporal (`kNtaAhead`). Weights are widened to float32 exactly: bf16 by a 16-bit left
// shift (on AVX-512, 32 at a time by even / odd halves against an activation regrouped even / odd once per call),
// fp16 by vcvtph2ps (F16C / AVX-512F); one FMA per product, so the only difference from a float32 GEMM is the order
// of the sums. AVX-512F (16 lanes, masked tails), AVX2 + FMA + F16C (8 lanes, scalar tails) and portable scalar
// code, chosen at run time from the ISA blocks.cpp dispatches on (AVX-512 VNNI -> AVX-512F, AVX2 / AVX-VNNI -> AVX2,
// scalar). Above `g_dense_rows` activation rows (per weight dtype) the op hands over to at::linear: from there a
// GEMM, which reuses each loaded activation over several weight rows, is faster.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
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
int64_t min_chunk();    // blocks.cpp: the least weight bytes x activation rows per thread of a product
int64_t weight_prefetch();  // blocks.cpp: the software prefetch mode, 0 off, 1 near, 2 far (set_block_prefetch)
}

namespace {

enum WType { F32, BF16, F16 };
constexpr int MB = 8;        // activation rows per pass over a weight row (AVX-512; 4 on AVX2, 16 registers)
// more activation rows than this (float32, bfloat16, float16 weights): at::linear; set by dense_configure
int64_t g_dense_rows[3] = {4, 4, 16};

int64_t dense_configure(int64_t rows_f32, int64_t rows_bf16, int64_t rows_f16) {
  g_dense_rows[F32] = rows_f32;
  g_dense_rows[BF16] = rows_bf16;
  g_dense_rows[F16] = rows_f16;
  return rows_f32;
}

// ------------------------------------------------------------------------------------------ scalar
template <WType T>
inline float wget(const void* w, int64_t i) {
  if (T == F32) return ((const float*)w)[i];
  if (T == BF16) {
    const uint32_t u = (uint32_t)((const uint16_t*)w)[i] << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return (float)((const c10::Half*)w)[i];
}

template <WType T>
void rows_scalar(const void* w, int64_t K, const float* x, int64_t M, int64_t n0, int64_t n1, int64_t N,
                 const float* bias, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // four partial sums (latency, not order, matters)
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {
        a0 += wget<T>(w, off + k) * xr[k];
        a1 += wget<T>(w, off + k + 1) * xr[k + 1];
        a2 += wget<T>(w, off + k + 2) * xr[k + 2];
        a3 += wget<T>(w, off + k + 3) * xr[k + 3];
      }
      for (; k < K; ++k) a0 += wget<T>(w, off + k) * xr[k];
      y[m * N + n] = (a0 + a1) + (a2 + a3) + (bias ? bias[n] : 0.f);
    }
  }
}

#if LL_X86
// The weight streams from memory one 4 KB page after another, and the hardware prefetchers stop at page
// boundaries: once per 4 KB of weight, a prefetch of one line kPageAhead bytes (4 pages) ahead starts the
// stream (and the TLB walk) of the pages to come early. On Zen 4, one thread: +10-50% GB/s at 1-2 rows (a
// prefetch of every line, or of lines a page or less ahead, was slower). A prefetch never faults.
constexpr uintptr_t kPageAhead = 16384;
inline void prefetch_page_ahead(const char* p) {
  _mm_prefetch((const char*)(((uintptr_t)p + kPageAhead) & ~(uintptr_t)4095), _MM_HINT_T0);
}
// With `nta` (16-bit weights, blocks.cpp's far prefetch mode: AMD family >= 26) the AVX-512 kernels also
// prefetch every weight line kNtaAhead bytes ahead, non-temporal, so that the stream does not evict from L2 /
// L3 what the rest of the step (Python, the KV cache, activations) keeps there. AMD EPYC Zen 5, one thread,
// SmolLM2 / gqa-125m decode, the same process alternating 9-11 rounds: bfloat16 +7-12% (2 KB ahead gained
// less, 6 KB the same); float32 -4% to +4% from run to run, so float32 weights keep the plain loads. No
// arithmetic changes.
constexpr int64_t kNtaAhead = 4096;

// ------------------------------------------------------------------------------------------ AVX2
#define LL_DENSE_AVX2_ATTR __attribute__((target("avx2,fma,f16c")))

template <WType T>
LL_DENSE_AVX2_ATTR inline __m256 load8(const void* w, int64_t k) {
  if (T == F32) return _mm256_loadu_ps((const float*)w + k);
  const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)w + k));
  if (T == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

LL_DENSE_AVX2_ATTR inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight row (K values) times MM activation rows (stride K) -> out[0..MM). Two accumulators per
// activation row (the FMA latency), whatever MM: a row's sums are done in the same order at every batch
// size, so a row's result does not depend on the rows it is batched with.
template <WType T, int MM>
LL_DENSE_AVX2_ATTR inline void row_avx2(const void* wr, int64_t K, const float* x, float* out, bool /*nta*/) {
  constexpr int U = 2;
  __m256 acc[U][MM];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MM; ++m) acc[u][m] = _mm256_setzero_ps();
  int64_t k = 0;
  constexpr int64_t SEG = T == F32 ? 1024 : 2048;  // weights per 4 KB
  const int64_t kmain = K / (8 * U) * (8 * U);
  for (int64_t s0 = 0; s0 < kmain; s0 += SEG) {
    prefetch_page_ahead((const char*)wr + s0 * (T == F32 ? 4 : 2));
    for (const int64_t s1 = std::min(kmain, s0 + SEG); k < s1; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const __m256 wv = load8<T>(wr, k + 8 * u);
        for (int m = 0; m < MM; ++m)
          acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[u][m]);
      }
    }
  }
  if (k + 8 <= K) {
    const __m256 wv = load8<T>(wr, k);
    for (int m = 0; m < MM; ++m) acc[0][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
    k += 8;  // these 8 are done (the scalar tail starts after them)
  }
  for (int m = 0; m < MM; ++m) {
    for (int u = 1; u < U; ++u) acc[0][m] = _mm256_add_ps(acc[0][m], acc[u][m]);
    float s = hsum8(acc[0][m]);
    for (int64_t j = k; j < K; ++j) s += wget<T>(wr, j) * x[m * K + j];
    out[m] = s;
  }
}

// ------------------------------------------------------------------------------------------ AVX-512F
#define LL_DENSE_AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,bmi,bmi2")))

template <WType T>
LL_DENSE_AVX512_ATTR inline __m512 load16(const void* w, int64_t k) {
  if (T == F32) return _mm512_loadu_ps((const float*)w + k);
  const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)w + k));
  if (T == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

template <WType T>
LL_DENSE_AVX512_ATTR inline __m512 load16_masked(const void* w, int64_t k, __mmask16 mask) {
  if (T == F32) return _mm512_maskz_loadu_ps(mask, (const float*)w + k);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t*)w + k);
  if (T == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

template <WType T, int MM>
LL_DENSE_AVX512_ATTR inline void row_avx512(const void* wr, int64_t K, const float* x, float* out, bool nta) {
  constexpr int U = 2;  // as on AVX2 (the same order at every MM); 2·MM ≤ 16 accumulators of 32 registers
  __m512 acc[U][MM];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MM; ++m) acc[u][m] = _mm512_setzero_ps();
  int64_t k = 0;
  constexpr int64_t SEG = T == F32 ? 1024 : 2048;  // weights per 4 KB
  const int64_t kmain = K / (16 * U) * (16 * U);
  for (int64_t s0 = 0; s0 < kmain; s0 += SEG) {
    prefetch_page_ahead((const char*)wr + s0 * (T == F32 ? 4 : 2));
    for (const int64_t s1 = std::min(kmain, s0 + SEG); k < s1; k += 16 * U) {
      // (16-bit weights: the 64 bytes this step reads, kNtaAhead further on)
      if (T != F32 && nta) _mm_prefetch((const char*)wr + k * 2 + kNtaAhead, _MM_HINT_NTA);
      for (int u = 0; u < U; ++u) {
        const __m512 wv = load16<T>(wr, k + 16 * u);
        for (int m = 0; m < MM; ++m)
          acc[u][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[u][m]);
      }
    }
  }
  for (; k < K; k += 16) {  // the rest, 16 at a time, the last step masked (zeros past the row)
    const __mmask16 mask = (__mmask16)_bzhi_u32(0xffffu, (unsigned)std::min<int64_t>(16, K - k));
    const __m512 wv = load16_masked<T>(wr, k, mask);
    for (int m = 0; m < MM; ++m)
      acc[0][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * K + k), acc[0][m]);
  }
  for (int m = 0; m < MM; ++m) {
    for (int u = 1; u < U; ++u) acc[0][m] = _mm512_add_ps(acc[0][m], acc[u][m]);
    out[m] = _mm512_reduce_add_ps(acc[0][m]);
  }
}

// bfloat16 weights on AVX-512: 32 weights per 512-bit load, widened by their even / odd halves (a 16-bit left
// shift gives the even elements as float32, an AND with 0xFFFF0000 the odd ones), against an activation
// regrouped once per call (`regroup_eo`: per 32 values, the 16 even ones then the 16 odd ones, zeros past K,
// row stride Kp = K rounded up to 32). Two accumulators per activation row (even, odd) at every MM: a row's
// result does not depend on the rows it is batched with.
template <int MM>
LL_DENSE_AVX512_ATTR inline void row_avx512_bf16eo(const uint16_t* wr, int64_t K, const float* xr, int64_t Kp,
                                                   float* out, bool nta) {
  const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 ae[MM], ao[MM];
  for (int m = 0; m < MM; ++m) ae[m] = ao[m] = _mm512_setzero_ps();
  int64_t k = 0;
  const int64_t kmain = K / 32 * 32;
  for (int64_t s0 = 0; s0 < kmain; s0 += 2048) {  // 2048 weights: 4 KB
    prefetch_page_ahead((const char*)(wr + s0));
    for (const int64_t s1 = std::min<int64_t>(kmain, s0 + 2048); k < s1; k += 32) {
      if (nta) _mm_prefetch((const char*)(wr + k) + kNtaAhead, _MM_HINT_NTA);  // (see kNtaAhead)
      const __m512i v = _mm512_loadu_si512(wr + k);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
      for (int m = 0; m < MM; ++m) {
        ae[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xr + m * Kp + k), ae[m]);
        ao[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xr + m * Kp + k + 16), ao[m]);
      }
    }
  }
  if (k < K) {  // the last K % 32 weights (zeros past the row; the regrouped activation is zero there too)
    const __m512i v = _mm512_maskz_loadu_epi16((__mmask32)_bzhi_u32(0xffffffffu, (unsigned)(K - k)), wr + k);
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    for (int m = 0; m < MM; ++m) {
      ae[m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xr + m * Kp + k), ae[m]);
      ao[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xr + m * Kp + k + 16), ao[m]);
    }
  }
  for (int m = 0; m < MM; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(ae[m], ao[m]));
}

LL_DENSE_AVX512_ATTR void rows_avx512_bf16(const void* w, int64_t K, const float* xr, int64_t Kp, int64_t M,
                                           int64_t n0, int64_t n1, int64_t N, const float* bias, float* y,
                                           bool nta) {
  const uint16_t* w16 = (const uint16_t*)w;
  float out[MB];
  if (M == 1) {  // decode: one plain loop over the weight rows
    for (int64_t n = n0; n < n1; ++n) {
      row_avx512_bf16eo<1>(w16 + n * K, K, xr, Kp, out, nta);
      y[n] = out[0] + (bias ? bias[n] : 0.f);
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w16 + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const float* xm = xr + m0 * Kp;
      const int64_t mm = std::min<int64_t>(MB, M - m0);
      switch (mm) {
        case 1: row_avx512_bf16eo<1>(wr, K, xm, Kp, out, nta); break;
        case 2: row_avx512_bf16eo<2>(wr, K, xm, Kp, out, nta); break;
        case 3: row_avx512_bf16eo<3>(wr, K, xm, Kp, out, nta); break;
        case 4: row_avx512_bf16eo<4>(wr, K, xm, Kp, out, nta); break;
        case 5: row_avx512_bf16eo<5>(wr, K, xm, Kp, out, nta); break;
        case 6: row_avx512_bf16eo<6>(wr, K, xm, Kp, out, nta); break;
        case 7: row_avx512_bf16eo<7>(wr, K, xm, Kp, out, nta); break;
        default: row_avx512_bf16eo<8>(wr, K, xm, Kp, out, nta); break;
      }
      const float b = bias ? bias[n] : 0.f;
      for (int64_t m = 0; m < mm; ++m) y[(m0 + m) * N + n] = out[m] + b;
    }
  }
}

// rows n0..n1 of W times all M activation rows; MM-row chunks dispatched to the template instances (one
// activation row: a plain loop of the 1-row instance, the same sums)
#define LL_DENSE_ROWS(NAME, ATTR, ROW, CHUNK)                                                             \
  template <WType T>                                                                                      \
  ATTR void NAME(const void* w, int64_t K, const float* x, int64_t M, int64_t n0, int64_t n1, int64_t N,  \
                 const float* bias, float* y, bool nta) {                                                 \
    const int64_t esz = T == F32 ? 4 : 2;                                                                 \
    float out[MB];                                                                                        \
    if (M == 1) {                                                                                         \
      for (int64_t n = n0; n < n1; ++n) {                                                                 \
        ROW<T, 1>((const char*)w + n * K * esz, K, x, out, nta);                                          \
        y[n] = out[0] + (bias ? bias[n] : 0.f);                                                           \
      }                                                                                                   \
      return;                                                                                             \
    }                                                                                                     \
    for (int64_t n = n0; n < n1; ++n) {                                                                   \
      const void* wr = (const char*)w + n * K * esz;                                                      \
      for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {                                                         \
        const float* xm = x + m0 * K;                                                                     \
        const int64_t mm = std::min<int64_t>(CHUNK, M - m0);                                              \
        switch (mm) {                                                                                     \
          case 1: ROW<T, 1>(wr, K, xm, out, nta); break;                                                  \
          case 2: ROW<T, 2>(wr, K, xm, out, nta); break;                                                  \
          case 3: ROW<T, 3>(wr, K, xm, out, nta); break;                                                  \
          case 4: ROW<T, 4>(wr, K, xm, out, nta); break;                                                  \
          case 5: ROW<T, CHUNK < 5 ? 1 : 5>(wr, K, xm, out, nta); break;                                  \
          case 6: ROW<T, CHUNK < 6 ? 1 : 6>(wr, K, xm, out, nta); break;                                  \
          case 7: ROW<T, CHUNK < 7 ? 1 : 7>(wr, K, xm, out, nta); break;                                  \
          default: ROW<T, CHUNK < 8 ? 1 : 8>(wr, K, xm, out, nta); break;                                 \
        }                                                                                                 \
        const float b = bias ? bias[n] : 0.f;                                                             \
        for (int64_t m = 0; m < mm; ++m) y[(m0 + m) * N + n] = out[m] + b;                                \
      }                                                                                                   \
    }                                                                                                     \
  }

// rows n0..n1 of W times all M activation rows; MM-row chunks dispatched to the template instances (one
// activation row: a plain loop of the 1-row instance, the same sums)
LL_DENSE_ROWS(rows_avx2, LL_DENSE_AVX2_ATTR, row_avx2, 4)
LL_DENSE_ROWS(rows_avx512, LL_DENSE_AVX512_ATTR, row_avx512, MB)
#endif

// x (M, K) -> xr (M, Kp): per 32 values the 16 even ones, then the 16 odd ones; zeros past K
void regroup_eo(const float* x, int64_t M, int64_t K, int64_t Kp, float* xr) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xs = x + m * K;
    float* xd = xr + m * Kp;
    for (int64_t b = 0; b < Kp; b += 32) {
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t e = b + 2 * i;
        xd[b + i] = e < K ? xs[e] : 0.f;
        xd[b + 16 + i] = e + 1 < K ? xs[e + 1] : 0.f;
      }
    }
  }
}

template <WType T>
void rows_any(int64_t isa, const void* w, int64_t K, const float* x, int64_t M, int64_t n0, int64_t n1, int64_t N,
              const float* bias, float* y, bool nta) {
#if LL_X86
  if (isa == 3) return rows_avx512<T>(w, K, x, M, n0, n1, N, bias, y, nta);
  if (isa == 1 || isa == 2) return rows_avx2<T>(w, K, x, M, n0, n1, N, bias, y, nta);
#endif
  rows_scalar<T>(w, K, x, M, n0, n1, N, bias, y);
}

// [x · W_iᵀ (+ bias)] for x (..., K) of any float dtype and weights W_i (N_i, K) of one dtype (a bias only with
// one weight); each y_i has x's leading shape and dtype. The activation is widened (and, for bf16 weights on
// AVX-512, regrouped) once for all the weights, and the rows of all of them are one range split over the
// threads; each output row is computed exactly as a call for its own weight alone computes it (the same row
// kernel, the same sums), so joint and separate calls give the same bits.
std::vector<at::Tensor> dense_products(const char* op, const at::Tensor& x_in, at::TensorList ws,
                                       const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(!ws.empty(), "llamalab ", op, ": needs at least one weight");
  const at::Tensor& w0 = ws[0];
  TORCH_CHECK(w0.dim() == 2, "llamalab ", op, ": w must be 2-D (N, K), got ", w0.dim(), "-D");
  const at::ScalarType wt = w0.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf,
              "llamalab ", op, ": w must be float32, bfloat16 or float16, got ", wt);
  const int64_t K = w0.size(1);
  bool dense_ok = x_in.device().is_cpu();
  for (const at::Tensor& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.scalar_type() == wt, "llamalab ", op,
                ": every weight must be 2-D (N, ", K, ") of dtype ", wt);
    dense_ok = dense_ok && w.is_contiguous() && w.device().is_cpu();
  }
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "llamalab ", op, ": x must be a float tensor");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "llamalab ", op, ": x's last dimension (",
              x_in.dim() ? x_in.size(-1) : 0, ") must be w's K = ", K);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    TORCH_CHECK(ws.size() == 1, "llamalab ", op, ": a bias only with one weight");
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == w0.size(0), "llamalab ", op, ": bias must be (N,) = (",
                w0.size(0), ",)");
  }
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x_in.dim(); ++i) M *= x_in.size(i);
  const WType wk = wt == at::kFloat ? F32 : (wt == at::kBFloat16 ? BF16 : F16);
  const size_t nw = ws.size();
  std::vector<at::Tensor> ys;
  ys.reserve(nw);
  if (M > g_dense_rows[wk] || !dense_ok) {
    // a GEMM amortises the weight over many rows (and handles what the kernel does not)
    const at::Tensor xw = x_in.to(wt);
    for (const at::Tensor& w : ws)
      ys.push_back(at::linear(xw, w, has_bias ? c10::optional<at::Tensor>(bias_in->to(wt)) : c10::nullopt)
                       .to(x_in.scalar_type()));
    return ys;
  }
  // A contiguous float32 / bfloat16 / float16 activation (the decode case) is read, and y written, with no
  // extra torch ops: 16-bit activations are widened into a per-thread buffer and the float32 result is
  // rounded (to nearest even, as Tensor.to) into y. Anything else goes through a float32 copy.
  const at::ScalarType xt = x_in.scalar_type();
  const bool direct = x_in.is_contiguous() && (xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf);
  const at::ScalarType yt = direct ? xt : at::kFloat;
  int64_t total = 0;  // weight rows of all the weights
  for (const at::Tensor& w : ws) {
    c10::SmallVector<int64_t, 4> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
    out_sizes.back() = w.size(0);
    ys.push_back(at::empty(out_sizes, x_in.options().dtype(yt)));
    total += w.size(0);
  }
  if (M == 0 || total == 0) {
    if (!direct)
      for (auto& y : ys) y = y.to(xt);
    return ys;
  }
  thread_local std::vector<float> xbuf, ybuf;
  at::Tensor x;
  const float* xp;
  if (xt == at::kFloat && direct) {
    xp = x_in.data_ptr<float>();
  } else if (direct) {
    xbuf.resize(std::max<size_t>(xbuf.size(), M * K));
    if (xt == at::kBFloat16) {
      const c10::BFloat16* src = x_in.data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < M * K; ++i) xbuf[i] = (float)src[i];
    } else {
      const c10::Half* src = x_in.data_ptr<c10::Half>();
      for (int64_t i = 0; i < M * K; ++i) xbuf[i] = (float)src[i];
    }
    xp = xbuf.data();
  } else {
    x = x_in.to(at::kFloat).contiguous();
    xp = x.data_ptr<float>();
  }
  // where each weight's float32 result goes: y itself, or (16-bit y) its part of one float32 buffer
  if (yt != at::kFloat) ybuf.resize(std::max<size_t>(ybuf.size(), M * total));
  struct Part {
    const void* w;
    int64_t N, first;  // rows, and the first of them in the joint range
    float* y;
  };
  c10::SmallVector<Part, 4> parts;
  int64_t first = 0;
  for (size_t i = 0; i < nw; ++i) {
    const int64_t N = ws[i].size(0);
    float* yp = yt == at::kFloat ? ys[i].data_ptr<float>() : ybuf.data() + M * first;
    parts.push_back({ws[i].data_ptr(), N, first, yp});
    first += N;
  }
  at::Tensor bias;
  if (has_bias) bias = bias_in->to(at::kFloat).contiguous();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const int64_t isa = llamalab::current_isa();
  const bool nta = wk != F32 && llamalab::weight_prefetch() == 2;  // 16-bit weights, far mode: see kNtaAhead
  // at least llamalab::min_chunk() weight bytes x rows per thread: small batch-1 products stay on the calling
  // thread (blocks.cpp has the measurements)
  const int64_t grain = std::max<int64_t>(1, llamalab::min_chunk() / std::max<int64_t>(1, K * w0.element_size() * M));
  // rows [r0, r1) of the joint range, weight by weight, through `rows(part, n0, n1)` (rows of that weight)
  auto over_parts = [&](int64_t r0, int64_t r1, auto&& rows) {
    for (const Part& p : parts) {
      const int64_t a = std::max(r0, p.first), b = std::min(r1, p.first + p.N);
      if (a < b) rows(p, a - p.first, b - p.first);
    }
  };
#if LL_X86
  if (wk == BF16 && isa == 3) {
    thread_local std::vector<float> xrbuf;
    const int64_t Kp = (K + 31) / 32 * 32;
    xrbuf.resize(std::max<size_t>(xrbuf.size(), M * Kp + 16));
    float* xr = (float*)(((uintptr_t)xrbuf.data() + 63) & ~(uintptr_t)63);  // 64-byte aligned rows (Kp % 16 == 0)
    regroup_eo(xp, M, K, Kp, xr);
    at::parallel_for(0, total, grain, [&](int64_t r0, int64_t r1) {
      over_parts(r0, r1, [&](const Part& p, int64_t n0, int64_t n1) {
        rows_avx512_bf16(p.w, K, xr, Kp, M, n0, n1, p.N, bp, p.y, nta);
      });
    });
  } else
#endif
  at::parallel_for(0, total, grain, [&](int64_t r0, int64_t r1) {
    over_parts(r0, r1, [&](const Part& p, int64_t n0, int64_t n1) {
      switch (wk) {
        case F32: return rows_any<F32>(isa, p.w, K, xp, M, n0, n1, p.N, bp, p.y, nta);
        case BF16: return rows_any<BF16>(isa, p.w, K, xp, M, n0, n1, p.N, bp, p.y, nta);
        case F16: return rows_any<F16>(isa, p.w, K, xp, M, n0, n1, p.N, bp, p.y, nta);
      }
    });
  });
  for (size_t i = 0; i < nw && yt != at::kFloat; ++i) {
    const float* src = parts[i].y;
    const int64_t n = M * parts[i].N;
    if (yt == at::kBFloat16) {
      c10::BFloat16* dst = ys[i].data_ptr<c10::BFloat16>();
      for (int64_t j = 0; j < n; ++j) dst[j] = c10::BFloat16(src[j]);
    } else {
      c10::Half* dst = ys[i].data_ptr<c10::Half>();
      for (int64_t j = 0; j < n; ++j) dst[j] = c10::Half(src[j]);
    }
  }
  if (!direct)
    for (auto& y : ys) y = y.to(xt);
  return ys;
}

// y = x · Wᵀ (+ bias) for x (..., K) of any float dtype; y has x's leading shape and dtype.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  return dense_products("dense_linear", x, {w}, bias)[0];
}

// [x · W_iᵀ] for weights of one dtype and width that read the same x (q|k|v): each the dense_linear of its own
std::vector<at::Tensor> dense_linears(const at::Tensor& x, at::TensorList ws) {
  return dense_products("dense_linears", x, ws, c10::nullopt);
}

// SwiGLU's input to down_proj, silu(x · W_gateᵀ) ⊙ (x · W_upᵀ): dense_linears of the two, then
// llamalab::silu_mul (norm.cpp) on them: the same ops and roundings as the three calls from Python, in one.
at::Tensor dense_swiglu(const at::Tensor& x, at::TensorList ws) {
  TORCH_CHECK(ws.size() == 2, "llamalab dense_swiglu: takes two weights (gate, up), got ", ws.size());
  static const auto silu_mul = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("llamalab::silu_mul", "")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const std::vector<at::Tensor> gate_up = dense_products("dense_swiglu", x, ws, c10::nullopt);
  return silu_mul.call(gate_up[0], gate_up[1]);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamalab, lib) {
  lib.def("dense_linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  lib.def("dense_linears(Tensor x, Tensor[] ws) -> Tensor[]");
  lib.def("dense_swiglu(Tensor x, Tensor[] ws) -> Tensor");
  lib.def("dense_configure(int rows_f32, int rows_bf16, int rows_f16) -> int", &dense_configure);
}

TORCH_LIBRARY_IMPL(llamalab, CPU, lib) {
  lib.impl("dense_linear", &dense_linear);
  lib.impl("dense_linears", &dense_linears);
  lib.impl("dense_swiglu", &dense_swiglu);
}
