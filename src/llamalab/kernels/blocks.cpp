// llamalab block-quantized linears on CPU: y = x · Wᵀ with W in GGUF Q8_0 / Q4_0 / Q4_1 blocks of 32.
//
// llama.cpp's recipe: each 32-block of an activation row is quantized to int8 with one float scale
// (dx = max|x| / 127, qx = round(x / dx)); a weight block times an activation block is an integer dot
// product (vpdpbusd on AVX-512 VNNI / AVX-VNNI, maddubs + madd on AVX2), and the scales enter once per
// block as one float FMA:
//   Q8_0:  w = dw · qw             y += dw·dx · Σ qw·qx
//   Q4_0:  w = dw · (qw − 8)       y += dw·dx · Σ qw·qx  − 8 · dw · (dx · Σ qx)
//   Q4_1:  w = dw · qw + mw        y += dw·dx · Σ qw·qx  +     mw · (dx · Σ qx)
// One translation unit; each instruction set is a function compiled with a target attribute and chosen
// at run time (set_isa), so one build serves every x86-64 CPU. Rows of W are split over threads with
// at::parallel_for; each weight row is read once per call and multiplied by all activation rows.
// Below the GEMM threshold (g_gemm_rows) every output element is summed in one order whatever the number of
// activation rows, on every ISA: a row of a batch is bit for bit the row alone (a batched greedy decode is
// the one-at-a-time decode). AVX-512: cols_avx512 repeats rows_avx512's arithmetic; the other paths run the
// batch-1 kernel once per activation row.
//
// Weight layout (as in the GGUF file, scales split out): Q8_0 qs int8 (N, K); Q4_x qs uint8 (N, K/2)
// where byte j of a block holds element j (low nibble) and element j + 16 (high nibble); d, m fp16
// (N, K/32). The quantized activation is laid out to match whichever ISA reads it (see quantize_rows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define LL_X86 1
#else
#define LL_X86 0
#endif

namespace {

enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVXVNNI = 2, AVX512VNNI = 3 };
enum Kind { Q8_0, Q4_0, Q4_1 };
constexpr int QK = 32;
constexpr int MAXG = 4;  // activation blocks are padded to a multiple of this many
// least weight bytes x activation rows per thread of a product (set_min_chunk; dense.cpp reads it too)
int64_t g_min_chunk = 256 << 10;
int64_t set_min_chunk(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "llamalab set_min_chunk: the chunk must be a positive number of bytes, got ", bytes);
  const int64_t old = g_min_chunk;
  g_min_chunk = bytes;
  return old;
}

int64_t g_isa = -1;  // -1: best available
int64_t g_gemm_rows = 24;  // from this many activation rows on: dequantize + GEMM (set by configure)
bool g_gemm_bf16 = false;  // the GEMM in bfloat16 (CPUs with bf16 dot products)

int64_t configure(int64_t gemm_rows, bool gemm_bf16) {
  g_gemm_rows = gemm_rows;
  g_gemm_bf16 = gemm_bf16;
  return g_gemm_rows;
}

bool supported(int64_t isa) {
#if LL_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (isa) {
    case AVX512VNNI:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("bmi2");
    case AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni");
    case AVX2: return avx2;
  }
#endif
  return isa == SCALAR;
}

int64_t cpu_isa() {
  for (int64_t isa = AVX512VNNI; isa > SCALAR; --isa)
    if (supported(isa)) return isa;
  return SCALAR;
}

int64_t active_isa() {
  if (g_isa < 0) g_isa = cpu_isa();
  return g_isa;
}

int64_t set_isa(int64_t isa) {
  TORCH_CHECK(isa == -1 || supported(isa), "llamalab kernels: ISA ", isa, " is not available on this CPU");
  g_isa = isa < 0 ? cpu_isa() : isa;
  return g_isa;
}

// Software prefetch of the streamed weight at batch 1 (rows_avx512 / the 256-bit rows), chosen from the CPU:
// each 64-byte weight step also prefetches the bytes L1 ahead into L1 (T0) and L2 ahead into L2 (T1), and
// the scales as far ahead as the weight (T0). Near (1 KB / 4 KB): on an Intel Xeon (AVX-512 VNNI, AMX) this
// read a streamed weight 17-28% faster (256-bit paths 21-73%) than the hardware prefetchers alone. Far
// (8 KB / 32 KB, the AVX-512 kernel; the 256-bit ones take near): on an AMD EPYC of family 26 (Zen 5) near
// read it 2.5-2.7x faster than no prefetch (SmolLM2 Q4_1 decode 65 -> 173 tok/s) and far another 7-17% (Q8_0
// 121 -> 142). For Q4_0 / Q4_1, far is one non-temporal prefetch (NTA) 8 KB ahead instead, which keeps the
// streamed weight out of L2 and L3: 6-12% faster again there, while for Q8_0 it was 1-5% slower;
// docs/kernels.md has the figures. On AMD Zen 4 (family 25) software prefetches were found to
// get in the hardware prefetchers' way, so there and on other CPUs the plain loads stay. On the Intel Xeon,
// non-temporal prefetches (NTA, so the weight does not evict L2) and CLDEMOTE behind the reads were tried
// too: both made the kernels slower than they saved elsewhere. The prefetched addresses run past the end of
// a row into the next rows (a tile's rows are contiguous) and at most L2 bytes past the weight's end: a
// prefetch never faults, so that is harmless.
enum Prefetch : int64_t { PF_OFF = 0, PF_NEAR = 1, PF_FAR = 2 };
// how far ahead each mode prefetches; far for Q4 is one NTA prefetch L1 ahead (rows_avx512)
template <int PF>
struct PfDist {
  static constexpr int64_t L1 = PF == PF_FAR ? 8192 : 1024, L2 = PF == PF_FAR ? 32768 : 4096;
};
int64_t g_prefetch = -1;  // -1: chosen from the CPU; set_block_prefetch forces one

#if LL_X86
int x86_family() {  // the CPU's display family (base + extended), 0 where cpuid cannot tell
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int base = (a >> 8) & 0xf;
  return base == 0xf ? base + ((a >> 20) & 0xff) : base;
}
#endif

int64_t prefetch_mode() {
  if (g_prefetch >= 0) return g_prefetch;
#if LL_X86
  static const int64_t by_cpu = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return PF_NEAR;
    return __builtin_cpu_is("amd") && x86_family() >= 26 ? PF_FAR : PF_OFF;
  }();
  return by_cpu;
#else
  return PF_OFF;
#endif
}
bool prefetch_weights() { return prefetch_mode() != PF_OFF; }  // the 256-bit kernels: near, or none

// set_block_prefetch(mode): -1 by CPU (the default), 0 off, 1 near, 2 far; returns the mode before. For
// measuring: results are bit-identical in every mode.
int64_t set_block_prefetch(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 2, "llamalab set_block_prefetch: mode must be -1, 0, 1 or 2, got ", mode);
  const int64_t old = prefetch_mode();
  g_prefetch = mode;
  return old;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// One activation row quantized: qx (int8, layout per kind/group), dx (scale per block), sx (dx · Σ qx).
struct QRow {
  const int8_t* q;
  const float* d;
  const float* s;
};

// Quantize rows of x (M, K) into per-32 int8 blocks. For Q4 kinds the 32 values of each block are split
// into the low half (elements 0..15) and the high half (16..31) and, per group of `group` blocks, all low
// halves come first, then all high halves: a 16·group-byte load of packed nibbles, masked to its low
// (high) nibbles, then lines up with the low (high) part. Blocks are zero-padded to a multiple of MAXG.
void quantize_rows(const float* x, int64_t M, int64_t K, Kind kind, int group, int8_t* q, float* d, float* s) {
  const int64_t nb = K / QK, nbp = (nb + MAXG - 1) / MAXG * MAXG;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * nbp * QK;
    float* dr = d + m * nbp;
    float* sr = s + m * nbp;
    std::memset(qr, 0, nbp * QK);
    for (int64_t b = nb; b < nbp; ++b) dr[b] = sr[b] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = xr + b * QK;
      float amax = 0.f;
      for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float db = amax / 127.f, id = db != 0.f ? 1.f / db : 0.f;
      int sum = 0;
      int8_t vals[QK];
      for (int i = 0; i < QK; ++i) {
        const int v = (int)std::nearbyint(xb[i] * id);
        vals[i] = (int8_t)std::min(127, std::max(-127, v));
        sum += vals[i];
      }
      dr[b] = db;
      sr[b] = db * (float)sum;
      if (kind == Q8_0) {
        std::memcpy(qr + b * QK, vals, QK);
      } else {
        const int64_t g0 = b / group * group, j = b - g0;
        int8_t* base = qr + g0 * QK;
        std::memcpy(base + j * 16, vals, 16);
        std::memcpy(base + group * 16 + j * 16, vals + 16, 16);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ scalar
float dot_scalar(Kind kind, const uint8_t* w, const uint16_t* dw, const uint16_t* mw, QRow x, int64_t nb,
                 int group) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    int isum = 0;
    if (kind == Q8_0) {
      const int8_t* wb = (const int8_t*)w + b * QK;
      const int8_t* xb = x.q + b * QK;
      for (int i = 0; i < QK; ++i) isum += wb[i] * xb[i];
    } else {
      const uint8_t* wb = w + b * 16;
      const int64_t g0 = b / group * group, j = b - g0;
      const int8_t* lo = x.q + g0 * QK + j * 16;
      const int8_t* hi = x.q + g0 * QK + group * 16 + j * 16;
      for (int i = 0; i < 16; ++i) isum += (wb[i] & 15) * lo[i] + (wb[i] >> 4) * hi[i];
    }
    const float d = half_to_float(dw[b]);
    acc += d * x.d[b] * (float)isum;
    if (kind == Q4_0) acc -= 8.f * d * x.s[b];
    if (kind == Q4_1) acc += half_to_float(mw[b]) * x.s[b];
  }
  return acc;
}

#if LL_X86
// ------------------------------------------------------------------------------------------ AVX2 / AVX-VNNI
// 256-bit: Q8_0 one block per step (scale broadcast), Q4 two blocks per step (group = 2). R weight rows
// are multiplied by the same activation row at once (independent accumulators, shared activation loads).
// PF: the weight prefetched ahead (prefetch_weights; the weight only, its scales are left to the hardware).
#define LL_AVX2_ATTR __attribute__((target("avx2,fma,f16c")))
#define LL_AVXVNNI_ATTR __attribute__((target("avx2,fma,f16c,avxvnni")))

// the prefetches of one weight step at p (see prefetch_weights)
template <int PF = PF_NEAR>
inline void prefetch_step(const char* p) {
  _mm_prefetch(p + PfDist<PF>::L1, _MM_HINT_T0);
  _mm_prefetch(p + PfDist<PF>::L2, _MM_HINT_T1);
}

template <bool VNNI>
struct Avx256;

template <>
struct Avx256<false> {
  static LL_AVX2_ATTR inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
  }
  static LL_AVX2_ATTR inline __m256i dot2_u8s8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    // nibbles (<= 15) times int8: int16 pair sums cannot saturate, so add before widening
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                             _mm256_set1_epi16(1));
  }
};

template <>
struct Avx256<true> {
  static LL_AVXVNNI_ATTR inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
  }
  static LL_AVXVNNI_ATTR inline __m256i dot2_u8s8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
  }
};

LL_AVX2_ATTR inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LL_AVX2_ATTR inline __m128 load_half2(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128((int)v));
}

#define LL_DEFINE_ROWS256(NAME, ATTR, VNNI)                                                                   \
  template <int R, bool PF>                                                                                 \
  ATTR void NAME(Kind kind, const uint8_t* w, int64_t rb, const uint16_t* dw, const uint16_t* mw, int64_t nb, \
                 QRow x, float* out) {                                                                      \
    using D = Avx256<VNNI>;                                                                                 \
    __m256 acc[R];                                                                                          \
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();                                               \
    if (kind == Q8_0) {                                                                                     \
      for (int r = 0; r < R; ++r) { /* row by row: the weight read in address order */                    \
        for (int64_t b = 0; b < nb; ++b) {                                                                  \
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q + b * QK));                            \
          const float xd = x.d[b];                                                                          \
          if (PF) prefetch_step((const char*)(w + r * rb + b * QK));                                        \
          const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + r * rb + b * QK));                     \
          const __m256i p = D::dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));                \
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(dw[r * nb + b]) * xd), acc[r]); \
        }                                                                                                   \
      }                                                                                                     \
      for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]);                                                 \
      return;                                                                                               \
    }                                                                                                       \
    const __m256i low = _mm256_set1_epi8(15);                                                               \
    const __m256i idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);                                         \
    __m128 corr[R];                                                                                         \
    for (int r = 0; r < R; ++r) corr[r] = _mm_setzero_ps();                                                 \
    int64_t b = 0;                                                                                          \
    for (int r = 0; r < R; ++r) { /* row by row: the weight read in address order */                      \
      for (b = 0; b + 2 <= nb; b += 2) {                                                                    \
        const __m256i xlo = _mm256_loadu_si256((const __m256i*)(x.q + b * QK));                             \
        const __m256i xhi = _mm256_loadu_si256((const __m256i*)(x.q + b * QK + 32));                        \
        const __m128 xd2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(x.d + b)));                    \
        const __m128 xs2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(x.s + b)));                    \
        if (PF) prefetch_step((const char*)(w + r * rb + b * 16));                                          \
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + r * rb + b * 16));                       \
        const __m256i p = D::dot2_u8s8(_mm256_and_si256(wv, low), xlo,                                      \
                                       _mm256_and_si256(_mm256_srli_epi16(wv, 4), low), xhi);               \
        const __m128 d2 = load_half2(dw + r * nb + b);                                                      \
        const __m256 sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_mul_ps(d2, xd2)), idx);       \
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, acc[r]);                                        \
        corr[r] = _mm_fmadd_ps(kind == Q4_0 ? d2 : load_half2(mw + r * nb + b), xs2, corr[r]);              \
      }                                                                                                     \
    }                                                                                                       \
    for (int r = 0; r < R; ++r) {                                                                           \
      float extra = 0.f;                                                                                    \
      float c = _mm_cvtss_f32(corr[r]) + _mm_cvtss_f32(_mm_shuffle_ps(corr[r], corr[r], 1));               \
      if (b < nb) { /* odd tail block: its low/high halves sit 32 bytes apart in a group of 2 */            \
        const uint8_t* wb = w + r * rb + b * 16;                                                            \
        const int8_t* lo = x.q + b * QK;                                                                    \
        int isum = 0;                                                                                       \
        for (int i = 0; i < 16; ++i) isum += (wb[i] & 15) * lo[i] + (wb[i] >> 4) * lo[32 + i];              \
        const float d = _cvtsh_ss(dw[r * nb + b]);                                                          \
        extra = d * x.d[b] * (float)isum;                                                                   \
        c += (kind == Q4_0 ? d : _cvtsh_ss(mw[r * nb + b])) * x.s[b];                                       \
      }                                                                                                     \
      out[r] = hsum256(acc[r]) + extra + (kind == Q4_0 ? -8.f * c : c);                                     \
    }                                                                                                       \
  }

LL_DEFINE_ROWS256(rows_avx2, LL_AVX2_ATTR, false)
LL_DEFINE_ROWS256(rows_avxvnni, LL_AVXVNNI_ATTR, true)

// ------------------------------------------------------------------------------------------ AVX-512 VNNI
// One step = 64 weight bytes of a row: two Q8_0 blocks or four Q4 blocks (group = 4). The last, partial
// step uses masked loads (zeros past the row), and the activation is zero-padded, so no scalar tail.
//
// Q8_0 feeds the weight to vpdpbusd's unsigned operand: u = q XOR 0x80 = q + 128 (0..255), so
//   Σ q·qx = Σ u·qx − 128 · Σ qx,   y += dw·dx · Σ u·qx − 128 · dw · (dx · Σ qx)
// which is Q4_0's formula with the offset 128 instead of 8: one XOR per weight vector, and the correction
// comes from the activation's block sums already at hand (no per-block sign trick).
//
// Memory order: a weight matrix is read strictly in address order (a tile's rows one after the other, not
// interleaved step by step), which the hardware prefetchers follow at close to the memory bandwidth;
// interleaving the 4 rows of a tile left a streamed weight at a third of it. Software prefetches (T0, 0.5 to
// 16 KB ahead) got in the prefetchers' way on AMD Zen 4, while a prefetch per step reads a streamed weight
// 17-28% faster on an Intel Xeon (T0 1 KB + T1 4 KB ahead) and ~3x faster on AMD Zen 5 (Q8_0: T0 8 KB + T1
// 32 KB; Q4: NTA 8 KB): PF, from prefetch_mode. Prefetches change no arithmetic: the results are
// bit-identical in every mode.
#define LL_AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi,bmi2")))

template <Kind KIND>
struct K512 {
  static constexpr int G = KIND == Q8_0 ? 2 : 4;            // blocks per 64-byte step
  static constexpr int64_t BB = KIND == Q8_0 ? QK : QK / 2;  // weight bytes per block
  static constexpr float OFF = KIND == Q8_0 ? -128.f : (KIND == Q4_0 ? -8.f : 1.f);  // y += OFF · Σ c·xs

  // the lane -> block map of a step's 16 int32 dot-product lanes
  static LL_AVX512_ATTR inline __m512i lane_block() {
    return G == 2 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                  : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  }
  // the weight vector in the form the integer dot wants: Q8_0 u = q + 128; Q4 low / high nibbles
  struct W {
    __m512i a, b;
  };
  static LL_AVX512_ATTR inline W unpack(__m512i wv) {
    if (KIND == Q8_0) return {_mm512_xor_si512(wv, _mm512_set1_epi8((char)0x80)), wv};
    const __m512i low = _mm512_set1_epi8(15);
    return {_mm512_and_si512(wv, low), _mm512_and_si512(_mm512_srli_epi16(wv, 4), low)};
  }
  // Σ u·qx per lane (8 lanes per Q8_0 block, 4 per Q4 block); xq points at the step's activation bytes
  static LL_AVX512_ATTR inline __m512i dot(W w, const int8_t* xq) {
    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.a, _mm512_loadu_si512(xq));
    return KIND == Q8_0 ? p : _mm512_dpbusd_epi32(p, w.b, _mm512_loadu_si512(xq + 64));
  }
};

LL_AVX512_ATTR inline __m128 hsum128x4(__m128 a, __m128 b, __m128 c, __m128 d) {  // [Σa, Σb, Σc, Σd]
  return _mm_hadd_ps(_mm_hadd_ps(a, b), _mm_hadd_ps(c, d));
}

LL_AVX512_ATTR inline __m128 hsum512x4(__m512 a, __m512 b, __m512 c, __m512 d) {  // [Σa, Σb, Σc, Σd]
  auto half = [](__m512 v) LL_AVX512_ATTR {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// R consecutive weight rows (stride rb bytes) times one activation row -> out[0..R). Blocks go by groups of
// 16: the group's 16 scales are converted and multiplied by the activation's at once,
//   s = dw·dx (16 blocks),   corr += (dw or mw) · xs (16 blocks),
// then each 64-byte step of the group does   acc += float(Σ u·qx per lane) · s[block of the lane]
// (one permute picks the step's scales); at the end y = Σ acc + OFF · Σ corr, R rows reduced together.
template <Kind KIND, int R, int PF>
LL_AVX512_ATTR void rows_avx512(const uint8_t* w, int64_t rb, const uint16_t* dw, const uint16_t* mw, int64_t nb,
                                QRow x, float* out) {
  using S = K512<KIND>;
  __m512 acc[R];
  const __m512i idx0 = S::lane_block(), next = _mm512_set1_epi32(S::G);
  // row by row (the weight read strictly in address order), the activation re-read from L1 for each
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * rb;
    const uint16_t* dr = dw + r * nb;
    const uint16_t* mr = KIND == Q4_1 ? mw + r * nb : nullptr;
    __m512 a = _mm512_setzero_ps(), corr = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 16) {
      const __mmask16 gm = (__mmask16)_bzhi_u32(0xffffu, (unsigned)std::min<int64_t>(16, nb - b0));
      if (PF) {  // the scales as far ahead as the weight: 2 bytes per block against its BB
        _mm_prefetch((const char*)(dr + b0) + PfDist<PF>::L1 * 2 / S::BB, _MM_HINT_T0);
        if (KIND == Q4_1) _mm_prefetch((const char*)(mr + b0) + PfDist<PF>::L1 * 2 / S::BB, _MM_HINT_T0);
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, dr + b0));
      const __m512 sc = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(gm, x.d + b0));
      const __m512 c = KIND == Q4_1 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, mr + b0)) : d;
      corr = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(gm, x.s + b0), corr);
      __m512i idx = idx0;
#pragma GCC unroll 8
      for (int k = 0; k < 16 / S::G; ++k) {
        const int64_t b = b0 + k * S::G;
        if (b >= nb) break;
        // bytes of this step inside the row: all 64, or the rest of a row whose block count is not a multiple
        const __mmask64 mask = _bzhi_u64(~0ULL, (unsigned)std::min<int64_t>(64, (nb - b) * S::BB));
        if (PF == PF_FAR && KIND != Q8_0) {  // far, Q4: one non-temporal prefetch (see PfDist)
          _mm_prefetch((const char*)(wr + b * S::BB) + PfDist<PF>::L1, _MM_HINT_NTA);
        } else if (PF) {
          prefetch_step<PF>((const char*)(wr + b * S::BB));
        }
        const __m512i p = S::dot(S::unpack(_mm512_maskz_loadu_epi8(mask, wr + b * S::BB)), x.q + b * QK);
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, sc), a);
        idx = _mm512_add_epi32(idx, next);
      }
    }
    acc[r] = _mm512_fmadd_ps(corr, _mm512_set1_ps(S::OFF), a);
  }
  if (R == 4) {
    _mm_storeu_ps(out, hsum512x4(acc[0], acc[1], acc[2], acc[3]));
    return;
  }
  const __m512 z = _mm512_setzero_ps();  // a tile's leftover rows: the same sum as an element of a full tile
  for (int r = 0; r < R; ++r) out[r] = _mm_cvtss_f32(hsum512x4(acc[r], z, z, z));
}

// Several activation rows (batch > 1) times one weight row: each output element computed exactly as
// rows_avx512 computes it (the same per-lane FMAs in the same order, the correction in its own accumulator
// and added at the end as acc = corr · OFF + a, the lanes summed by hsum512x4), so a row of a batch is bit for
// bit the row alone; each weight step is loaded and unpacked once and used for all MR rows.
template <Kind KIND, int MR>
LL_AVX512_ATTR void cols_avx512(const uint8_t* w, const uint16_t* dw, const uint16_t* mw, int64_t nb, const QRow* x,
                                float* out) {
  using S = K512<KIND>;
  __m512 acc[MR], corr[MR];
#pragma GCC unroll 8
  for (int j = 0; j < MR; ++j) acc[j] = corr[j] = _mm512_setzero_ps();
  const __m512i idx0 = S::lane_block(), next = _mm512_set1_epi32(S::G);
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const __mmask16 gm = (__mmask16)_bzhi_u32(0xffffu, (unsigned)std::min<int64_t>(16, nb - b0));
    const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, dw + b0));
    const __m512 c = KIND == Q4_1 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, mw + b0)) : d;
    __m512 sc[MR];  // dw·dx of the group's 16 blocks, per activation row
#pragma GCC unroll 8
    for (int j = 0; j < MR; ++j) {
      sc[j] = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(gm, x[j].d + b0));
      corr[j] = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(gm, x[j].s + b0), corr[j]);
    }
    __m512i idx = idx0;
#pragma GCC unroll 8
    for (int k = 0; k < 16 / S::G; ++k) {
      const int64_t b = b0 + k * S::G;
      if (b >= nb) break;
      const __mmask64 mask = _bzhi_u64(~0ULL, (unsigned)std::min<int64_t>(64, (nb - b) * S::BB));
      const typename S::W wv = S::unpack(_mm512_maskz_loadu_epi8(mask, w + b * S::BB));
#pragma GCC unroll 8
      for (int j = 0; j < MR; ++j) {
        const __m512i p = S::dot(wv, x[j].q + b * QK);
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx, sc[j]), acc[j]);
      }
      idx = _mm512_add_epi32(idx, next);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < MR; ++j) acc[j] = _mm512_fmadd_ps(corr[j], _mm512_set1_ps(S::OFF), acc[j]);
  // each element of hsum512x4 is its own argument's sum, in one fixed order: rows of 4 at once, the rest padded
  const __m512 z = _mm512_setzero_ps();
  float tmp[4];
  for (int j = 0; j < MR; j += 4) {
    const __m128 s = hsum512x4(acc[j], j + 1 < MR ? acc[j + 1] : z, j + 2 < MR ? acc[j + 2] : z,
                               j + 3 < MR ? acc[j + 3] : z);
    if (j + 4 <= MR) {
      _mm_storeu_ps(out + j, s);
    } else {
      _mm_storeu_ps(tmp, s);
      for (int i = 0; j + i < MR; ++i) out[j + i] = tmp[i];
    }
  }
}

// Output rows [t0·4, t1·4) of y (M, N) on AVX-512: batch 1 four weight rows at a time (PF: with software
// prefetches), batches one weight row at a time for up to 6 activation rows.
template <Kind KIND, int PF>
LL_AVX512_ATTR void tiles_avx512(const uint8_t* w, int64_t rb, const uint16_t* dw, const uint16_t* mw, int64_t N,
                                 int64_t nb, int64_t M, const QRow* xr, float* y, int64_t t0, int64_t t1) {
  constexpr int R = 4;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * R, nr = std::min<int64_t>(R, N - n0);
    const uint8_t* wt = w + n0 * rb;
    const uint16_t* dt = dw + n0 * nb;
    const uint16_t* mt = KIND == Q4_1 ? mw + n0 * nb : nullptr;
    if (M == 1) {
      if (nr == R) {
        rows_avx512<KIND, R, PF>(wt, rb, dt, mt, nb, xr[0], y + n0);
      } else {
        for (int64_t i = 0; i < nr; ++i)
          rows_avx512<KIND, 1, PF>(wt + i * rb, rb, dt + i * nb, mt ? mt + i * nb : nullptr, nb, xr[0], y + n0 + i);
      }
      continue;
    }
    // activation rows in near-equal chunks of at most MRMAX (more would spill the accumulators)
    constexpr int MRMAX = 6;
    float out[MRMAX];
    for (int64_t i = 0; i < nr; ++i) {
      const uint8_t* wi = wt + i * rb;
      const uint16_t* di = dt + i * nb;
      const uint16_t* mi = mt ? mt + i * nb : nullptr;
      for (int64_t m0 = 0, left = (M + MRMAX - 1) / MRMAX; m0 < M; --left) {
        const int64_t mr = (M - m0 + left - 1) / left;
        const QRow* xm = xr + m0;
        switch (mr) {
          case 6: cols_avx512<KIND, 6>(wi, di, mi, nb, xm, out); break;
          case 5: cols_avx512<KIND, 5>(wi, di, mi, nb, xm, out); break;
          case 4: cols_avx512<KIND, 4>(wi, di, mi, nb, xm, out); break;
          case 3: cols_avx512<KIND, 3>(wi, di, mi, nb, xm, out); break;
          case 2: cols_avx512<KIND, 2>(wi, di, mi, nb, xm, out); break;
          default: cols_avx512<KIND, 1>(wi, di, mi, nb, xm, out);
        }
        for (int64_t j = 0; j < mr; ++j) y[(m0 + j) * N + n0 + i] = out[j];
        m0 += mr;
      }
    }
  }
}

// The activation quantized 16 values per instruction (same rounding as quantize_rows: round half to even).
LL_AVX512_ATTR void quantize_rows_avx512(const float* x, int64_t M, int64_t K, Kind kind, int group, int8_t* q,
                                         float* d, float* s) {
  const int64_t nb = K / QK, nbp = (nb + MAXG - 1) / MAXG * MAXG;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * nbp * QK;
    float* dr = d + m * nbp;
    float* sr = s + m * nbp;
    std::memset(qr + nb / MAXG * MAXG * QK, 0, (nbp - nb / MAXG * MAXG) * QK);  // the last group's padding
    for (int64_t b = nb; b < nbp; ++b) dr[b] = sr[b] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 x0 = _mm512_loadu_ps(xr + b * QK), x1 = _mm512_loadu_ps(xr + b * QK + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float db = amax / 127.f, id = db != 0.f ? 1.f / db : 0.f;
      const __m512 iv = _mm512_set1_ps(id);
      const __m512i q0 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(x0, iv))));
      const __m512i q1 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(x1, iv))));
      dr[b] = db;
      sr[b] = db * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      int8_t* lo16 = qr + b * QK;  // Q8_0: the block's 32 values in order
      int8_t* hi16 = lo16 + 16;
      if (kind != Q8_0) {  // Q4: low halves of a group first, then the high halves
        const int64_t g0 = b / group * group, j = b - g0;
        lo16 = qr + g0 * QK + j * 16;
        hi16 = qr + g0 * QK + group * 16 + j * 16;
      }
      _mm_storeu_si128((__m128i*)lo16, _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)hi16, _mm512_cvtepi32_epi8(q1));
    }
  }
}
#endif

// R consecutive weight rows times one activation row -> out[0..R)
template <int R>
void rows(int64_t isa, Kind kind, const uint8_t* w, int64_t rb, const uint16_t* dw, const uint16_t* mw, int64_t nb,
          QRow x, int group, float* out) {
  switch (isa) {
#if LL_X86
    case AVXVNNI:
      if (prefetch_weights()) return rows_avxvnni<R, true>(kind, w, rb, dw, mw, nb, x, out);
      return rows_avxvnni<R, false>(kind, w, rb, dw, mw, nb, x, out);
    case AVX2:
      if (prefetch_weights()) return rows_avx2<R, true>(kind, w, rb, dw, mw, nb, x, out);
      return rows_avx2<R, false>(kind, w, rb, dw, mw, nb, x, out);
#endif
    default:
      for (int r = 0; r < R; ++r)
        out[r] = dot_scalar(kind, w + r * rb, dw + r * nb, mw ? mw + r * nb : nullptr, x, nb, group);
  }
}


int group_for(int64_t isa, Kind kind) {
  if (kind == Q8_0) return 1;
  return isa == AVX512VNNI ? 4 : 2;
}


// ------------------------------------------------------------------------------------------ dequantize
// The float weight (N, K) as float32 or bfloat16 (round to nearest even), for batched products through a
// GEMM: 16 weights per AVX-512 step where the CPU has it, plain loops otherwise.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void dequantize_rows_scalar(Kind kind, const uint8_t* w, const uint16_t* dw, const uint16_t* mw, int64_t n0,
                            int64_t n1, int64_t K, float* outf, uint16_t* outb) {
  const int64_t nb = K / QK, rb = kind == Q8_0 ? K : K / 2;
  float tmp[QK];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < nb; ++b) {
      const float d = half_to_float(dw[n * nb + b]);
      const float m = kind == Q4_1 ? half_to_float(mw[n * nb + b]) : (kind == Q4_0 ? -8.f * d : 0.f);
      if (kind == Q8_0) {
        const int8_t* q = (const int8_t*)w + n * rb + b * QK;
        for (int i = 0; i < QK; ++i) tmp[i] = d * (float)q[i];
      } else {
        const uint8_t* q = w + n * rb + b * 16;
        for (int i = 0; i < 16; ++i) {
          tmp[i] = d * (float)(q[i] & 15) + m;
          tmp[i + 16] = d * (float)(q[i] >> 4) + m;
        }
      }
      const int64_t o = n * K + b * QK;
      for (int i = 0; i < QK; ++i) {
        if (outf) outf[o + i] = tmp[i];
        else outb[o + i] = float_to_bf16(tmp[i]);
      }
    }
  }
}

#if LL_X86
LL_AVX512_ATTR inline void store16(__m512 v, float* outf, uint16_t* outb, int64_t o) {
  if (outf) {
    _mm512_storeu_ps(outf + o, v);
  } else {
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256((__m256i*)(outb + o), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
  }
}

LL_AVX512_ATTR void dequantize_rows_avx512(Kind kind, const uint8_t* w, const uint16_t* dw, const uint16_t* mw,
                                           int64_t n0, int64_t n1, int64_t K, float* outf, uint16_t* outb) {
  const int64_t nb = K / QK, rb = kind == Q8_0 ? K : K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < nb; ++b) {
      const float df = _cvtsh_ss(dw[n * nb + b]);
      const __m512 d = _mm512_set1_ps(df);
      const int64_t o = n * K + b * QK;
      if (kind == Q8_0) {
        const int8_t* q = (const int8_t*)w + n * rb + b * QK;
        for (int h = 0; h < 2; ++h) {
          const __m512i qi = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16 * h)));
          store16(_mm512_mul_ps(d, _mm512_cvtepi32_ps(qi)), outf, outb, o + 16 * h);
        }
      } else {
        const __m512 m = _mm512_set1_ps(kind == Q4_1 ? _cvtsh_ss(mw[n * nb + b]) : -8.f * df);
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(w + n * rb + b * 16));
        const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(15));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
        store16(_mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), m), outf, outb, o);
        store16(_mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), m), outf, outb, o + 16);
      }
    }
  }
}
#endif

void dequantize_rows(Kind kind, const uint8_t* w, const uint16_t* dw, const uint16_t* mw, int64_t n0, int64_t n1,
                     int64_t K, float* outf, uint16_t* outb) {
#if LL_X86
  if (active_isa() == AVX512VNNI) return dequantize_rows_avx512(kind, w, dw, mw, n0, n1, K, outf, outb);
#endif
  dequantize_rows_scalar(kind, w, dw, mw, n0, n1, K, outf, outb);
}

at::Tensor dequantize_op(const at::Tensor& qs, const at::Tensor& d, const c10::optional<at::Tensor>& m, int64_t kind,
                         bool bf16) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "llamalab dequantize: kind must be 0 (q8_0), 1 (q4_0) or 2 (q4_1)");
  const Kind k = (Kind)kind;
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.element_size() == 1 && d.is_contiguous() &&
              d.scalar_type() == at::kHalf && d.dim() == 2 && d.size(0) == qs.size(0),
              "llamalab dequantize: bad qs/d");
  TORCH_CHECK(k != Q4_1 || (m.has_value() && m->sizes() == d.sizes() && m->is_contiguous() &&
                            m->scalar_type() == at::kHalf), "llamalab dequantize: Q4_1 needs m like d");
  const int64_t N = qs.size(0), K = k == Q8_0 ? qs.size(1) : qs.size(1) * 2;
  TORCH_CHECK(d.size(1) * QK == K, "llamalab dequantize: d must be (N, K/32)");
  at::Tensor out = at::empty({N, K}, d.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* w = (const uint8_t*)qs.data_ptr();
  const uint16_t* dw = (const uint16_t*)d.data_ptr();
  const uint16_t* mw = k == Q4_1 ? (const uint16_t*)m->data_ptr() : nullptr;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* ob = bf16 ? (uint16_t*)out.data_ptr() : nullptr;
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t n0, int64_t n1) {
    dequantize_rows(k, w, dw, mw, n0, n1, K, of, ob);
  });
  return out;
}

// Many activation rows: dequantize ~1 MB tiles of weight rows into a reused per-thread buffer (a fresh
// weight-sized allocation would page-fault its way through memory) and multiply each by a GEMM.
at::Tensor gemm_linear(Kind kind, const at::Tensor& x2, const at::Tensor& qs, const at::Tensor& d, const at::Tensor* m,
                       int64_t N, int64_t K) {
  const at::ScalarType dt = g_gemm_bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor x = x2.to(dt).contiguous();
  const int64_t M = x.size(0), esize = g_gemm_bf16 ? 2 : 4;
  const int64_t tile = std::min<int64_t>(N, std::max<int64_t>(16, ((1 << 20) / (K * esize)) / 16 * 16));
  thread_local std::vector<uint8_t> buf;
  buf.resize(std::max<size_t>(buf.size(), tile * K * esize));
  uint8_t* const bp = buf.data();
  const uint8_t* w = (const uint8_t*)qs.data_ptr();
  const uint16_t* dw = (const uint16_t*)d.data_ptr();
  const uint16_t* mw = m ? (const uint16_t*)m->data_ptr() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t nt = std::min<int64_t>(tile, N - n0);
    at::parallel_for(0, nt, std::max<int64_t>(1, 65536 / K), [&](int64_t a, int64_t b) {
      // dequantize_rows indexes its output by absolute row: shift the buffer back by n0 rows
      float* of = g_gemm_bf16 ? nullptr : (float*)bp - n0 * K;
      uint16_t* ob = g_gemm_bf16 ? (uint16_t*)bp - n0 * K : nullptr;
      dequantize_rows(kind, w, dw, mw, n0 + a, n0 + b, K, of, ob);
    });
    const at::Tensor wt = at::from_blob(bp, {nt, K}, x.options());
    if (nt == N) return at::mm(x, wt.t());
    y.narrow(1, n0, nt).copy_(at::mm(x, wt.t()));
  }
  return y;
}

// One weight matrix of a product: its blocks, its rows N and where its outputs (M, N) go.
struct Product {
  const uint8_t* w;
  const uint16_t* dw;
  const uint16_t* mw;
  int64_t N;
  float* y;
};

void check_weights(Kind kind, const at::Tensor& qs, const at::Tensor& d, const at::Tensor* m, int64_t K) {
  const int64_t N = qs.size(0), nb = K / QK, row_bytes = kind == Q8_0 ? K : K / 2;
  TORCH_CHECK(K % QK == 0, "llamalab block linear: K=", K, " is not a multiple of 32");
  TORCH_CHECK(qs.dim() == 2 && qs.size(1) == row_bytes && qs.is_contiguous() && qs.element_size() == 1,
              "llamalab block linear: qs must be a contiguous (N, ", row_bytes, ") byte tensor");
  TORCH_CHECK(d.dim() == 2 && d.size(0) == N && d.size(1) == nb && d.scalar_type() == at::kHalf && d.is_contiguous(),
              "llamalab block linear: d must be a contiguous float16 (N, K/32) tensor");
  if (m) {
    TORCH_CHECK(m->sizes() == d.sizes() && m->scalar_type() == at::kHalf && m->is_contiguous(),
                "llamalab block linear: m must be like d");
  }
}

// Output rows [t0·4, t1·4) of one product, for the M activation rows quantized in xr.
void product_tiles(int64_t isa, Kind kind, const Product& p, int64_t row_bytes, int64_t nb, int64_t M,
                   const QRow* xr, int group, int64_t pf, int64_t t0, int64_t t1) {
  constexpr int R = 4;  // weight rows per step
  const int64_t N = p.N;
#if LL_X86
  if (isa == AVX512VNNI) {
    auto run = [&](auto tag) {
      constexpr int P = decltype(tag)::value;
      switch (kind) {
        case Q8_0: return tiles_avx512<Q8_0, P>(p.w, row_bytes, p.dw, p.mw, N, nb, M, xr, p.y, t0, t1);
        case Q4_0: return tiles_avx512<Q4_0, P>(p.w, row_bytes, p.dw, p.mw, N, nb, M, xr, p.y, t0, t1);
        case Q4_1: return tiles_avx512<Q4_1, P>(p.w, row_bytes, p.dw, p.mw, N, nb, M, xr, p.y, t0, t1);
      }
    };
    if (pf == PF_FAR) run(std::integral_constant<int, PF_FAR>{});
    else if (pf == PF_NEAR) run(std::integral_constant<int, PF_NEAR>{});
    else run(std::integral_constant<int, PF_OFF>{});
    return;
  }
#endif
  // AVX2 / AVX-VNNI / scalar: each activation row through the batch-1 kernel of the tile (the weight tile
  // re-read from cache), so a row's sums do not depend on the batch
  float out[R];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * R, nr = std::min<int64_t>(R, N - n0);
    const uint8_t* wr = p.w + n0 * row_bytes;
    const uint16_t* dr = p.dw + n0 * nb;
    const uint16_t* mr = p.mw ? p.mw + n0 * nb : nullptr;
    for (int64_t r = 0; r < M; ++r) {
      if (nr == R) {
        rows<R>(isa, kind, wr, row_bytes, dr, mr, nb, xr[r], group, out);
      } else {
        for (int64_t i = 0; i < nr; ++i)
          rows<1>(isa, kind, wr + i * row_bytes, row_bytes, dr + i * nb, mr ? mr + i * nb : nullptr, nb, xr[r], group,
                  out + i);
      }
      std::memcpy(p.y + r * N + n0, out, nr * sizeof(float));
    }
  }
}

// y_i = x · W_iᵀ for the n products `ps` of one kind and width K, x (M, K) float32 contiguous: the activation
// is quantized once, and the weight rows of all products are split over threads as one range.
void run_products(Kind kind, const float* x, int64_t M, int64_t K, const Product* ps, int n) {
  const int64_t nb = K / QK, row_bytes = kind == Q8_0 ? K : K / 2;
  const int64_t isa = active_isa();
  const int group = group_for(isa, kind);
  const int64_t nbp = (nb + MAXG - 1) / MAXG * MAXG;
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xd, xs;
  xq.resize(std::max<size_t>(xq.size(), M * nbp * QK + 64));  // + slack: full-width loads of the last group
  xd.resize(std::max<size_t>(xd.size(), M * nbp + MAXG));
  xs.resize(std::max<size_t>(xs.size(), M * nbp + MAXG));
  // (pointers, not the thread_local vectors, go into the worker threads: each thread has its own vectors)
  int8_t* const xqp = xq.data();
  float* const xdp = xd.data();
  float* const xsp = xs.data();
#if LL_X86
  if (isa == AVX512VNNI) quantize_rows_avx512(x, M, K, kind, group, xqp, xdp, xsp);
  else
#endif
    quantize_rows(x, M, K, kind, group, xqp, xdp, xsp);
  c10::SmallVector<QRow, 16> xr(M);
  for (int64_t r = 0; r < M; ++r) xr[r] = QRow{xqp + r * nbp * QK, xdp + r * nbp, xsp + r * nbp};

  constexpr int R = 4;  // weight rows per tile
  c10::SmallVector<int64_t, 4> first(n + 1, 0);  // first[i]: the first tile of product i in the joint range
  for (int i = 0; i < n; ++i) first[i + 1] = first[i] + (ps[i].N + R - 1) / R;
  // A thread's share is at least g_min_chunk weight bytes x activation rows (256 KB: ~20-30 us of work): a
  // parallel region costs microseconds to tens of them (sleeping workers), so a batch-1 product of a small
  // layer runs on the calling thread and larger ones are split. Measured at 1 row on 2 threads (SmolLM2
  // Q4_1 decode, docs/kernels.md): every layer split 35 tok/s and 1 MB ~70 on an AMD EPYC; on an Intel
  // Xeon 1 MB 49.8, 256 KB 60.6, 128 KB 63.2, 64 KB 62.7.
  const int64_t grain = std::max<int64_t>(1, g_min_chunk / std::max<int64_t>(1, R * row_bytes * M));
  const int64_t pf = prefetch_mode();
  at::parallel_for(0, first[n], grain, [&](int64_t a, int64_t b) {
    for (int i = 0; i < n; ++i) {
      const int64_t t0 = std::max(a, first[i]), t1 = std::min(b, first[i + 1]);
      if (t0 < t1) product_tiles(isa, kind, ps[i], row_bytes, nb, M, xr.data(), group, pf, t0 - first[i], t1 - first[i]);
    }
  });
}

// y = x · Wᵀ for x (..., K) of any float dtype; y has x's leading shape and dtype.
at::Tensor block_linear(Kind kind, const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d,
                        const at::Tensor* m) {
  const int64_t N = qs.size(0), K = x_in.size(-1);
  check_weights(kind, qs, d, m, K);
  c10::SmallVector<int64_t, 4> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = N;
  const int64_t M = K ? x_in.numel() / K : 0;
  if (M >= g_gemm_rows && M > 0) {  // many rows: the integer kernel's cost grows with M, a GEMM's much less
    return gemm_linear(kind, x_in.reshape({M, K}), qs, d, m, N, K).to(x_in.scalar_type()).view(out_sizes);
  }
  // (a contiguous float32 activation, the decode case, is used as is: no reshape / copy / view calls)
  const bool plain = x_in.scalar_type() == at::kFloat && x_in.is_contiguous();
  const at::Tensor x = plain ? x_in : x_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return plain ? y : y.to(x_in.scalar_type());
  const Product p{(const uint8_t*)qs.data_ptr(), (const uint16_t*)d.data_ptr(),
                  m ? (const uint16_t*)m->data_ptr() : nullptr, N, y.data_ptr<float>()};
  run_products(kind, x.data_ptr<float>(), M, K, &p, 1);
  return plain ? y : y.to(x_in.scalar_type());
}

// [x · W_iᵀ for each weight i] for weights of one kind that read the same input (q|k|v, gate|up): what
// block_linear gives for each, bit for bit, with the activation quantized once and one parallel range.
std::vector<at::Tensor> block_linears(const at::Tensor& x_in, at::TensorList qs, at::TensorList d, at::TensorList m,
                                      int64_t kind_index) {
  TORCH_CHECK(kind_index >= 0 && kind_index <= Q4_1, "llamalab block_linears: unknown kind ", kind_index);
  const Kind kind = (Kind)kind_index;
  const int n = (int)qs.size();
  TORCH_CHECK(n > 0 && d.size() == qs.size() && m.size() == (kind == Q4_1 ? qs.size() : 0),
              "llamalab block_linears: need as many d (and, for q4_1, m) as qs");
  const int64_t K = x_in.size(-1), M = K ? x_in.numel() / K : 0;
  std::vector<at::Tensor> ys;
  ys.reserve(n);
  if (M >= g_gemm_rows || M == 0) {  // the GEMM path reads no quantized activation: each product on its own
    for (int i = 0; i < n; ++i) ys.push_back(block_linear(kind, x_in, qs[i], d[i], kind == Q4_1 ? &m[i] : nullptr));
    return ys;
  }
  const bool plain = x_in.scalar_type() == at::kFloat && x_in.is_contiguous();
  const at::Tensor x = plain ? x_in : x_in.to(at::kFloat).contiguous();
  c10::SmallVector<Product, 4> ps;
  for (int i = 0; i < n; ++i) {
    const at::Tensor* mi = kind == Q4_1 ? &m[i] : nullptr;
    check_weights(kind, qs[i], d[i], mi, K);
    c10::SmallVector<int64_t, 4> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
    out_sizes.back() = qs[i].size(0);
    ys.push_back(at::empty(out_sizes, x.options()));
    ps.push_back(Product{(const uint8_t*)qs[i].data_ptr(), (const uint16_t*)d[i].data_ptr(),
                         mi ? (const uint16_t*)mi->data_ptr() : nullptr, qs[i].size(0), ys.back().data_ptr<float>()});
  }
  run_products(kind, x.data_ptr<float>(), M, K, ps.data(), n);
  if (!plain)
    for (auto& y : ys) y = y.to(x_in.scalar_type());
  return ys;
}

// SwiGLU's input to down_proj, silu(x · W_gateᵀ) ⊙ (x · W_upᵀ): block_linears of the two, then llamalab::silu_mul
// (norm.cpp) on them, the same ops and roundings as the two calls from Python, in one.
at::Tensor block_swiglu(const at::Tensor& x, at::TensorList qs, at::TensorList d, at::TensorList m,
                        int64_t kind_index) {
  TORCH_CHECK(qs.size() == 2, "llamalab block_swiglu: takes two weights (gate, up), got ", qs.size());
  static const auto silu_mul = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("llamalab::silu_mul", "")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const std::vector<at::Tensor> gate_up = block_linears(x, qs, d, m, kind_index);
  return silu_mul.call(gate_up[0], gate_up[1]);
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  return block_linear(Q8_0, x, qs, d, nullptr);
}
at::Tensor q4_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  return block_linear(Q4_0, x, qs, d, nullptr);
}
at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  return block_linear(Q4_1, x, qs, d, &m);
}

}  // namespace

namespace llamalab {
int64_t current_isa() { return active_isa(); }  // the ISA dense.cpp dispatches on too
int64_t min_chunk() { return g_min_chunk; }       // the least work per thread dense.cpp splits by too
int64_t weight_prefetch() { return prefetch_mode(); }  // far also turns on dense.cpp's NTA prefetch
}

TORCH_LIBRARY(llamalab, lib) {
  lib.def("q8_0_linear(Tensor x, Tensor qs, Tensor d) -> Tensor");
  lib.def("q4_0_linear(Tensor x, Tensor qs, Tensor d) -> Tensor");
  lib.def("q4_1_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("block_linears(Tensor x, Tensor[] qs, Tensor[] d, Tensor[] m, int kind) -> Tensor[]");
  lib.def("block_swiglu(Tensor x, Tensor[] qs, Tensor[] d, Tensor[] m, int kind) -> Tensor");
  lib.def("dequantize(Tensor qs, Tensor d, Tensor? m, int kind, bool bf16) -> Tensor");
  lib.def("configure(int gemm_rows, bool gemm_bf16) -> int", &configure);
  lib.def("cpu_isa() -> int", &cpu_isa);
  lib.def("set_min_chunk(int bytes) -> int", &set_min_chunk);
  lib.def("set_isa(int isa) -> int", &set_isa);
  lib.def("set_block_prefetch(int mode) -> int", &set_block_prefetch);
  lib.def("active_isa() -> int", &active_isa);
  lib.def("isa_supported(int isa) -> bool", [](int64_t isa) { return supported(isa); });
}

TORCH_LIBRARY_IMPL(llamalab, CPU, lib) {
  lib.impl("q8_0_linear", &q8_0_linear);
  lib.impl("q4_0_linear", &q4_0_linear);
  lib.impl("q4_1_linear", &q4_1_linear);
  lib.impl("block_linears", &block_linears);
  lib.impl("block_swiglu", &block_swiglu);
  lib.impl("dequantize", &dequantize_op);
}
