// fxpress::lut_linear on the CPU (T-MAC's algorithm over fxpress's bit-plane weights).
//
// Few rows: for every group of 4 activations, a table of the 16 signed sums
// T[p] = sum_j (2 bit_j(p) - 1) x_j, quantised to int16 with one scale per chunk of tables (so a
// chunk's lookups add up in int16 without overflow) and split into a low-byte and a high-byte
// table of 16 bytes each. Weights are re-laid out once (fxpress/ops/cpp/lut.py): for every block of
// 32 output rows and every bit-plane, byte b of row r holds the 4-bit indices of tables 2b (low
// nibble) and 2b+1 (high nibble), the 32 rows side by side, so one 32-byte load gives 32 rows'
// indices and one byte shuffle (AVX2 vpshufb) looks up 32 rows at once. Each chunk's int16 sums
// are scaled to float by the table scale times the weight's alpha per (row, group, bit).
//
// With AVX-512BW the byte shuffles are replaced by word permutes (vpermw), which look up the
// int16 entries whole: no low/high byte tables to look up twice and interleave, a quarter of the
// shuffle-port work per lookup. Weights are then laid out in word pairs (WORD_PAIRS): bytes 2w and
// 2w+1 of a row side by side, 32 rows in one 64-byte load, so a row's word holds the indices of
// tables 4w..4w+3 in its four nibbles. vpermw reads 5 index bits, one more than a nibble, so each
// table is stored twice over (32 entries) and the word shifted right by 0, 4, 8 and 12 bits serves
// as the index with no masking. Lookups are exact int16 either way: every path agrees to the bit.
//
// Many rows: lut_dequantize expands output rows of the original layout into float32 for a GEMM.
//
// On ARM the byte tables are looked up with NEON's tbl, 16 rows at a time.
//
// Threads: OpenMP over blocks of output rows, as many as the caller passes (torch's intra-op
// count). The AVX-512, AVX2, NEON and portable paths do the same integer sums and the same float
// operations in the same order, so they agree to the bit.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512BW__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && !defined(FXPRESS_LUT_NEON_SHIM)
#include <arm_neon.h>
#endif

// The vector path: AVX-512BW, else AVX2, else NEON (ARM), else portable (FXPRESS_LUT_PORTABLE
// forces portable code, and FXPRESS_LUT_WORD_PAIRS the word-pair layout with it, so tests can
// compare every path; FXPRESS_LUT_NEON_SHIM builds the NEON path on x86 over a test's scalar
// definitions of the NEON intrinsics it uses, tests/native/neon_shim.h).
#if defined(__AVX512BW__) && !defined(FXPRESS_LUT_PORTABLE)
#define LUT_AVX512 1
#define FXPRESS_LUT_WORD_PAIRS 1
#elif defined(__AVX2__) && !defined(FXPRESS_LUT_PORTABLE)
#define LUT_AVX2 1
#elif (defined(__ARM_NEON) || defined(FXPRESS_LUT_NEON_SHIM)) && !defined(FXPRESS_LUT_PORTABLE)
#define LUT_NEON 1
#endif

namespace {

#if defined(FXPRESS_LUT_WORD_PAIRS)
constexpr bool WORD_PAIRS = true;
#else
constexpr bool WORD_PAIRS = false;
#endif

constexpr int ROWS = 32;        // output rows per block: one byte lane each
constexpr int MAX_M = 16;       // activation rows per call of the table path
constexpr int CHUNK_MAX = 16;   // tables per int16 chunk, at most (64 columns)

// SIGN[j][p] = 2 bit_j(p) - 1: the sign of activation j in table entry p.
constexpr float SIGN[4][16] = {
    {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1},
    {-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1},
    {-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1},
    {-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1}};

struct Tables {
  // [m][table][16] low and high bytes of the int16 entries (byte shuffles), or [m][table][32] the
  // entries themselves, twice over (word permutes); one float scale per (m, chunk).
  std::vector<uint8_t> lo, hi;
  std::vector<int16_t> wide;
  std::vector<float> scale, group_sum;
};

// Tables of one activation row; columns at or past in_features count as zero.
void build_tables(const float* x, int64_t in_features, int64_t k_pad, int64_t chunk_tables, int64_t group_size,
                  uint8_t* lo, uint8_t* hi, int16_t* wide, float* scale, float* group_sum) {
  const int64_t n_tables = k_pad / 4;
  const float table_max = (float)(32767 / chunk_tables);
  for (int64_t g = 0; g < k_pad / group_size; ++g) {
    float s = 0.f;
    for (int64_t k = g * group_size; k < (g + 1) * group_size && k < in_features; ++k) s += x[k];
    group_sum[g] = s;
  }
  for (int64_t c0 = 0; c0 < n_tables; c0 += chunk_tables) {
    float v[CHUNK_MAX][16];
    float top = 0.f;
    for (int64_t t = 0; t < chunk_tables; ++t) {
      float a[4];
      for (int j = 0; j < 4; ++j) {
        int64_t k = (c0 + t) * 4 + j;
        a[j] = k < in_features ? x[k] : 0.f;
      }
      for (int p = 0; p < 16; ++p)  // signs as constants: the 16 entries vectorise
        v[t][p] = SIGN[0][p] * a[0] + SIGN[1][p] * a[1] + SIGN[2][p] * a[2] + SIGN[3][p] * a[3];
      float mag = std::fabs(a[0]) + std::fabs(a[1]) + std::fabs(a[2]) + std::fabs(a[3]);
      top = mag > top ? mag : top;
    }
    float s = top > 0.f ? top / table_max : 1.f;
    float inv = 1.f / s;
    scale[c0 / chunk_tables] = s;
    for (int64_t t = 0; t < chunk_tables; ++t) {
      for (int p = 0; p < 16; ++p) {
        float r = std::floor(v[t][p] * inv + 0.5f);  // inlined (nearbyint is a libm call here)
        r = r > table_max ? table_max : (r < -table_max ? -table_max : r);
        if (WORD_PAIRS) {
          wide[(c0 + t) * 32 + p] = wide[(c0 + t) * 32 + 16 + p] = (int16_t)r;
        } else {
          uint16_t code = (uint16_t)(int16_t)r;
          lo[(c0 + t) * 16 + p] = (uint8_t)(code & 0xFF);
          hi[(c0 + t) * 16 + p] = (uint8_t)(code >> 8);
        }
      }
    }
  }
}

#if defined(LUT_AVX512)
// R activation rows at once over one chunk of one block and bit-plane: each word of indices is
// loaded and shifted once for all R rows. The int16 sums go straight to float:
// acc[r][row] += (float)sum * scale[r] * alpha[row], as chunk_accumulate writes it.
template <int R>
void word_accumulate(const uint8_t* idx, int64_t n_words, const int16_t* wide, int64_t row_stride, const float* scale,
                     int64_t scale_stride, const float* alpha, float (*acc)[ROWS]) {
  __m512i sum[R];
  for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_si512();
  for (int64_t w = 0; w < n_words; ++w) {
    const __m512i v0 = _mm512_loadu_si512((const void*)(idx + w * 2 * ROWS));
    const __m512i v1 = _mm512_srli_epi16(v0, 4), v2 = _mm512_srli_epi16(v0, 8), v3 = _mm512_srli_epi16(v0, 12);
    for (int r = 0; r < R; ++r) {
      const int16_t* t = wide + r * row_stride + w * 4 * 32;
      __m512i a = _mm512_add_epi16(_mm512_permutexvar_epi16(v0, _mm512_loadu_si512((const void*)t)),
                                   _mm512_permutexvar_epi16(v1, _mm512_loadu_si512((const void*)(t + 32))));
      __m512i b = _mm512_add_epi16(_mm512_permutexvar_epi16(v2, _mm512_loadu_si512((const void*)(t + 64))),
                                   _mm512_permutexvar_epi16(v3, _mm512_loadu_si512((const void*)(t + 96))));
      sum[r] = _mm512_add_epi16(sum[r], _mm512_add_epi16(a, b));
    }
  }
  const __m512 alpha_lo = _mm512_loadu_ps(alpha), alpha_hi = _mm512_loadu_ps(alpha + 16);
  for (int r = 0; r < R; ++r) {
    const __m512 s = _mm512_set1_ps(scale[r * scale_stride]);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(sum[r])));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(sum[r], 1)));
    lo = _mm512_mul_ps(_mm512_mul_ps(lo, s), alpha_lo);
    hi = _mm512_mul_ps(_mm512_mul_ps(hi, s), alpha_hi);
    _mm512_storeu_ps(acc[r], _mm512_add_ps(_mm512_loadu_ps(acc[r]), lo));
    _mm512_storeu_ps(acc[r] + 16, _mm512_add_ps(_mm512_loadu_ps(acc[r] + 16), hi));
  }
}
#endif

#if !defined(LUT_AVX512)
// Adds, for one block of 32 rows, one chunk and one bit-plane, sum_t T_m[t][index(row, t)] for
// every row into sums[m][32] (int32: exact), for rows m of x. The chunk's indices take n_bytes
// bytes per row (two tables each).
void chunk_sums(const uint8_t* idx, int64_t n_bytes, const Tables& tab, int64_t table0, int64_t n_tables, int64_t m,
                int32_t (*sums)[ROWS]) {
#if defined(LUT_AVX2)
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t r = 0; r < m; ++r) {
    __m256i acc_a = _mm256_setzero_si256(), acc_b = _mm256_setzero_si256();
    const uint8_t* lo = tab.lo.data() + (r * n_tables + table0) * 16;
    const uint8_t* hi = tab.hi.data() + (r * n_tables + table0) * 16;
    for (int64_t b = 0; b < n_bytes; ++b) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(idx + b * ROWS));
      __m256i even = _mm256_and_si256(v, low4), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      __m256i t_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(lo + 32 * b)));
      __m256i t_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(hi + 32 * b)));
      __m256i l = _mm256_shuffle_epi8(t_lo, even), h = _mm256_shuffle_epi8(t_hi, even);
      acc_a = _mm256_add_epi16(acc_a, _mm256_unpacklo_epi8(l, h));  // rows 0-7 | 16-23
      acc_b = _mm256_add_epi16(acc_b, _mm256_unpackhi_epi8(l, h));  // rows 8-15 | 24-31
      t_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(lo + 32 * b + 16)));
      t_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(hi + 32 * b + 16)));
      l = _mm256_shuffle_epi8(t_lo, odd);
      h = _mm256_shuffle_epi8(t_hi, odd);
      acc_a = _mm256_add_epi16(acc_a, _mm256_unpacklo_epi8(l, h));
      acc_b = _mm256_add_epi16(acc_b, _mm256_unpackhi_epi8(l, h));
    }
    __m256i* s = (__m256i*)sums[r];
    s[0] = _mm256_add_epi32(s[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_a)));
    s[1] = _mm256_add_epi32(s[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc_b)));
    s[2] = _mm256_add_epi32(s[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_a, 1)));
    s[3] = _mm256_add_epi32(s[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc_b, 1)));
  }
#elif defined(LUT_NEON)
  // AVX2's lookups 16 rows at a time: tbl (vqtbl1q_u8) is vpshufb's NEON twin, and zipping the
  // low and high bytes gives each row's int16 entry.
  const uint8x16_t low4 = vdupq_n_u8(0x0F);
  for (int64_t r = 0; r < m; ++r) {
    int16x8_t acc[4] = {vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0)};  // rows 0-7, .. 24-31
    const uint8_t* lo = tab.lo.data() + (r * n_tables + table0) * 16;
    const uint8_t* hi = tab.hi.data() + (r * n_tables + table0) * 16;
    for (int64_t b = 0; b < n_bytes; ++b) {
      for (int half = 0; half < 2; ++half) {  // the low nibbles index table 2b, the high ones 2b + 1
        const uint8x16_t t_lo = vld1q_u8(lo + 32 * b + 16 * half), t_hi = vld1q_u8(hi + 32 * b + 16 * half);
        for (int q = 0; q < 2; ++q) {  // rows 16q .. 16q + 15
          const uint8x16_t v = vld1q_u8(idx + b * ROWS + 16 * q);
          const uint8x16_t e = half ? vshrq_n_u8(v, 4) : vandq_u8(v, low4);
          const uint8x16_t l = vqtbl1q_u8(t_lo, e), h = vqtbl1q_u8(t_hi, e);
          acc[2 * q] = vaddq_s16(acc[2 * q], vreinterpretq_s16_u8(vzip1q_u8(l, h)));
          acc[2 * q + 1] = vaddq_s16(acc[2 * q + 1], vreinterpretq_s16_u8(vzip2q_u8(l, h)));
        }
      }
    }
    for (int a = 0; a < 4; ++a) {
      int32_t* s = sums[r] + 8 * a;
      vst1q_s32(s, vaddq_s32(vld1q_s32(s), vmovl_s16(vget_low_s16(acc[a]))));
      vst1q_s32(s + 4, vaddq_s32(vld1q_s32(s + 4), vmovl_s16(vget_high_s16(acc[a]))));
    }
  }
#else
  for (int64_t r = 0; r < m; ++r) {
    for (int row = 0; row < ROWS; ++row) {
      int32_t acc = 0;
      for (int64_t b = 0; b < n_bytes; ++b) {
        // Where byte b of this row lies: 32 rows of one byte, or 32 rows of one byte pair.
        uint8_t v = WORD_PAIRS ? idx[(b >> 1) * 2 * ROWS + 2 * row + (b & 1)] : idx[b * ROWS + row];
        for (int half = 0; half < 2; ++half) {
          const int64_t t = r * n_tables + table0 + 2 * b + half;
          const int e = half ? v >> 4 : v & 15;
          acc += WORD_PAIRS ? tab.wide[t * 32 + e] : (int16_t)(uint16_t)(tab.lo[t * 16 + e] | tab.hi[t * 16 + e] << 8);
        }
      }
      sums[r][row] += acc;
    }
  }
#endif
}
#endif

// One chunk c of one block and bit-plane, for rows m of x:
// acc[r][row] += (float)(sum of the chunk's lookups) * table scale * alpha[row].
void chunk_accumulate(const uint8_t* idx, int64_t c, int64_t chunk_tables, int64_t chunks, const Tables& tab,
                      int64_t n_tables, int64_t m, const float* alpha, float (*acc)[ROWS]) {
#if defined(LUT_AVX512)
  const int64_t stride = n_tables * 32, n_words = chunk_tables / 4;
  const int16_t* wide = tab.wide.data() + c * chunk_tables * 32;
  const float* scale = tab.scale.data() + c;
  for (int64_t r = 0; r < m; r += 4) {  // four rows share each index load and its shifts
    const int16_t* t = wide + r * stride;
    const float* s = scale + r * chunks;
    switch (m - r < 4 ? m - r : 4) {
      case 1: word_accumulate<1>(idx, n_words, t, stride, s, chunks, alpha, acc + r); break;
      case 2: word_accumulate<2>(idx, n_words, t, stride, s, chunks, alpha, acc + r); break;
      case 3: word_accumulate<3>(idx, n_words, t, stride, s, chunks, alpha, acc + r); break;
      default: word_accumulate<4>(idx, n_words, t, stride, s, chunks, alpha, acc + r); break;
    }
  }
#else
  alignas(32) int32_t sums[MAX_M][ROWS];
  std::memset(sums, 0, sizeof(sums[0]) * m);
  chunk_sums(idx, chunk_tables / 2, tab, c * chunk_tables, n_tables, m, sums);
  for (int64_t r = 0; r < m; ++r) {
    const float s = tab.scale[r * chunks + c];
    for (int row = 0; row < ROWS; ++row) acc[r][row] += (float)sums[r][row] * s * alpha[row];
  }
#endif
}

}  // namespace

extern "C" {

// 1 when the weights are to be laid out in word pairs (fxpress/ops/cpp/lut.py), 0 for bytes.
int fxpress_lut_word_pairs() { return WORD_PAIRS ? 1 : 0; }

// out[m, n] (row stride out_stride) = x[m, :in_features] @ W.T (+ bias), m <= 16.
// idx: [blocks][q][k_pad/8][32] bytes ([blocks][q][k_pad/16][32][2] in word pairs);
// alpha_p: [blocks][groups][q][32]; beta_p: [blocks][groups][32].
void fxpress_lut_gemv(const float* x, int64_t x_stride, int64_t m, int64_t in_features, int64_t k_pad,
                      const uint8_t* idx, const float* alpha_p, const float* beta_p, const float* bias, int64_t n,
                      int64_t q, int64_t group_size, float* out, int64_t out_stride, int threads) {
  const int64_t n_tables = k_pad / 4, groups = k_pad / group_size, blocks = (n + ROWS - 1) / ROWS;
  // A chunk lies within one group: 64 columns, or 32 where groups are an odd number of 32.
  const int64_t chunk_cols = group_size % (4 * CHUNK_MAX) == 0 ? 4 * CHUNK_MAX : 32;
  const int64_t chunk_tables = chunk_cols / 4, chunks = k_pad / chunk_cols, chunks_per_group = group_size / chunk_cols;
  Tables tab;
  if (WORD_PAIRS) {
    tab.wide.resize(m * n_tables * 32);
  } else {
    tab.lo.resize(m * n_tables * 16);
    tab.hi.resize(m * n_tables * 16);
  }
  tab.scale.resize(m * chunks);
  tab.group_sum.resize(m * groups);
  for (int64_t r = 0; r < m; ++r)
    build_tables(x + r * x_stride, in_features, k_pad, chunk_tables, group_size,
                 WORD_PAIRS ? nullptr : tab.lo.data() + r * n_tables * 16,
                 WORD_PAIRS ? nullptr : tab.hi.data() + r * n_tables * 16,
                 WORD_PAIRS ? tab.wide.data() + r * n_tables * 32 : nullptr, tab.scale.data() + r * chunks,
                 tab.group_sum.data() + r * groups);
  const int64_t plane_bytes = k_pad / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    alignas(64) float acc[MAX_M][ROWS] = {};
    for (int64_t g = 0; g < groups; ++g) {
      const float* alpha = alpha_p + (blk * groups + g) * q * ROWS;
      const float* beta = beta_p + (blk * groups + g) * ROWS;
      for (int64_t i = 0; i < q; ++i) {
        const uint8_t* plane = idx + (blk * q + i) * plane_bytes * ROWS;
        for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c)
          chunk_accumulate(plane + c * (chunk_tables / 2) * ROWS, c, chunk_tables, chunks, tab, n_tables, m,
                           alpha + i * ROWS, acc);
      }
      for (int64_t r = 0; r < m; ++r) {
        const float gs = tab.group_sum[r * groups + g];
        for (int row = 0; row < ROWS; ++row) acc[r][row] += beta[row] * gs;
      }
    }
    const int64_t first = blk * ROWS, last = first + ROWS < n ? first + ROWS : n;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t o = first; o < last; ++o)
        out[r * out_stride + o] = acc[r][o - first] + (bias ? bias[o] : 0.f);
  }
}

// w[rows, in_features] = the float32 weight of output rows [row0, row0 + rows), original layout:
// planes int32 [q, n, words], alpha [n, groups, q], beta [n, groups].
void fxpress_lut_dequantize(const int32_t* planes, const float* alpha, const float* beta, int64_t q, int64_t n,
                            int64_t words, int64_t group_size, int64_t in_features, int64_t row0, int64_t rows,
                            float* w, int threads) {
  const int64_t groups = words * 32 / group_size;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = row0 + r;
    float* dst = w + r * in_features;
    for (int64_t word = 0; word < words; ++word) {
      const int64_t g = word * 32 / group_size, k0 = word * 32;
      const float* a = alpha + (o * groups + g) * q;
      float v[32];
      for (int j = 0; j < 32; ++j) v[j] = beta[o * groups + g];
      for (int64_t i = 0; i < q; ++i) {
        const uint32_t bits = (uint32_t)planes[(i * n + o) * words + word];
        for (int j = 0; j < 32; ++j) v[j] += (bits >> j & 1u) ? a[i] : -a[i];
      }
      const int64_t count = in_features - k0 < 32 ? in_features - k0 : 32;
      for (int64_t j = 0; j < count; ++j) dst[k0 + j] = v[j];
    }
  }
}

}  // extern "C"
