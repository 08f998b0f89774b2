// C = epilogue(A . W^T + bias) over row-major A and W re-laid out in panels: the block product the
// low-rank kernels are made of (build.py pastes this file, after fast_math.h, in front of theirs).
//
// W (nn.Linear layout, [n, k]) is re-laid out once (fxpress/ops/cpp/lowrank.py) into panels of
// NR = 16 output columns, each panel k x 16 contiguous and zero-padded past the last column. The
// micro-kernel keeps an MR x NR = 6 x 16 block of C in twelve AVX2 registers and streams the panel
// and six rows of A through them, one fused multiply-add per register per k. With AVX-512 a panel
// row is one register, and the micro-kernel takes two panels and twelve rows at once: 24
// accumulators, and 14 loads per 24 FMAs, so the FMA units set the pace. The epilogue (bias,
// activation, a gate's product, a sum over heads) runs on the accumulated block as it is stored:
// pre-activations are never written out.

#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace fxpress_gemm {

using namespace fxpress_math;

#if defined(__AVX512F__)
constexpr int MR = 12;               // rows of a micro-kernel block
constexpr int64_t KC = 192;          // k per slice, at most: two panels' slices are 24 KiB (L1)
#else
constexpr int MR = 6;
constexpr int64_t KC = 384;          // a panel's slice is 24 KiB (L1)
#endif
constexpr int NR = 16;               // columns of a panel
constexpr int64_t ACC_BYTES = 128 << 10;  // accumulators of one group of panels (L2)

enum Activation { NONE = 0, GELU = 1, GELU_TANH = 2, SILU = 3, RELU = 4 };

enum Store { WRITE = 0, MULTIPLY = 1, ADD = 2 };  // C = v, C *= v (a gate), C += v (a sum over heads)

struct Step {
  const float* w;      // panels [ceil(n / NR)][k][NR]
  const float* bias;   // [n] or null
  int64_t k, n;
  int activation;
  int store;
  int src, dst;        // buffers of a Chain: 0 is x, 1.. are scratch, OUT is the output
};

// acc[R][NR] (+)= a[R rows, stride lda][0, kc) . b[0, kc)[NR]
template <int R>
inline void micro(const float* a, int64_t lda, const float* b, int64_t kc, float* acc, bool first) {
#if defined(__AVX512F__)
  __m512 c[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) c[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * NR);
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 bv = _mm512_loadu_ps(b + p * NR);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + p]), bv, c[r]);
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * NR, c[r]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 c[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    c[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + r * NR);
    c[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + r * NR + 8);
  }
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b + p * NR), b1 = _mm256_loadu_ps(b + p * NR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + p);
      c[r][0] = _mm256_fmadd_ps(av, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(av, b1, c[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * NR, c[r][0]);
    _mm256_storeu_ps(acc + r * NR + 8, c[r][1]);
  }
#else
  float c[R][NR];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) c[r][j] = first ? 0.f : acc[r * NR + j];
  for (int64_t p = 0; p < kc; ++p)
    for (int r = 0; r < R; ++r) {
      const float av = a[r * lda + p];
      for (int j = 0; j < NR; ++j) c[r][j] += av * b[p * NR + j];
    }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) acc[r * NR + j] = c[r][j];
#endif
}

#if defined(__AVX512F__)
// Two panels at once, acc0 and acc1 for panels b0 and b1: 2R accumulators, 2 + R loads per 2R FMAs,
// so the FMA units rather than the loads set the pace.
template <int R>
inline void micro2(const float* a, int64_t lda, const float* b0, const float* b1, int64_t kc, float* acc0,
                   float* acc1, bool first) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    c0[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc0 + r * NR);
    c1[r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc1 + r * NR);
  }
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 v0 = _mm512_loadu_ps(b0 + p * NR), v1 = _mm512_loadu_ps(b1 + p * NR);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + p]);
      c0[r] = _mm512_fmadd_ps(av, v0, c0[r]);
      c1[r] = _mm512_fmadd_ps(av, v1, c1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(acc0 + r * NR, c0[r]);
    _mm512_storeu_ps(acc1 + r * NR, c1[r]);
  }
}

template <int R = MR>
inline void micro2_rows(int64_t rows, const float* a, int64_t lda, const float* b0, const float* b1, int64_t kc,
                        float* acc0, float* acc1, bool first) {
  if constexpr (R > 1) {
    if (rows < R) return micro2_rows<R - 1>(rows, a, lda, b0, b1, kc, acc0, acc1, first);
  }
  micro2<R>(a, lda, b0, b1, kc, acc0, acc1, first);
}
#endif

// micro<rows> for 1 <= rows <= MR.
template <int R = MR>
inline void micro_rows(int64_t rows, const float* a, int64_t lda, const float* b, int64_t kc, float* acc,
                       bool first) {
  if constexpr (R > 1) {
    if (rows < R) return micro_rows<R - 1>(rows, a, lda, b, kc, acc, first);
  }
  micro<R>(a, lda, b, kc, acc, first);
}

inline void activate(int activation, float* v) {
  switch (activation) {
    case GELU: for (int j = 0; j < NR; ++j) v[j] = gelu(v[j]); break;
    case GELU_TANH: for (int j = 0; j < NR; ++j) v[j] = gelu_tanh(v[j]); break;
    case SILU: for (int j = 0; j < NR; ++j) v[j] = silu(v[j]); break;
    case RELU: for (int j = 0; j < NR; ++j) v[j] = relu(v[j]); break;
    default: break;
  }
}

// Stores panel j of rows [0, m): C = act(acc + bias), or C *= / += it (Store).
void epilogue(const Step& s, const float* acc, int64_t m, float* c, int64_t ldc, int64_t j) {
  const int64_t col0 = j * NR, cols = std::min<int64_t>(NR, s.n - col0);
  float bias[NR] = {};
  if (s.bias) std::copy(s.bias + col0, s.bias + col0 + cols, bias);
  for (int64_t i = 0; i < m; ++i) {
    float v[NR];
    for (int q = 0; q < NR; ++q) v[q] = acc[i * NR + q] + bias[q];
    activate(s.activation, v);
    float* row = c + i * ldc + col0;
    if (s.store == MULTIPLY) {
      for (int64_t q = 0; q < cols; ++q) row[q] *= v[q];
    } else if (s.store == ADD) {
      for (int64_t q = 0; q < cols; ++q) row[q] += v[q];
    } else {
      std::copy(v, v + cols, row);
    }
  }
}

// Rows [0, m) of C (stride ldc), panels [j0, j1) of the step: C = epilogue(A (stride lda) . W^T).
// Panels go in groups whose accumulators fit in L2; within a group, k slices go outermost, so a
// slice of A's rows stays in L2 while each panel's slice (in L1) passes over all of its rows.
void run_step(const Step& s, const float* a, int64_t lda, int64_t m, float* c, int64_t ldc, int64_t j0, int64_t j1) {
  if (m == 0) return;
  const int64_t slices = std::max<int64_t>(1, (s.k + KC - 1) / KC), kc_even = std::max<int64_t>(1, (s.k + slices - 1) / slices);
  const int64_t group = std::max<int64_t>(1, ACC_BYTES / (4 * NR * m));
  thread_local std::vector<float> accumulators;  // [panel of the group][row][NR]
  accumulators.resize(std::max<size_t>(accumulators.size(), (size_t)(group * m * NR)));
  float* acc = accumulators.data();
  for (int64_t g0 = j0; g0 < j1; g0 += group) {
    const int64_t g1 = std::min(j1, g0 + group);
    if (s.k == 0) std::fill(acc, acc + (g1 - g0) * m * NR, 0.f);  // an empty sum (no keys, say)
    for (int64_t p0 = 0; p0 < s.k; p0 += kc_even) {
      const int64_t kc = std::min(kc_even, s.k - p0);
      int64_t j = g0;
#if defined(__AVX512F__)
      for (; j + 1 < g1; j += 2) {
        const float* panel = s.w + (j * s.k + p0) * NR;
        for (int64_t i = 0; i < m; i += MR)
          micro2_rows(std::min<int64_t>(MR, m - i), a + i * lda + p0, lda, panel, panel + s.k * NR, kc,
                      acc + ((j - g0) * m + i) * NR, acc + ((j + 1 - g0) * m + i) * NR, p0 == 0);
      }
#endif
      for (; j < g1; ++j) {
        const float* panel = s.w + (j * s.k + p0) * NR;
        for (int64_t i = 0; i < m; i += MR)
          micro_rows(std::min<int64_t>(MR, m - i), a + i * lda + p0, lda, panel, kc, acc + ((j - g0) * m + i) * NR,
                     p0 == 0);
      }
    }
    for (int64_t j = g0; j < g1; ++j) epilogue(s, acc + (j - g0) * m * NR, m, c, ldc, j);
  }
}

}  // namespace fxpress_gemm
