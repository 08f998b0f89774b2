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
#if defined(__AVX512F__)
  if (cs == 1 && rs < (int64_t{1} << 27)) {  // a panel row is one gather: element p of NR rows of src
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)rs));
    const __mmask16 valid = (__mmask16)((1u << cols) - 1);
    const float* first = src + j * NR * rs;
    for (int64_t p = 0; p < k; ++p)
      _mm512_storeu_ps(panel + p * NR, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, rows, first + p, 4));
    return;
  }
#endif
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
#if defined(__AVX512F__)
  if (cs == 1) {  // a row's channels are one masked load: V as a projection leaves it
    const __mmask16 valid = (__mmask16)((1u << cols) - 1);
    for (int64_t p = 0; p < k; ++p)
      _mm512_storeu_ps(panel + p * NR, _mm512_maskz_loadu_ps(valid, src + p * rs + j * NR));
    return;
  }
#endif
  for (int64_t p = 0; p < k; ++p) {
    const float* row = src + p * rs + j * NR * cs;
    float* to = panel + p * NR;
    for (int64_t c = 0; c < cols; ++c) to[c] = row[c * cs];
    std::fill(to + cols, to + NR, 0.f);
  }
}

#if defined(__AVX512F__)
// c[R rows, stride ldc][P panels of NR] = row_scale[r] * (a[R rows, stride lda][0, k) . b[0, k)[NR]),
// b the first of P panels spaced `next` apart; the accumulators are scaled and stored straight from
// registers (the last panel's columns under `tail`), with no buffer or epilogue between.
template <int R, int P>
inline void product_block(const float* a, int64_t lda, const float* b, int64_t next, int64_t k, float* c,
                          int64_t ldc, __mmask16 tail, const float* row_scale) {
  __m512 acc[P][R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < P; ++q) acc[q][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k; ++p) {
    __m512 panel_row[P];
    for (int q = 0; q < P; ++q) panel_row[q] = _mm512_loadu_ps(b + q * next + p * NR);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + p]);
      for (int q = 0; q < P; ++q) acc[q][r] = _mm512_fmadd_ps(av, panel_row[q], acc[q][r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    const __m512 factor = _mm512_set1_ps(row_scale ? row_scale[r] : 1.f);
    for (int q = 0; q < P; ++q)
      _mm512_mask_storeu_ps(c + r * ldc + q * NR, q == P - 1 ? tail : (__mmask16)0xFFFF,
                            _mm512_mul_ps(acc[q][r], factor));
  }
}

template <int P, int R = MR>
inline void product_rows(int64_t rows, const float* a, int64_t lda, const float* b, int64_t next, int64_t k,
                         float* c, int64_t ldc, __mmask16 tail, const float* row_scale) {
  if constexpr (R > 1) {
    if (rows < R) return product_rows<P, R - 1>(rows, a, lda, b, next, k, c, ldc, tail, row_scale);
  }
  product_block<R, P>(a, lda, b, next, k, c, ldc, tail, row_scale);
}
#endif

// c[rows, stride ldc][0, n) = row_scale[i] * (a[rows, stride lda][0, k) . panels), over panels laid
// out by panels_of_rows / panels_of_columns ([k][NR] each, `next` floats apart: a layout made for
// more keys than a block sees is read in place); row_scale may be null (1). Attention's products are
// short in k (a head's width, a block's keys): with AVX-512 each block of rows is accumulated in
// registers over the whole of k and stored at once.
inline void product_into(const float* panels, int64_t next, int64_t k, int64_t n, const float* a, int64_t lda,
                         int64_t rows, float* c, int64_t ldc, const float* row_scale) {
  const int64_t count = (n + NR - 1) / NR;
#if defined(__AVX512F__)
  for (int64_t i = 0; i < rows; i += MR) {
    const int64_t block = std::min<int64_t>(MR, rows - i);
    const float* scale = row_scale ? row_scale + i : nullptr;
    for (int64_t j = 0; j < count; j += 2) {
      const int64_t last = std::min(j + 2, count) - 1, cols = std::min<int64_t>(NR, n - last * NR);
      const __mmask16 tail = (__mmask16)((1u << cols) - 1);
      float* to = c + i * ldc + j * NR;
      if (last > j) product_rows<2>(block, a + i * lda, lda, panels + j * next, next, k, to, ldc, tail, scale);
      else product_rows<1>(block, a + i * lda, lda, panels + j * next, next, k, to, ldc, tail, scale);
    }
  }
#else
  for (int64_t j = 0; j < count; ++j) {
    const Step step{panels + j * next, nullptr, k, std::min<int64_t>(NR, n - j * NR), NONE, WRITE, 0, 0};
    run_step(step, a, lda, rows, c + j * NR, ldc, 0, 1);
  }
  if (row_scale)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] *= row_scale[i];
#endif
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

// s[j] = exp(s[j] - top) for j < n (s[j] <= top), and their sum. With AVX-512 the power of two
// is applied by vscalefps, which needs none of the exponent-bit arithmetic of exp_nonpositive
// (the same reduction and polynomial otherwise, so the same results up to rounding): a softmax
// row's exps are most of its cost.
inline float exp_shifted_sum(float* s, int64_t n, float top) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top), floor = _mm512_set1_ps(-87.f);
  __m512 sums = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(s + j), shift);
    // below -87 the result is 0, as exp_nonpositive's; a NaN passes the compare and stays NaN
    const __mmask16 kept = _mm512_cmp_ps_mask(x, floor, _CMP_NLT_UQ);
    const __m512 clamped = _mm512_max_ps(floor, x);  // a NaN x is returned as it is
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-0.693145751953125f), clamped);
    r = _mm512_fmadd_ps(k, _mm512_set1_ps(-1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 em1 = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r);
    const __m512 e = _mm512_maskz_scalef_ps(kept, _mm512_add_ps(em1, _mm512_set1_ps(1.f)), k);
    _mm512_storeu_ps(s + j, e);
    sums = _mm512_add_ps(sums, e);
  }
  sum = _mm512_reduce_add_ps(sums);
  for (; j < n; ++j) sum += s[j] = exp_nonpositive(s[j] - top);
  return sum;
#else
#pragma omp simd reduction(+ : sum)
  for (j = 0; j < n; ++j) sum += s[j] = exp_nonpositive(s[j] - top);
  return sum;
#endif
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
// With inv_sums, rows are left unnormalised (exp(s - max)) and 1 / sum goes to inv_sums[i] (0 for a
// row that sees no key), for the caller to scale the row's product with V instead: dv values a row
// rather than one per key.
inline void softmax_rows(float* scores, int64_t rows, int64_t ld, int64_t keys, float scale, const float* mask,
                         int64_t mq, int64_t mk, bool causal, int64_t r0, float* inv_sums = nullptr) {
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
      if (inv_sums) inv_sums[i] = 0.f;
      continue;
    }
    // Up to a whole number of vectors, where the row has room: the padding is -inf, whose exp is
    // 0, so the loops below have no scalar remainder (a short row would be all remainder).
    const int64_t whole = std::min((visible + 15) / 16 * 16, ld);
    std::fill(s + visible, s + whole, -INFINITY);
    const float inv = 1.f / exp_shifted_sum(s, whole, top);
    if (inv_sums) {
      inv_sums[i] = inv;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < whole; ++j) s[j] *= inv;
    }
    if (keys > whole) std::fill(s + whole, s + keys, 0.f);
  }
}

}  // namespace fxpress_attention
