// llamalab k-quant linears on CPU: y = x · Wᵀ with W in GGUF Q4_K / Q6_K super-blocks of 256 weights, the
// file's bytes as stored (kq: uint8 (N, K/256 · 144) for Q4_K, (N, K/256 · 210) for Q6_K).
//
// Q4_K super-block (144 bytes): fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales sc_j and mins m_j of its 8
// sub-blocks of 32, 128 bytes of 4-bit codes q:   w = d·sc_j · q − dmin·m_j.
//   Code bytes 32c..32c+31 hold sub-block 2c in their low nibbles and sub-block 2c+1 in their high nibbles.
// Q6_K super-block (210 bytes): 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales (one per
// 16 weights), fp16 d:   w = d·sc_(e/16) · (q − 32), q = ql nibble | qh 2 bits << 4 (0..63).
//   Element e = 128h + 32k + l (h half, k quarter, l < 32): ql byte 64h + 32(k&1) + l (high nibble if k ≥ 2),
//   qh byte 32h + l, bits 2k..2k+1.
//
// The activation row is quantized per block of 32 to int8 (dx = max|x| / 127, qx = round(x / dx), as the
// Q8_0 / Q4 kernels of blocks.cpp do), with the block sums s32 = dx · Σ qx and the half-block sums
// s16 = dx · Σ_(16) qx kept as floats. Then, per super-block, with integer dot products per (half) block:
//   Q4_K:  y += d · Σ_j sc_j·dx_j · Σ q·qx   −  dmin · Σ_j m_j · s32_j
//   Q6_K:  y += d · Σ_i sc_i·dx_(i/2) · Σ_(16) q·qx   −  32 · d · Σ_i sc_i · s16_i
// (integer sums: maddubs + madd on AVX2, vpdpbusd on AVX-512 VNNI, plain loops on the portable path; the
// scales enter once per (half) block in float). The ISA is the one blocks.cpp dispatches on
// (llamalab::current_isa; set_isa / LLAMALAB_KERNEL_ISA force it): 3 AVX-512 VNNI, 1-2 AVX2, 0 scalar.
// Each output element is summed in one order whatever the number of activation rows (each activation row
// runs the batch-1 dot product): a row of a batch is bit for bit the row alone. From GEMM_ROWS activation
// rows on the weight is dequantized to float32 (tiles of ~1 MB) and multiplied by at::mm instead.
// Output rows are split over threads only when each thread's share is >= ~1 MB of weight bytes × rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LL_KQ_X86 1
#else
#define LL_KQ_X86 0
#endif

namespace llamalab {
int64_t current_isa();  // blocks.cpp: 0 scalar, 1 AVX2, 2 AVX-VNNI, 3 AVX-512 VNNI
int64_t min_chunk();    // blocks.cpp: the least weight bytes x activation rows per thread of a product
}

namespace {

enum KKind { Q4_K = 0, Q6_K = 1 };
constexpr int64_t QK_K = 256;
constexpr int64_t GEMM_ROWS = 24;

inline int64_t sb_bytes(KKind k) { return k == Q4_K ? 144 : 210; }

inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);  // c10::Half's exact fp16 -> fp32, as dense.cpp converts
}

// Q4_K's 12 scale bytes -> 8 scales and 8 mins (6 bits each). Bytes 0-3: scales 0-3 (low 6 bits), bytes 4-7:
// mins 0-3; bytes 8-11: low nibble = low 4 bits of scale 4+i, high nibble = of min 4+i, whose top 2 bits are
// the top 2 bits of bytes i (scale) and 4+i (min). Worked on four bytes at a time.
inline void q4k_scales(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  uint32_t a, b, c;
  std::memcpy(&a, s, 4);
  std::memcpy(&b, s + 4, 4);
  std::memcpy(&c, s + 8, 4);
  const uint32_t sc_lo = a & 0x3f3f3f3fu, mn_lo = b & 0x3f3f3f3fu;
  const uint32_t sc_hi = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);
  const uint32_t mn_hi = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);
  std::memcpy(sc, &sc_lo, 4);
  std::memcpy(sc + 4, &sc_hi, 4);
  std::memcpy(mn, &mn_lo, 4);
  std::memcpy(mn + 4, &mn_hi, 4);
}

// One activation row quantized: q int8 (K), d per 32 (K/32), s32 = d·Σ32 q (K/32), s16 = d·Σ16 q (K/16).
struct Act {
  const int8_t* q;
  const float* d;
  const float* s32;
  const float* s16;
};

void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s32, float* s16) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.f, id = db != 0.f ? 1.f / db : 0.f;
    int sum0 = 0, sum1 = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = std::min(127, std::max(-127, (int)std::nearbyint(xb[i] * id)));
      q[b * 32 + i] = (int8_t)v;
      (i < 16 ? sum0 : sum1) += v;
    }
    d[b] = db;
    s32[b] = db * (float)(sum0 + sum1);
    s16[2 * b] = db * (float)sum0;
    s16[2 * b + 1] = db * (float)sum1;
  }
}

// ------------------------------------------------------------------------------------------ scalar
float dot_q4k_scalar(const uint8_t* w, int64_t nsb, const Act& a) {
  float acc = 0.f;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * 144;
    const float d = load_half(blk), dmin = load_half(blk + 2);
    uint8_t sc[8], mn[8];
    q4k_scales(blk + 4, sc, mn);
    const uint8_t* qs = blk + 16;
    float s = 0.f, ms = 0.f;
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = qs + 32 * (j / 2);
      const int shift = (j & 1) * 4;
      const int8_t* x = a.q + sb * QK_K + 32 * j;
      int isum = 0;
      for (int l = 0; l < 32; ++l) isum += ((q[l] >> shift) & 15) * x[l];
      s += (float)sc[j] * a.d[sb * 8 + j] * (float)isum;
      ms += (float)mn[j] * a.s32[sb * 8 + j];
    }
    acc += d * s - dmin * ms;
  }
  return acc;
}

float dot_q6k_scalar(const uint8_t* w, int64_t nsb, const Act& a) {
  float acc = 0.f;
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * 210;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = (const int8_t*)(blk + 192);
    const float d = load_half(blk + 208);
    float s = 0.f, c = 0.f;
    for (int b = 0; b < 8; ++b) {
      const int h = b / 4, k = b % 4;
      const uint8_t* l4 = ql + 64 * h + 32 * (k & 1);
      const uint8_t* h2 = qh + 32 * h;
      const int8_t* x = a.q + sb * QK_K + 32 * b;
      int i0 = 0, i1 = 0;
      for (int l = 0; l < 32; ++l) {
        const int u = ((l4[l] >> (4 * (k >> 1))) & 15) | (((h2[l] >> (2 * k)) & 3) << 4);
        (l < 16 ? i0 : i1) += u * x[l];
      }
      const float dx = a.d[sb * 8 + b];
      s += (float)sc[2 * b] * dx * (float)i0 + (float)sc[2 * b + 1] * dx * (float)i1;
      c += (float)sc[2 * b] * a.s16[sb * 16 + 2 * b] + (float)sc[2 * b + 1] * a.s16[sb * 16 + 2 * b + 1];
    }
    acc += d * (s - 32.f * c);
  }
  return acc;
}

#if LL_KQ_X86
// ------------------------------------------------------------------------------------------ AVX2
#define LL_KQ_AVX2 __attribute__((target("avx2,fma,f16c")))

LL_KQ_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LL_KQ_AVX2 inline __m256 cvt8_u8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

LL_KQ_AVX2 inline __m256 cvt8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

LL_KQ_AVX2 float dot_q4k_avx2(const uint8_t* w, int64_t nsb, const Act& a) {
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  alignas(32) float f[8];
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * 144;
    uint8_t sc[8], mn[8];
    q4k_scales(blk + 4, sc, mn);
    _mm256_store_ps(f, _mm256_mul_ps(cvt8_u8(sc), _mm256_loadu_ps(a.d + sb * 8)));  // sc_j · dx_j
    const uint8_t* qs = blk + 16;
    const int8_t* x = a.q + sb * QK_K;
    __m256 s = _mm256_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
      const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
      const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(x + 64 * c))), ones);
      const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(x + 64 * c + 32))), ones);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(f + 2 * c), s);
      s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(f + 2 * c + 1), s);
    }
    uint16_t dd[2];
    std::memcpy(dd, blk, 4);
    acc = _mm256_fmadd_ps(s, _mm256_set1_ps(_cvtsh_ss(dd[0])), acc);
    acc = _mm256_fnmadd_ps(_mm256_mul_ps(cvt8_u8(mn), _mm256_loadu_ps(a.s32 + sb * 8)), _mm256_set1_ps(_cvtsh_ss(dd[1])), acc);
  }
  return hsum256(acc);
}

LL_KQ_AVX2 float dot_q6k_avx2(const uint8_t* w, int64_t nsb, const Act& a) {
  const __m256i low = _mm256_set1_epi8(15), two = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  alignas(32) float f[16];
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    uint16_t dh;
    std::memcpy(&dh, blk + 208, 2);
    const float d = _cvtsh_ss(dh);
    const __m256 sc0 = cvt8_i8(sc), sc1 = cvt8_i8(sc + 8);
    // dx per 32 duplicated to per 16: lanes (dx0 dx0 dx1 dx1 ...)
    const __m256 dx = _mm256_loadu_ps(a.d + sb * 8);
    const __m256 dlo = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    const __m256 dhi = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
    _mm256_store_ps(f, _mm256_mul_ps(sc0, dlo));
    _mm256_store_ps(f + 8, _mm256_mul_ps(sc1, dhi));
    const int8_t* x = a.q + sb * QK_K;
    __m256 s = _mm256_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
      const __m256i qa = _mm256_loadu_si256((const __m256i*)(blk + 64 * h));
      const __m256i qb = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32));
      const __m256i nib[4] = {_mm256_and_si256(qa, low), _mm256_and_si256(qb, low),
                              _mm256_and_si256(_mm256_srli_epi16(qa, 4), low),
                              _mm256_and_si256(_mm256_srli_epi16(qb, 4), low)};
      for (int k = 0; k < 4; ++k) {
        const __m256i hb = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), two), 4);
        const __m256i u = _mm256_or_si256(nib[k], hb);
        const int b = 4 * h + k;
        const __m256i p = _mm256_madd_epi16(
            _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i*)(x + 32 * b))), ones);
        // lanes 0-3: weights 0-15 of the block, lanes 4-7: weights 16-31
        const __m256 scale = _mm256_set_m128(_mm_broadcast_ss(f + 2 * b + 1), _mm_broadcast_ss(f + 2 * b));
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, s);
      }
    }
    __m256 c = _mm256_mul_ps(sc0, _mm256_loadu_ps(a.s16 + sb * 16));
    c = _mm256_fmadd_ps(sc1, _mm256_loadu_ps(a.s16 + sb * 16 + 8), c);
    s = _mm256_fnmadd_ps(c, _mm256_set1_ps(32.f), s);
    acc = _mm256_fmadd_ps(s, _mm256_set1_ps(d), acc);
  }
  return hsum256(acc);
}

// ------------------------------------------------------------------------------------------ AVX-512 VNNI
// 512-bit steps of two 32-blocks; vpdpbusd (unsigned codes × int8 activations, 4 products per int32 lane).
#define LL_KQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

LL_KQ_AVX512 inline __m512i load2x32(const int8_t* p0, const int8_t* p1) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p0)),
                            _mm256_loadu_si256((const __m256i*)p1), 1);
}

LL_KQ_AVX512 float dot_q4k_avx512(const uint8_t* w, int64_t nsb, const Act& a) {
  const __m512i low = _mm512_set1_epi8(15);
  // lanes 0-7 take scale i0, 8-15 scale i1 for the step's two blocks: (0,2) (1,3) (4,6) (5,7)
  const __m512i ix[4] = {_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
                         _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
                         _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
                         _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7)};
  __m512 acc = _mm512_setzero_ps();
  __m256 macc = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * 144;
    uint8_t sc[8], mn[8];
    q4k_scales(blk + 4, sc, mn);
    const __m512 f = _mm512_castps256_ps512(_mm256_mul_ps(cvt8_u8(sc), _mm256_loadu_ps(a.d + sb * 8)));
    const uint8_t* qs = blk + 16;
    const int8_t* x = a.q + sb * QK_K;
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < 2; ++c) {  // bytes 64c..64c+63: blocks 4c, 4c+2 (low nibbles), 4c+1, 4c+3 (high)
      const __m512i wv = _mm512_loadu_si512((const void*)(qs + 64 * c));
      const __m512i lo = _mm512_and_si512(wv, low), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
      const int8_t* xc = x + 128 * c;
      const __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, load2x32(xc, xc + 64));
      const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, load2x32(xc + 32, xc + 96));
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(ix[2 * c], f), s);
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_permutexvar_ps(ix[2 * c + 1], f), s);
    }
    uint16_t dd[2];
    std::memcpy(dd, blk, 4);
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(_cvtsh_ss(dd[0])), acc);
    macc = _mm256_fnmadd_ps(_mm256_mul_ps(cvt8_u8(mn), _mm256_loadu_ps(a.s32 + sb * 8)),
                            _mm256_set1_ps(_cvtsh_ss(dd[1])), macc);
  }
  return _mm512_reduce_add_ps(acc) + hsum256(macc);
}

LL_KQ_AVX512 float dot_q6k_avx512(const uint8_t* w, int64_t nsb, const Act& a) {
  const __m512i low = _mm512_set1_epi8(15), two = _mm512_set1_epi8(3);
  const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  // step t covers blocks 2t (lanes 0-7) and 2t+1 (lanes 8-15), 4 lanes per half block: scales 4t .. 4t+3
  __m512i ix[4];
  for (int t = 0; t < 4; ++t) {
    const int i = 4 * t;
    ix[t] = _mm512_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1, i + 2, i + 2, i + 2, i + 2, i + 3, i + 3,
                              i + 3, i + 3);
  }
  __m512 acc = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* blk = w + sb * 210;
    uint16_t dh;
    std::memcpy(&dh, blk + 208, 2);
    const __m512 scf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 192))));
    const __m512 dx = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(a.d + sb * 8)));
    const __m512 f = _mm512_mul_ps(scf, dx);  // sc_i · dx_(i/2)
    const int8_t* x = a.q + sb * QK_K;
    __m512 s = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      // ql bytes 64h..64h+63: [0,32) quarters 0 (low nibble) / 2 (high), [32,64) quarters 1 / 3
      const __m512i ql = _mm512_loadu_si512((const void*)(blk + 64 * h));
      // qh bytes 32h..32h+31 twice: lanes of the first half serve quarter k, the second half quarter k+1
      const __m256i qh256 = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
      const __m512i qh = _mm512_inserti64x4(_mm512_castsi256_si512(qh256), _mm256_srli_epi16(qh256, 2), 1);
      const __m512i nlo = _mm512_and_si512(ql, low), nhi = _mm512_and_si512(_mm512_srli_epi16(ql, 4), low);
      const __m512i h01 = _mm512_slli_epi16(_mm512_and_si512(qh, two), 4);                         // k 0, 1
      const __m512i h23 = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 4), two), 4);  // k 2, 3
      const int8_t* xh = x + 128 * h;
      // step A: quarters 0 and 1 (blocks 4h, 4h+1), step B: quarters 2 and 3
      const __m512i pa = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_or_si512(nlo, h01),
                                             load2x32(xh, xh + 32));
      const __m512i pb = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_or_si512(nhi, h23),
                                             load2x32(xh + 64, xh + 96));
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pa), _mm512_permutexvar_ps(ix[2 * h], f), s);
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pb), _mm512_permutexvar_ps(ix[2 * h + 1], f), s);
    }
    s = _mm512_fnmadd_ps(_mm512_mul_ps(scf, _mm512_loadu_ps(a.s16 + sb * 16)), _mm512_set1_ps(32.f), s);
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(_cvtsh_ss(dh)), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

using DotFn = float (*)(const uint8_t*, int64_t, const Act&);

DotFn dot_for(KKind kind, int64_t isa) {
#if LL_KQ_X86
  if (isa >= 3) return kind == Q4_K ? dot_q4k_avx512 : dot_q6k_avx512;
  if (isa >= 1) return kind == Q4_K ? dot_q4k_avx2 : dot_q6k_avx2;
#endif
  (void)isa;
  return kind == Q4_K ? dot_q4k_scalar : dot_q6k_scalar;
}

// ------------------------------------------------------------------------------------------ dequantize
void dequantize_row(KKind kind, const uint8_t* w, int64_t nsb, float* y) {
  for (int64_t sb = 0; sb < nsb; ++sb, y += QK_K) {
    if (kind == Q4_K) {
      const uint8_t* blk = w + sb * 144;
      const float d = load_half(blk), dmin = load_half(blk + 2);
      uint8_t sc[8], mn[8];
      q4k_scales(blk + 4, sc, mn);
      for (int j = 0; j < 8; ++j) {
        const uint8_t* q = blk + 16 + 32 * (j / 2);
        const int shift = (j & 1) * 4;
        const float dj = d * (float)sc[j], mj = dmin * (float)mn[j];
        for (int l = 0; l < 32; ++l) y[32 * j + l] = dj * (float)((q[l] >> shift) & 15) - mj;
      }
    } else {
      const uint8_t* blk = w + sb * 210;
      const int8_t* sc = (const int8_t*)(blk + 192);
      const float d = load_half(blk + 208);
      for (int b = 0; b < 8; ++b) {
        const int h = b / 4, k = b % 4;
        const uint8_t* l4 = blk + 64 * h + 32 * (k & 1);
        const uint8_t* h2 = blk + 128 + 32 * h;
        for (int l = 0; l < 32; ++l) {
          const int u = ((l4[l] >> (4 * (k >> 1))) & 15) | (((h2[l] >> (2 * k)) & 3) << 4);
          y[32 * b + l] = d * (float)sc[2 * b + l / 16] * (float)(u - 32);
        }
      }
    }
  }
}

at::Tensor gemm_linear(KKind kind, const at::Tensor& x2, const uint8_t* w, int64_t N, int64_t K) {
  const at::Tensor x = x2.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), nsb = K / QK_K, rb = nsb * sb_bytes(kind);
  const int64_t tile = std::min<int64_t>(N, std::max<int64_t>(16, ((1 << 20) / (K * 4)) / 16 * 16));
  std::vector<float> buf(tile * K);
  float* const bp = buf.data();
  at::Tensor y = at::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t nt = std::min<int64_t>(tile, N - n0);
    at::parallel_for(0, nt, std::max<int64_t>(1, 65536 / K), [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) dequantize_row(kind, w + (n0 + n) * rb, nsb, bp + n * K);
    });
    const at::Tensor wt = at::from_blob(bp, {nt, K}, x.options());
    if (nt == N) return at::mm(x, wt.t());
    y.narrow(1, n0, nt).copy_(at::mm(x, wt.t()));
  }
  return y;
}

at::Tensor kquant_linear(KKind kind, const at::Tensor& x_in, const at::Tensor& kq) {
  const char* name = kind == Q4_K ? "q4_k_linear" : "q6_k_linear";
  const int64_t K = x_in.size(-1), N = kq.size(0), nsb = K / QK_K, rb = nsb * sb_bytes(kind);
  TORCH_CHECK(K % QK_K == 0, "llamalab ", name, ": K=", K, " is not a multiple of 256");
  TORCH_CHECK(kq.dim() == 2 && kq.size(1) == rb && kq.is_contiguous() && kq.scalar_type() == at::kByte,
              "llamalab ", name, ": kq must be a contiguous uint8 (N, ", rb, ") tensor");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "llamalab ", name, ": x must be a float tensor");
  c10::SmallVector<int64_t, 4> out_sizes(x_in.sizes().begin(), x_in.sizes().end());
  out_sizes.back() = N;
  const int64_t M = K ? x_in.numel() / K : 0;
  const uint8_t* w = kq.data_ptr<uint8_t>();
  if (M >= GEMM_ROWS) {
    return gemm_linear(kind, x_in.reshape({M, K}), w, N, K).to(x_in.scalar_type()).view(out_sizes);
  }
  const bool plain = x_in.scalar_type() == at::kFloat && x_in.is_contiguous();
  const at::Tensor x = plain ? x_in : x_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0 || N == 0) return plain ? y : y.to(x_in.scalar_type());
  // the activation quantized once, on the calling thread (vectors reused across calls)
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> xd, xs32, xs16;
  xq.resize(std::max<size_t>(xq.size(), M * K));
  xd.resize(std::max<size_t>(xd.size(), M * K / 32));
  xs32.resize(std::max<size_t>(xs32.size(), M * K / 32));
  xs16.resize(std::max<size_t>(xs16.size(), M * K / 16));
  const float* xp = x.data_ptr<float>();
  int8_t* const qp = xq.data();
  float* const dp = xd.data();
  float* const s32p = xs32.data();
  float* const s16p = xs16.data();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K, qp + m * K, dp + m * K / 32, s32p + m * K / 32, s16p + m * K / 16);
  const DotFn dot = dot_for(kind, llamalab::current_isa());
  float* const yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, llamalab::min_chunk() / std::max<int64_t>(1, rb * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        const Act a{qp + m * K, dp + m * K / 32, s32p + m * K / 32, s16p + m * K / 16};
        yp[m * N + n] = dot(w + n * rb, nsb, a);
      }
    }
  });
  return plain ? y : y.to(x_in.scalar_type());
}

at::Tensor q4_k_linear(const at::Tensor& x, const at::Tensor& kq) { return kquant_linear(Q4_K, x, kq); }
at::Tensor q6_k_linear(const at::Tensor& x, const at::Tensor& kq) { return kquant_linear(Q6_K, x, kq); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamalab, lib) {
  lib.def("q4_k_linear(Tensor x, Tensor kq) -> Tensor");
  lib.def("q6_k_linear(Tensor x, Tensor kq) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, lib) {
  lib.impl("q4_k_linear", &q4_k_linear);
  lib.impl("q6_k_linear", &q6_k_linear);
}
