// SDPA on the CPU for the cpp target: softmax(Q . K^T * scale + mask) . V over strided q, k, v
// [batch, heads, seq, d], with panel products (fxpress/native/panel_gemm.h) for both products.
//
// ATen's flash kernel for the CPU runs short sequences (an encoder's 128 tokens, 32-wide heads)
// far from the FMA units' pace. Here each unit of work is one sequence, one KV head and a chunk
// of queries: it lays out that head's keys and values as panels once (reading them through their
// strides, so the Q/K/V projections' outputs are read where they lie, with no copy), then for each
// block of QB queries of each query head of the group takes the scores, their softmax and the
// context, written straight into out through its strides. The units go to the threads
// dynamically; sequences and heads give enough of them for an encoder batch, chunks of queries
// for one long sequence.
//
// Padding: a mask's hidden tail (keys whose entries are all -inf for a block's queries) adds
// exp(-inf) = 0 to each softmax, so the keys past the last one a block lets through are neither
// laid out nor scored. With a mask shared by the heads (an encoder's padding mask), that bound is
// found once per sequence and block. Fully masked rows give 0, as ATen's kernel does.

#include <omp.h>

namespace {

using namespace fxpress_gemm;
using namespace fxpress_attention;

constexpr int64_t QB = 48;  // queries per block: four of the AVX-512 micro-kernel's row blocks

struct Strided {  // a [batch, heads, seq, d] operand
  const float* data;
  const int64_t* s;
  const float* at(int64_t b, int64_t h, int64_t t) const { return data + b * s[0] + h * s[1] + t * s[2]; }
};

}  // namespace

extern "C" {

// q [batch, heads, seq, d], k [batch, kv_heads, seq_k, d], v [batch, kv_heads, seq_k, dv] and out
// [batch, heads, seq, dv], each with its four strides; heads is a multiple of kv_heads (query head
// h reads KV head h / (heads / kv_heads)). mask: additive float32 with strides (batch, head, query,
// key), 0 on broadcast dims, or null.
void fxpress_dense_attention(const float* q, const int64_t* q_strides, const float* k, const int64_t* k_strides,
                             const float* v, const int64_t* v_strides, int64_t batch, int64_t heads,
                             int64_t kv_heads, int64_t seq, int64_t seq_k, int64_t d, int64_t dv, const float* mask,
                             const int64_t* mask_strides, int causal, float scale, float* out,
                             const int64_t* out_strides, int threads) {
  const Strided Q{q, q_strides}, K{k, k_strides}, V{v, v_strides};
  const int64_t group = heads / kv_heads, pairs = batch * kv_heads;
  // Enough units that the threads end together (eight per thread when the pairs allow: causal
  // chunks differ in work), each chunk at least one block of queries.
  const int64_t wanted = std::max<int64_t>(1, (8 * threads + pairs - 1) / pairs);
  const int64_t chunks = std::min<int64_t>(wanted, (seq + QB - 1) / QB);
  const int64_t chunk = ((seq + chunks - 1) / chunks + QB - 1) / QB * QB;  // whole blocks
  const int64_t d_panels = (dv + NR - 1) / NR;
  auto mask_at = [&](int64_t b, int64_t h, int64_t r0) -> const float* {
    return mask ? mask + b * mask_strides[0] + h * mask_strides[1] + r0 * mask_strides[2] : nullptr;
  };
  // Blocks of QB queries from each chunk's start; chunks are whole blocks, so block r0 / QB.
  const int64_t blocks = (seq + QB - 1) / QB;
  std::vector<int64_t> shared_bounds;
  if (mask && mask_strides[1] == 0 && heads > 1) {
    shared_bounds.resize(batch * blocks);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < batch * blocks; ++i) {
      const int64_t b = i / blocks, r0 = i % blocks * QB;
      shared_bounds[i] = unmasked_keys(mask_at(b, 0, r0), std::min(QB, seq - r0), seq_k, mask_strides[2], mask_strides[3]);
    }
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> key_panels, value_panels, scores, q_rows, context;
    std::vector<int64_t> bounds;
    float inv_sums[QB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < pairs * chunks; ++unit) {
      const int64_t b = unit / (kv_heads * chunks), g = unit / chunks % kv_heads, c0 = unit % chunks * chunk;
      const int64_t c1 = std::min(seq, c0 + chunk);
      if (c0 >= c1) continue;
      // Per block of queries and head of the group, the keys it needs: those its queries see
      // (causal), less a padding mask's hidden tail. Only the keys some block needs are laid out.
      bounds.clear();
      int64_t laid = 0;
      for (int64_t r0 = c0; r0 < c1; r0 += QB) {
        const int64_t rows = std::min(QB, c1 - r0), seen = causal ? std::min(seq_k, r0 + rows) : seq_k;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          // a mask broadcast over heads: every head's bound is head 0's, found once per sequence
          const int64_t* shared = shared_bounds.empty() ? nullptr : &shared_bounds[b * blocks + r0 / QB];
          bounds.push_back(shared ? std::min(*shared, seen)
                                  : unmasked_keys(mask_at(b, h, r0), rows, seen, mask_strides[2], mask_strides[3]));
          laid = std::max(laid, bounds.back());
        }
      }
      const int64_t k_panels = (laid + NR - 1) / NR, ld = (laid + 15) / 16 * 16;  // score rows: whole vectors
      key_panels.resize(k_panels * NR * d);
      value_panels.resize(d_panels * NR * std::max<int64_t>(laid, 1));
      for (int64_t j = 0; j < k_panels; ++j)
        panels_of_rows(K.at(b, g, 0), laid, d, k_strides[2], k_strides[3], key_panels.data(), j);
      for (int64_t j = 0; j < d_panels; ++j)
        panels_of_columns(V.at(b, g, 0), laid, dv, v_strides[2], v_strides[3], value_panels.data(), j);
      scores.resize(QB * std::max<int64_t>(ld, 16));
      const int64_t* bound = bounds.data();
      for (int64_t r0 = c0; r0 < c1; r0 += QB) {
        const int64_t rows = std::min(QB, c1 - r0);
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const float* m = mask_at(b, h, r0);
          const int64_t keys = *bound++;
          const float* a = Q.at(b, h, r0);
          int64_t lda = q_strides[2];
          if (q_strides[3] != 1) {  // rows of Q gathered into unit stride
            q_rows.resize(rows * d);
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t c = 0; c < d; ++c) q_rows[i * d + c] = a[i * q_strides[2] + c * q_strides[3]];
            a = q_rows.data(), lda = d;
          }
          product_into(key_panels.data(), d * NR, d, keys, a, lda, rows, scores.data(), ld, nullptr);
          // rows left unnormalised: their 1 / sum scales the context as it is stored
          softmax_rows(scores.data(), rows, ld, keys, scale, m, mask_strides[2], mask_strides[3], causal, r0,
                       inv_sums);
          float* o = out + b * out_strides[0] + h * out_strides[1] + r0 * out_strides[2];
          if (out_strides[3] == 1) {
            product_into(value_panels.data(), laid * NR, keys, dv, scores.data(), ld, rows, o, out_strides[2],
                         inv_sums);
          } else {  // through a unit-stride block
            context.resize(rows * dv);
            product_into(value_panels.data(), laid * NR, keys, dv, scores.data(), ld, rows, context.data(), dv,
                         inv_sums);
            for (int64_t i = 0; i < rows; ++i)
              for (int64_t c = 0; c < dv; ++c) o[i * out_strides[2] + c * out_strides[3]] = context[i * dv + c];
          }
        }
      }
    }
  }
}

}  // extern "C"
