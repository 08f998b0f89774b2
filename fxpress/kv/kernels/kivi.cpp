// KIVI decode attention on the CPU: one new query token per sequence over a KIVIStore
// (fxpress/kv/kivi.py) plus the new token, reading the packed codes in place.
//
// Work items: (sequence, KV head) x (a split of the quantised tokens, or the exact tokens: sink,
// residual window and the new token). Each item keeps, for the G query heads of its KV head, an
// online softmax (max, sum, weighted values); the items of a head are then merged.
//
// Keys are packed along tokens (word w of channel c holds tokens w*per .. w*per+per-1) with one
// scale and min per (group of G tokens, channel); a group's scores are
//   s[t] = sum_c (q_c * scale * kscale_c) * code[t, c] + sum_c q_c * scale * kmin_c,
// so the codes are turned into floats once per group (a [d][G] tile) and met by every query head.
// Values are packed along channels with one scale and min per (token, group of G channels); a
// block's value rows are dequantised once and met by every query head.
//
// Speed: every inner loop runs over tokens or channels without a reduction, so the compiler
// vectorises it; the two products (scores, weighted values) take 32 tokens or channels of two
// query heads at a time, eight accumulators in registers (enough to hide the FMA latency, each
// tile row loaded once for both heads); code widths are compile-time constants (constant shifts).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

using fxpress_math::exp_nonpositive;  // fxpress/native/fast_math.h
using fxpress_math::fmadd;

enum Dtype { F32 = 0, F16 = 1, BF16 = 2 };

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The store's float tensors as float32 (the dtype is fixed per call; scales are read once per
// group or token, so the branch is not in an inner loop).
inline float load(int dtype, const void* p, int64_t i) {
  if (dtype == F32) return ((const float*)p)[i];
  if (dtype == F16) return half_to_float(((const uint16_t*)p)[i]);
  uint32_t bits = (uint32_t)((const uint16_t*)p)[i] << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Args {
  const float* q;
  // ThinK: quantised keys hold `kd` of the `d` channels, met by the query's matching channels
  // (q_keys [B, H * gq, kd], scaled like q); without pruning q_keys is q and kd is d.
  const float* q_keys;
  int64_t kd;
  const int32_t* k_codes;
  const void *k_scale, *k_min;
  const int32_t* v_codes;
  const void *v_scale, *v_min, *k_res, *v_res, *k_sink, *v_sink;
  const float *k_new, *v_new;
  int dtype;
  int64_t batch, heads, gq, d, group;
  int bits;
  int64_t quantised, k_words, k_groups, v_tokens, waiting, res_cap, sunk, sink_cap, tokens_per_split;
  // Pre-RoPE keys (KIVI(rope_theta=...)): the quantised keys were turned back by their rotary
  // angles before quantisation; cos/sin [d/2][rope_stride] (position-minor) turn them forward
  // again as they are read. Null when the keys are stored as they came.
  const float *rope_cos, *rope_sin;
  int64_t rope_stride;
  float* out;
  int threads;
};

struct Partial {  // an online softmax per query head of the group
  std::vector<float> m, l, acc;  // [gq], [gq], [gq][d]
  Partial(int64_t gq, int64_t d) : m(gq, -INFINITY), l(gq, 0.f), acc(gq * d, 0.f) {}
};

constexpr int64_t LANES = 32;  // tokens or channels per register tile: four AVX registers

// The 32-bit word's codes as floats, lowest bits first.
template <int BITS>
inline void unpack(uint32_t word, float* out) {
  constexpr int PER = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
#pragma omp simd
  for (int i = 0; i < PER; ++i) out[i] = (float)((word >> (i * BITS)) & MASK);
}

// Both products of the kernel have one shape: out[l] += sum_k x[k] * m[k * stride + l] for the 32
// lanes l of a row-major tile. Scores: k a channel, x a query head's scaled query, m the key tile
// (lanes are tokens). Weighted values: k a token, x a head's softmax weights, m the value rows
// (lanes are channels).

// For two weight vectors x0, x1 meeting the same tile: each tile row is loaded once for both.
inline void lanes_pair(const float* x0, const float* x1, const float* m, int64_t stride, int64_t n, float* out0,
                       float* out1) {
  float a0[LANES], a1[LANES];
  for (int64_t l = 0; l < LANES; ++l) a0[l] = out0[l], a1[l] = out1[l];
  for (int64_t k = 0; k < n; ++k) {
    const float w0 = x0[k], w1 = x1[k];
    const float* __restrict__ row = m + k * stride;
#pragma omp simd
    for (int64_t l = 0; l < LANES; ++l) {
      a0[l] = fmadd(w0, row[l], a0[l]);
      a1[l] = fmadd(w1, row[l], a1[l]);
    }
  }
  for (int64_t l = 0; l < LANES; ++l) out0[l] = a0[l], out1[l] = a1[l];
}

// For one weight vector: even and odd k in separate accumulators (eight registers again).
inline void lanes_single(const float* x, const float* m, int64_t stride, int64_t n, float* out) {
  float a0[LANES], a1[LANES];
  for (int64_t l = 0; l < LANES; ++l) a0[l] = out[l], a1[l] = 0.f;
  int64_t k = 0;
  for (; k + 1 < n; k += 2) {
    const float w0 = x[k], w1 = x[k + 1];
    const float* __restrict__ row0 = m + k * stride;
    const float* __restrict__ row1 = row0 + stride;
#pragma omp simd
    for (int64_t l = 0; l < LANES; ++l) {
      a0[l] = fmadd(w0, row0[l], a0[l]);
      a1[l] = fmadd(w1, row1[l], a1[l]);
    }
  }
  if (k < n)
    for (int64_t l = 0; l < LANES; ++l) a0[l] = fmadd(x[k], m[k * stride + l], a0[l]);
  for (int64_t l = 0; l < LANES; ++l) out[l] = a0[l] + a1[l];
}

// Folds the scores s[j][0..n) of a block into the partial's maxima and sums, writing the block's
// weights p[j][t] = exp(s - max); each head's values are rescaled once per block, not per token.
inline void fold_scores(Partial& part, int64_t gq, int64_t d, int64_t n, const float* s, int64_t stride, float* p) {
  for (int64_t j = 0; j < gq; ++j) {
    const float* __restrict__ sj = s + j * stride;
    float top = part.m[j];
#pragma omp simd reduction(max : top)
    for (int64_t t = 0; t < n; ++t) top = std::max(top, sj[t]);
    if (top != part.m[j]) {
      const float correction = exp_nonpositive(part.m[j] - top);
      float* __restrict__ acc = part.acc.data() + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) acc[c] *= correction;
      part.l[j] *= correction;
      part.m[j] = top;
    }
    float* __restrict__ pj = p + j * stride;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      pj[t] = exp_nonpositive(sj[t] - top);
      sum += pj[t];
    }
    part.l[j] += sum;
  }
}

// Adds the block's weighted value rows (`d` long) to every head's accumulator: 32 channels of two
// heads at a time; channels past the last multiple of 32 one by one.
inline void accumulate_values(Partial& part, int64_t gq, int64_t d, int64_t n, const float* p, int64_t stride,
                              const float* rows) {
  const int64_t wide = d / LANES * LANES;
  for (int64_t j = 0; j < gq; j += 2) {
    float* acc = part.acc.data() + j * d;
    const float* pj = p + j * stride;
    for (int64_t c = 0; c < wide; c += LANES) {
      if (j + 1 < gq) lanes_pair(pj, pj + stride, rows + c, d, n, acc + c, acc + d + c);
      else lanes_single(pj, rows + c, d, n, acc + c);
    }
  }
  for (int64_t j = 0; j < gq; ++j)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = wide; c < d; ++c) part.acc[j * d + c] = fmadd(p[j * stride + t], rows[t * d + c], part.acc[j * d + c]);
}

// Every head's scores for the block's tokens b0 .. b0 + n from a channel-major tile (rows `stride`
// long): 32 tokens of two heads at a time, tokens past the last multiple of 32 one by one.
inline void block_scores(int64_t gq, int64_t d, int64_t n, const float* w, const float* base, const float* tile,
                         int64_t stride, float* s, int64_t s_stride) {
  const int64_t wide = n / LANES * LANES;
  for (int64_t j = 0; j < gq; ++j)
    for (int64_t t = 0; t < wide; ++t) s[j * s_stride + t] = base[j];
  for (int64_t j = 0; j < gq; j += 2)
    for (int64_t t = 0; t < wide; t += LANES) {
      float* sj = s + j * s_stride + t;
      if (j + 1 < gq) lanes_pair(w + j * d, w + (j + 1) * d, tile + t, stride, d, sj, sj + s_stride);
      else lanes_single(w + j * d, tile + t, stride, d, sj);
    }
  for (int64_t j = 0; j < gq; ++j)
    for (int64_t t = wide; t < n; ++t) {
      float dot = base[j];
      for (int64_t c = 0; c < d; ++c) dot = fmadd(w[j * d + c], tile[c * stride + t], dot);
      s[j * s_stride + t] = dot;
    }
}

// A channel-major tile of `group` pre-RoPE key codes (tile[c][t]) dequantised and turned to the
// positions p0 .. p0 + group - 1: channel c < d/2 paired with c + d/2, as Llama's rotate_half.
// The angles of p0 + t come from those of p0 and of t (cos(a+b) = cos a cos b - sin a sin b): the
// table is read at one position per group plus its first `group` positions, which stay in L1,
// instead of `group` positions per group (16x the bytes of 2-bit codes).
inline void rope_tile(const Args& a, int64_t d, int64_t group, int64_t p0, const float* scale, const float* lo,
                      float* tile) {
  for (int64_t c = 0; c < d; ++c) {
    float* __restrict__ row = tile + c * group;
    const float sc = scale[c], mn = lo[c];
#pragma omp simd
    for (int64_t t = 0; t < group; ++t) row[t] = fmadd(row[t], sc, mn);
  }
  const int64_t half = d / 2;
  for (int64_t c = 0; c < half; ++c) {
    const float* __restrict__ cs = a.rope_cos + c * a.rope_stride;  // positions 0 .. group - 1
    const float* __restrict__ sn = a.rope_sin + c * a.rope_stride;
    const float cb = cs[p0], sb = sn[p0];
    float* __restrict__ x1 = tile + c * group;
    float* __restrict__ x2 = tile + (c + half) * group;
#pragma omp simd
    for (int64_t t = 0; t < group; ++t) {
      const float cos_t = cb * cs[t] - sb * sn[t], sin_t = fmadd(sb, cs[t], cb * sn[t]);
      const float u = x1[t], w = x2[t];
      x1[t] = u * cos_t - w * sin_t;
      x2[t] = fmadd(u, sin_t, w * cos_t);
    }
  }
}

// Tokens per block: scores for a block are computed group by group, then folded at once.
constexpr int64_t BLOCK_TOKENS = 256;

// One (sequence-head, split) item's tokens folded into its partial. BITS: the code width; GC, DC:
// the group size (32, the default) and head dim (64, 128) when they are compile-time constants
// (the loops unroll; about 10 % faster), else 0. Each instance adds about half a second to the
// library's one build.
template <int BITS, int GC, int DC>
void decode(const Args& a) {
  constexpr int32_t PER = 32 / BITS;
  const int64_t group = GC ? GC : a.group, d = DC ? DC : a.d, gq = a.gq;
  const int64_t kd = DC ? DC : a.kd;  // decode_dim sends pruned keys (kd < d) to DC = 0
  const int dt = a.dtype;
  const int64_t splits = (a.quantised + a.tokens_per_split - 1) / a.tokens_per_split;
  const int64_t items_per_head = splits + 1;  // the last item of a head: its exact tokens
  const int64_t items = a.batch * a.heads * items_per_head;
  const int64_t sunk = a.sunk, waiting = a.waiting;
  const int64_t block = std::max<int64_t>(1, BLOCK_TOKENS / group) * group;
  std::vector<Partial> parts(items, Partial(gq, d));
#pragma omp parallel num_threads(a.threads)
  {
    const int64_t n_max = std::max(block, sunk + waiting + 1);  // tokens per fold: a block, or the exact ones
    std::vector<float> s(gq * n_max), p(gq * n_max), rows(n_max * d), tile(d * group), qs(gq * d), base(gq),
        k_scale(kd), k_min(kd);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t bh = item / items_per_head, split = item % items_per_head;
      const float* qh = a.q + bh * gq * d;
      const float* qk = a.q_keys + bh * gq * kd;
      Partial& part = parts[item];
      if (split < splits) {
        const int64_t t0 = split * a.tokens_per_split, t1 = std::min(a.quantised, t0 + a.tokens_per_split);
        for (int64_t b0 = t0; b0 < t1; b0 += block) {
          const int64_t n = std::min(block, t1 - b0);
          for (int64_t g0 = b0; g0 < b0 + n; g0 += group) {
            const int64_t ko = (bh * a.k_groups + g0 / group) * kd;
            for (int64_t c = 0; c < kd; ++c) {  // the group's scales and mins, converted once
              k_scale[c] = load(dt, a.k_scale, ko + c);
              k_min[c] = load(dt, a.k_min, ko + c);
            }
            // The group's key codes as floats, channel-major: tile[c][t].
            const int32_t* words = a.k_codes + (bh * a.k_words + g0 / PER) * kd;
            for (int64_t c = 0; c < kd; ++c)
              for (int64_t w = 0; w < group / PER; ++w) unpack<BITS>((uint32_t)words[w * kd + c], tile.data() + c * group + w * PER);
            if (a.rope_cos) {  // pre-RoPE keys: dequantised and turned to their positions first
              rope_tile(a, d, group, sunk + g0, k_scale.data(), k_min.data(), tile.data());
              for (int64_t j = 0; j < gq; ++j) {
                for (int64_t c = 0; c < d; ++c) qs[j * d + c] = qh[j * d + c];
                base[j] = 0.f;
              }
            } else {
              for (int64_t j = 0; j < gq; ++j) {
                float b = 0.f;
#pragma omp simd reduction(+ : b)
                for (int64_t c = 0; c < kd; ++c) {
                  qs[j * kd + c] = qk[j * kd + c] * k_scale[c];
                  b += qk[j * kd + c] * k_min[c];
                }
                base[j] = b;
              }
            }
            block_scores(gq, kd, group, qs.data(), base.data(), tile.data(), group, s.data() + (g0 - b0), block);
            // The group's values, dequantised token by token: rows[t][c].
            for (int64_t t = 0; t < group; ++t) {
              const int64_t token = bh * a.v_tokens + g0 + t;
              const int32_t* vw = a.v_codes + token * (d / PER);
              float* row = rows.data() + (g0 - b0 + t) * d;
              for (int64_t w = 0; w < d / PER; ++w) unpack<BITS>((uint32_t)vw[w], row + w * PER);
              for (int64_t c0 = 0; c0 < d; c0 += group) {
                const int64_t vg = token * (d / group) + c0 / group;
                const float sc = load(dt, a.v_scale, vg), lo = load(dt, a.v_min, vg);
#pragma omp simd
                for (int64_t c = c0; c < c0 + group; ++c) row[c] = fmadd(row[c], sc, lo);
              }
            }
          }
          fold_scores(part, gq, d, n, s.data(), block, p.data());
          accumulate_values(part, gq, d, n, p.data(), block, rows.data());
        }
      } else {  // exact tokens: sink, residual window, the new token
        const int64_t n = sunk + waiting + 1;
        auto row_of = [&](const void* sink, const void* res, const float* fresh, int64_t t, float* out_row) {
          for (int64_t c = 0; c < d; ++c)
            out_row[c] = t < sunk ? load(dt, sink, (bh * a.sink_cap + t) * d + c)
                       : t < sunk + waiting ? load(dt, res, (bh * a.res_cap + t - sunk) * d + c)
                       : fresh[bh * d + c];
        };
        for (int64_t t = 0; t < n; ++t) {
          float* key = rows.data() + t * d;
          row_of(a.k_sink, a.k_res, a.k_new, t, key);
          for (int64_t j = 0; j < gq; ++j) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < d; ++c) dot += qh[j * d + c] * key[c];
            s[j * n + t] = dot;
          }
        }
        for (int64_t t = 0; t < n; ++t) row_of(a.v_sink, a.v_res, a.v_new, t, rows.data() + t * d);
        fold_scores(part, gq, d, n, s.data(), n, p.data());
        accumulate_values(part, gq, d, n, p.data(), n, rows.data());
      }
    }
  }
  // Merge each head's items (an item with no tokens has max -inf and weight 0).
  for (int64_t bh = 0; bh < a.batch * a.heads; ++bh)
    for (int64_t j = 0; j < gq; ++j) {
      float top = -INFINITY;
      for (int64_t k = 0; k < items_per_head; ++k) top = std::max(top, parts[bh * items_per_head + k].m[j]);
      float total = 0.f;
      float* o = a.out + (bh * gq + j) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = 0.f;
      for (int64_t k = 0; k < items_per_head; ++k) {
        const Partial& part = parts[bh * items_per_head + k];
        if (part.m[j] == -INFINITY) continue;
        const float w = std::exp(part.m[j] - top);
        total += part.l[j] * w;
        for (int64_t c = 0; c < d; ++c) o[c] += part.acc[j * d + c] * w;
      }
      for (int64_t c = 0; c < d; ++c) o[c] /= total;
    }
}

template <int BITS, int GC>
void decode_dim(const Args& a) {
  if (a.kd != a.d) return decode<BITS, GC, 0>(a);  // ThinK-pruned keys: run-time widths
  switch (a.d) {
    case 64: return decode<BITS, GC, 64>(a);
    case 128: return decode<BITS, GC, 128>(a);
    default: return decode<BITS, GC, 0>(a);
  }
}

template <int BITS>
void decode_group(const Args& a) {
  switch (a.group) {
    case 32: return decode_dim<BITS, 32>(a);
    default: return decode_dim<BITS, 0>(a);
  }
}

}  // namespace

extern "C" {

// out[b, h * gq + j, :] (float32) for every sequence b, KV head h and query head j of its group.
// q: float32 [B, H * gq, d], already multiplied by the softmax scale. k_new, v_new: float32 [B, H, d].
// Store tensors (dtype: 0 float32, 1 float16, 2 bfloat16 for the float ones) at their allocated
// sizes: k_codes [B, H, k_words, d], k_scale/k_min [B, H, k_groups, d], v_codes [B, H, v_tokens, d/per],
// v_scale/v_min [B, H, v_tokens, d/G], k_res/v_res [B, H, res_cap, d], k_sink/v_sink [B, H, sink_cap, d].
// With ThinK-pruned keys the quantised ones are `kd` channels wide (k_codes [B, H, k_words, kd],
// k_scale/k_min [B, H, k_groups, kd]) and q_keys [B, H * gq, kd] holds the query's kept channels.
// rope_cos, rope_sin: null, or float32 [d/2, rope_stride] tables for pre-RoPE keys (see Args).
void fxpress_kivi_decode(const float* q, const float* q_keys, int64_t kd, const int32_t* k_codes, const void* k_scale, const void* k_min,
                         const int32_t* v_codes, const void* v_scale, const void* v_min, const void* k_res,
                         const void* v_res, const void* k_sink, const void* v_sink, const float* k_new,
                         const float* v_new, int dtype, int64_t batch, int64_t heads, int64_t gq, int64_t d,
                         int64_t group, int bits, int64_t quantised, int64_t k_words, int64_t k_groups,
                         int64_t v_tokens, int64_t waiting, int64_t res_cap, int64_t sunk, int64_t sink_cap,
                         int64_t tokens_per_split, const float* rope_cos, const float* rope_sin,
                         int64_t rope_stride, float* out, int threads) {
  const Args a{q, q_keys, kd, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_sink, v_sink, k_new, v_new,
               dtype, batch, heads, gq, d, group, bits, quantised, k_words, k_groups, v_tokens, waiting, res_cap, sunk,
               sink_cap, tokens_per_split, rope_cos, rope_sin, rope_stride, out, threads};
  if (bits == 2) decode_group<2>(a);
  else if (bits == 4) decode_group<4>(a);
  else decode_group<8>(a);
}

}  // extern "C"
