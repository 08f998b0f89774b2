// The pieces of attention that the C++ attention kernels share (build.py pastes this file after
// panel_gemm.h): K and V laid out as panels for the two panel products that read them, and the
// softmax of a block of score rows.

#include <cmath>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fxpress_attention {

using namespace fxpress_gemm;

// Panel j ([k][NR]) of the [n, k] rows of src (row stride rs, column stride cs): K's keys as the
// output columns of scores = Q . K^T.
inline void panels_of_rows(const float* src, int64_t n, int64_t k, int64_t rs, int64_t cs, float* dst, int64_t j) {
  const int64_t cols = std::min<int64_t>(NR, n - j * NR);
  float* panel = dst + j * k * NR;
  for (int64_t c = 0; c < cols; ++c) {  // key by key: a row of src is read in order
    const float* row = src + (j * NR + c) * rs;
    for (int64_t p = 0; p < k; ++p) panel[p * NR + c] = row[p * cs];
  }
  for (int64_t p = 0; p < k && cols < NR; ++p) std::fill(panel + p * NR + cols, panel + (p + 1) * NR, 0.f);
}

// Panel j ([k][NR]) of the columns of src [k, n] (row stride rs, column stride cs): V's channels
// as the output columns of context = P . V.
inline void panels_of_columns(const float* src, int64_t k, int64_t n, int64_t rs, int64_t cs, float* dst,
                              int64_t j) {
  const int64_t cols = std::min<int64_t>(NR, n - j * NR);
  float* panel = dst + j * k * NR;
  for (int64_t p = 0; p < k; ++p) {
    const float* row = src + p * rs + j * NR * cs;
    float* to = panel + p * NR;
    for (int64_t c = 0; c < cols; ++c) to[c] = row[c * cs];
    std::fill(to + cols, to + NR, 0.f);
  }
}

// s[j] = s[j] * scale + m[j] (m may be null) for j < n, and the largest of them. Written with
// intrinsics: GCC leaves this loop scalar once it is inlined into an OpenMP region.
inline float scale_shift_max(float* s, const float* m, int64_t n, float scale) {
  int64_t j = 0;
  float top = -INFINITY;
#if defined(__AVX512F__)
  const __m512 factor = _mm512_set1_ps(scale);
  __m512 tops = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) {
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), factor);
    if (m) x = _mm512_add_ps(x, _mm512_loadu_ps(m + j));
    _mm512_storeu_ps(s + j, x);
    tops = _mm512_max_ps(tops, x);
  }
  if (j < n) {  // the tail under a lane mask
    const __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
    __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + j), factor);
    if (m) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(tail, m + j));
    _mm512_mask_storeu_ps(s + j, tail, x);
    tops = _mm512_mask_max_ps(tops, tail, tops, x);
    j = n;
  }
  top = _mm512_reduce_max_ps(tops);
#elif defined(__AVX2__)
  const __m256 factor = _mm256_set1_ps(scale);
  __m256 tops = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), factor);
    if (m) x = _mm256_add_ps(x, _mm256_loadu_ps(m + j));
    _mm256_storeu_ps(s + j, x);
    tops = _mm256_max_ps(tops, x);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, tops);
  for (float lane : lanes) top = std::max(top, lane);
#endif
  for (; j < n; ++j) {
    s[j] = s[j] * scale + (m ? m[j] : 0.f);
    top = std::max(top, s[j]);
  }
  return top;
}

// The sum of s[0, n): vector partial sums, then one tree reduction (an omp simd reduction ends in
// sixteen dependent scalar adds, which a short row pays in full).
inline float vector_sum(const float* s, int64_t n) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 sums = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) sums = _mm512_add_ps(sums, _mm512_loadu_ps(s + j));
  sum = _mm512_reduce_add_ps(sums);
#endif
  for (; j < n; ++j) sum += s[j];
  return sum;
}

// One past the last of keys [floor, n) whose mask entry m[j * mk] is not -inf, or floor when none.
inline int64_t last_unmasked(const float* m, int64_t n, int64_t mk, int64_t floor) {
  int64_t j = n;
#if defined(__AVX512F__)
  if (mk == 1) {  // sixteen entries a compare, from the end (a padding mask's tail is long)
    const __m512 hidden = _mm512_set1_ps(-INFINITY);
    for (; j - 16 >= floor; j -= 16) {
      const unsigned seen = _mm512_cmp_ps_mask(_mm512_loadu_ps(m + j - 16), hidden, _CMP_NEQ_UQ);
      if (seen) return j - 16 + (32 - __builtin_clz(seen));
    }
  }
#endif
  for (; j > floor; --j)
    if (m[(j - 1) * mk] != -INFINITY) return j;  // NaN counts as seen: it must reach the output
  return floor;
}

// How many of the first `keys` keys any of rows [0, rows) of the mask (row stride mq, key stride
// mk) lets through: one past the last key with an entry other than -inf. A padding mask hides the
// tail of every row; the keys past this bound add exp(-inf) = 0 to every softmax, so they need no
// work, not even their K and V laid out.
inline int64_t unmasked_keys(const float* mask, int64_t rows, int64_t keys, int64_t mq, int64_t mk) {
  if (!mask) return keys;
  if (mq == 0) rows = 1;  // one row broadcast over the queries
  int64_t bound = 0;
  for (int64_t i = 0; i < rows && bound < keys; ++i) bound = last_unmasked(mask + i * mq, keys, mk, bound);
  return bound;
}

// Row i of scores (stride ld), keys [0, keys) -> softmax(scale * scores + mask), with keys past
// query (r0 + i) hidden when causal (SDPA's is_causal: query i sees keys j <= i) and written as 0;
// a row that sees no key becomes 0 (the caller runs no row that SDPA would make NaN). The max and
// the sum are vector reductions: their order differs from a sequential one by float rounding only.
inline void softmax_rows(float* scores, int64_t rows, int64_t ld, int64_t keys, float scale, const float* mask,
                         int64_t mq, int64_t mk, bool causal, int64_t r0) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = scores + i * ld;
    const int64_t visible = causal ? std::min(keys, r0 + i + 1) : keys;
    const float* m = nullptr;
    if (mask) {
      m = mask + i * mq;
      if (mk != 1) {  // a strided row is gathered first, for the vector loop
        thread_local std::vector<float> gathered;
        gathered.resize(visible);
        for (int64_t j = 0; j < visible; ++j) gathered[j] = m[j * mk];
        m = gathered.data();
      }
    }
    const float top = scale_shift_max(s, m, visible, scale);
    if (top == -INFINITY) {
      std::fill(s, s + keys, 0.f);
      continue;
    }
    // Up to a whole number of vectors, where the row has room: the padding is -inf, whose exp is
    // 0, so the loops below have no scalar remainder (a short row would be all remainder).
    const int64_t whole = std::min((visible + 15) / 16 * 16, ld);
    std::fill(s + visible, s + whole, -INFINITY);
#pragma omp simd
    for (int64_t j = 0; j < whole; ++j) s[j] = exp_nonpositive(s[j] - top);
    const float inv = 1.f / vector_sum(s, whole);
#pragma omp simd
    for (int64_t j = 0; j < whole; ++j) s[j] *= inv;
    if (keys > whole) std::fill(s + whole, s + keys, 0.f);
  }
}

}  // namespace fxpress_attention
