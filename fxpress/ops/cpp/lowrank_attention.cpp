// fxpress::lowrank_attention on the CPU: attention over Q, K and V rebuilt from their rank-r
// factors p = x . down^T, with panel products (fxpress/native/panel_gemm.h) throughout.
//
// For each sequence and KV head, K and V are rebuilt once (p . up^T + bias, [seq_k, d]) and laid
// out as panels for the two products that read them (scores = Q . K^T reads K's rows as output
// columns, context = P . V reads V's columns). Then blocks of QB queries go to the threads; for
// each query head of the group a block rebuilds its Q rows, takes the scores (scaled, masked, and
// causal as SDPA's is_causal: query i sees keys j <= i), a softmax, and the context, and either
// writes it to out[b, h, rows] or adds context . o_down[:, h]^T to out[b, rows] (the output
// projection's first factor). Full-width Q, K, V and the attention output never exist beyond one KV head.
// Each rebuilt K and Q row is RMS-normalised (q_norm, k_norm) and rotated by its position's cos
// and sin (a rotary embedding) as soon as it is made.

#include <cmath>
#include <omp.h>

namespace {

using namespace fxpress_gemm;
using namespace fxpress_attention;

constexpr int64_t QB = 48;  // queries per block, at most
constexpr int64_t KB = 64;  // keys per block when K and V are rebuilt

struct Factor {  // p [batch, seq, rank] contiguous, up as per-head panels, bias [heads * d] or null
  const float* p;
  int64_t rank;
  const float* panels;
  const float* bias;
};

// Rows [r0, r0 + rows) of sequence b of head h's projection: p . up_h^T + bias_h, into c (stride d).
void rebuild(const Factor& f, int64_t seq, int64_t b, int64_t r0, int64_t rows, int64_t h, int64_t d, float* c) {
  const int64_t panels = (d + NR - 1) / NR;
  const Step step{f.panels + h * panels * f.rank * NR, f.bias ? f.bias + h * d : nullptr, f.rank, d, NONE, WRITE,
                  0, 0};
  run_step(step, f.p + (b * seq + r0) * f.rank, f.rank, rows, c, d, 0, panels);
}

// RMSNorm over each of rows [rows, d] (stride d), times weight[d] (Gemma 3's and Qwen 3's q_norm
// and k_norm). The sum of squares is a vector reduction (omp simd): float rounding only.
void head_norm(float* c, int64_t rows, int64_t d, const float* weight, float eps) {
  for (int64_t i = 0; i < rows; ++i) {
    float* x = c + i * d;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < d; ++j) squares += x[j] * x[j];
    const float r = 1.f / std::sqrt(squares / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) x[j] = x[j] * r * weight[j];
  }
}

enum Rotary { NO_ROTARY = 0, ROTATE_HALF = 1, ROTATE_PAIRS = 2 };

// The rotary embedding, in place on rows [rows, d] (stride d) whose positions' cos and sin rows are
// cos[i * d], sin[i * d]: x * cos + rotate(x) * sin, rotate being Llama's rotate_half ((x1, x2) ->
// (-x2, x1), halves of the head) or the interleaved form ((x0, x1) -> (-x1, x0), pairs).
void rotate(float* c, int64_t rows, int64_t d, const float* cos, const float* sin, int form) {
  const int64_t partner = form == ROTATE_HALF ? d / 2 : 1, stride = form == ROTATE_HALF ? 1 : 2;
  for (int64_t i = 0; i < rows; ++i) {
    float* x = c + i * d;
    const float* co = cos + i * d;
    const float* si = sin + i * d;
    for (int64_t n = 0; n < d / 2; ++n) {
      const int64_t j = n * stride, m = j + partner;
      const float a = x[j], b = x[m];
      x[j] = a * co[j] - b * si[j];
      x[m] = b * co[m] + a * si[m];
    }
  }
}

}  // namespace

extern "C" {

// mask: additive float32, strides (batch, head, query, key) with 0 on broadcast dims, or null.
// o_panels: o_down as per-head panels ([heads][ceil(rank_o / NR)][d][NR]), or null; then out is
// [batch, seq, rank_o] contiguous and is overwritten with the sum over heads. Otherwise out is
// [batch, heads, seq, d] with strides out_strides.
void fxpress_lowrank_attention(const float* pq, int64_t rq, const float* q_panels, const float* q_bias,
                               const float* pk, int64_t rk, const float* k_panels, const float* k_bias,
                               const float* pv, int64_t rv, const float* v_panels, const float* v_bias,
                               int64_t batch, int64_t seq, int64_t seq_k, int64_t heads, int64_t kv_heads, int64_t d,
                               const float* mask, const int64_t* mask_strides, int causal, float scale,
                               const float* cos, const float* sin, int64_t rotary_batch_stride, int rotary,
                               const float* q_norm, const float* k_norm, float norm_eps,
                               const float* o_panels, int64_t rank_o, float* out, const int64_t* out_strides,
                               int threads) {
  const Factor q{pq, rq, q_panels, q_bias}, k{pk, rk, k_panels, k_bias}, v{pv, rv, v_panels, v_bias};
  const int64_t group = heads / kv_heads, d_panels = (d + NR - 1) / NR, k_panels_n = (seq_k + NR - 1) / NR;
  std::vector<float> keys(seq_k * d), values(seq_k * d);
  std::vector<float> key_panels(k_panels_n * NR * d), value_panels(d_panels * NR * seq_k);
  if (o_panels) std::fill(out, out + batch * seq * rank_o, 0.f);
  const int64_t o_panels_n = (rank_o + NR - 1) / NR;
  // Blocks of queries: a multiple of the threads, of even size, so no thread waits long at the
  // barrier that closes each KV head.
  int64_t blocks = (seq + QB - 1) / QB;
  blocks = (blocks + threads - 1) / threads * threads;
  const int64_t qb = std::max<int64_t>(1, (seq + blocks - 1) / blocks);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> q_rows(qb * d), scores(qb * seq_k), context(qb * d);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t g = 0; g < kv_heads; ++g) {
#pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < seq_k; r0 += KB) {
          const int64_t rows = std::min(KB, seq_k - r0);
          rebuild(k, seq_k, b, r0, rows, g, d, keys.data() + r0 * d);
          if (k_norm) head_norm(keys.data() + r0 * d, rows, d, k_norm, norm_eps);
          if (rotary)
            rotate(keys.data() + r0 * d, rows, d, cos + b * rotary_batch_stride + r0 * d,
                   sin + b * rotary_batch_stride + r0 * d, rotary);
          rebuild(v, seq_k, b, r0, rows, g, d, values.data() + r0 * d);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < k_panels_n + d_panels; ++j) {
          if (j < k_panels_n) panels_of_rows(keys.data(), seq_k, d, d, 1, key_panels.data(), j);
          else panels_of_columns(values.data(), seq_k, d, d, 1, value_panels.data(), j - k_panels_n);
        }
        const Step score_step{key_panels.data(), nullptr, d, seq_k, NONE, WRITE, 0, 0};
        const Step context_step{value_panels.data(), nullptr, seq_k, d, NONE, WRITE, 0, 0};
#pragma omp for schedule(dynamic, 1)
        for (int64_t r0 = 0; r0 < seq; r0 += qb) {
          const int64_t rows = std::min(qb, seq - r0);
          for (int64_t h = g * group; h < (g + 1) * group; ++h) {
            rebuild(q, seq, b, r0, rows, h, d, q_rows.data());
            if (q_norm) head_norm(q_rows.data(), rows, d, q_norm, norm_eps);
            if (rotary)
              rotate(q_rows.data(), rows, d, cos + b * rotary_batch_stride + r0 * d,
                     sin + b * rotary_batch_stride + r0 * d, rotary);
            run_step(score_step, q_rows.data(), d, rows, scores.data(), seq_k, 0, k_panels_n);
            const float* m = mask ? mask + b * mask_strides[0] + h * mask_strides[1] + r0 * mask_strides[2] : nullptr;
            softmax_rows(scores.data(), rows, seq_k, seq_k, scale, m, mask_strides[2], mask_strides[3], causal, r0);
            run_step(context_step, scores.data(), seq_k, rows, context.data(), d, 0, d_panels);
            if (o_panels) {
              const Step o_step{o_panels + h * o_panels_n * d * NR, nullptr, d, rank_o, NONE, ADD, 0, 0};
              run_step(o_step, context.data(), d, rows, out + (b * seq + r0) * rank_o, rank_o, 0, o_panels_n);
            } else {
              for (int64_t i = 0; i < rows; ++i)
                for (int64_t c = 0; c < d; ++c)
                  out[b * out_strides[0] + h * out_strides[1] + (r0 + i) * out_strides[2] + c * out_strides[3]] =
                      context[i * d + c];
            }
          }
        }
      }
    }
  }
}

}  // extern "C"
