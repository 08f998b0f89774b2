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

// How many of the first `keys` keys any of rows [0, rows) of the mask (row stride mq, key stride
// mk) lets through: one past the last key with a finite entry. A padding mask hides the tail of
// every row; the keys past this bound add exp(-inf) = 0 to every softmax, so they need no work.
inline int64_t unmasked_keys(const float* mask, int64_t rows, int64_t keys, int64_t mq, int64_t mk) {
  if (!mask) return keys;
  if (mq == 0) rows = 1;  // one row broadcast over the queries
  for (int64_t j = keys - 1; j >= 0; --j)
    for (int64_t i = 0; i < rows; ++i)
      if (mask[i * mq + j * mk] != -INFINITY) return j + 1;
  return 0;
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
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < visible; ++j) {
      s[j] = exp_nonpositive(s[j] - top);
      sum += s[j];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < visible; ++j) s[j] *= inv;
    std::fill(s + visible, s + keys, 0.f);
  }
}

}  // namespace fxpress_attention
