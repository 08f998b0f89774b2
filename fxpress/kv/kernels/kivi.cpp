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
// Values are packed along channels with one scale and min per (token, group of G channels).
// Every inner loop runs over tokens or channels without a reduction, so the compiler vectorises it.

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

// The store's float tensors as float32, the dtype fixed at compile time (no branch per element).
template <int DT>
inline float load(const void* p, int64_t i) {
  if constexpr (DT == F32) {
    return ((const float*)p)[i];
  } else if constexpr (DT == F16) {
    return half_to_float(((const uint16_t*)p)[i]);
  } else {
    uint32_t bits = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

struct Args {
  const float* q;
  const int32_t* k_codes;
  const void *k_scale, *k_min;
  const int32_t* v_codes;
  const void *v_scale, *v_min, *k_res, *v_res, *k_sink, *v_sink;
  const float *k_new, *v_new;
  int64_t batch, heads, gq, d, group;
  int bits;
  int64_t quantised, k_words, k_groups, v_tokens, waiting, res_cap, sunk, sink_cap, tokens_per_split;
  float* out;
  int threads;
};

struct Partial {  // an online softmax per query head of the group
  std::vector<float> m, l, acc;  // [gq], [gq], [gq][d]
  Partial(int64_t gq, int64_t d) : m(gq, -INFINITY), l(gq, 0.f), acc(gq * d, 0.f) {}
};

// Folds scores s[j][0..n) and a value-row loader into the partial: for each head j, the new max,
// rescaled sums, then p[t] * v[t] added for every token.
template <typename ValueRow>
void fold(Partial& part, int64_t gq, int64_t d, int64_t n, const float* s, int64_t s_stride, ValueRow value_row,
          std::vector<float>& p_buffer, std::vector<float>& v_buffer) {
  float* __restrict__ p = p_buffer.data();
  float* __restrict__ v = v_buffer.data();
  for (int64_t j = 0; j < gq; ++j) {
    const float* __restrict__ sj = s + j * s_stride;
    float top = part.m[j];
#pragma omp simd reduction(max : top)
    for (int64_t t = 0; t < n; ++t) top = std::max(top, sj[t]);
    const float correction = exp_nonpositive(part.m[j] - top);
    float* __restrict__ acc = part.acc.data() + j * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) acc[c] *= correction;
    float* __restrict__ pj = p + j * n;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) pj[t] = exp_nonpositive(sj[t] - top);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) sum += pj[t];
    part.m[j] = top;
    part.l[j] = part.l[j] * correction + sum;
  }
  for (int64_t t = 0; t < n; ++t) {
    value_row(t, v);
    for (int64_t j = 0; j < gq; ++j) {
      const float pj = p[j * n + t];
      float* __restrict__ acc = part.acc.data() + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) acc[c] += pj * v[c];
    }
  }
}

// One (sequence-head, split) item's tokens folded into its partial. GC: the group size when it is
// a compile-time constant (32, 64, 128: the inner loops unroll and stay in registers), else 0.
template <int DT, int GC>
void decode(const Args& a) {
  const int64_t group = GC ? GC : a.group, d = a.d, gq = a.gq;
  const int32_t per = 32 / a.bits, bits = a.bits;
  const uint32_t mask = (1u << a.bits) - 1;
  const int64_t splits = (a.quantised + a.tokens_per_split - 1) / a.tokens_per_split;
  const int64_t items_per_head = splits + 1;  // the last item of a head: its exact tokens
  const int64_t items = a.batch * a.heads * items_per_head;
  const int64_t sunk = a.sunk, waiting = a.waiting;
  std::vector<Partial> parts(items, Partial(gq, d));
#pragma omp parallel num_threads(a.threads)
  {
    const int64_t n_max = std::max(group, sunk + waiting + 1);  // tokens per fold: a group, or the exact ones
    std::vector<float> s(gq * n_max), p(gq * n_max), v(d), tile(d * group), qs(gq * d), base(gq), k_scale(d),
        k_min(d);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t bh = item / items_per_head, split = item % items_per_head;
      const float* qh = a.q + bh * gq * d;
      Partial& part = parts[item];
      if (split < splits) {
        const int64_t t0 = split * a.tokens_per_split, t1 = std::min(a.quantised, t0 + a.tokens_per_split);
        for (int64_t g0 = t0; g0 < t1; g0 += group) {
          const int64_t ko = (bh * a.k_groups + g0 / group) * d;
          for (int64_t c = 0; c < d; ++c) {  // the group's scales and mins, converted once
            k_scale[c] = load<DT>(a.k_scale, ko + c);
            k_min[c] = load<DT>(a.k_min, ko + c);
          }
          for (int64_t j = 0; j < gq; ++j) {
            float b0 = 0.f;
#pragma omp simd reduction(+ : b0)
            for (int64_t c = 0; c < d; ++c) {
              qs[j * d + c] = qh[j * d + c] * k_scale[c];
              b0 += qh[j * d + c] * k_min[c];
            }
            base[j] = b0;
          }
          // The group's key codes as floats, channel-major: tile[c][t].
          const int32_t* words = a.k_codes + (bh * a.k_words + g0 / per) * d;
          for (int64_t c = 0; c < d; ++c) {
            float* row = tile.data() + c * group;
            for (int64_t w = 0; w < group / per; ++w) {
              const uint32_t word = (uint32_t)words[w * d + c];
#pragma omp simd
              for (int32_t i = 0; i < per; ++i) row[w * per + i] = (float)((word >> (i * bits)) & mask);
            }
          }
          for (int64_t j = 0; j < gq; ++j) {
            float sj[GC ? GC : 1];
            float* acc = GC ? sj : s.data() + j * group;
            for (int64_t t = 0; t < group; ++t) acc[t] = base[j];
            for (int64_t c = 0; c < d; ++c) {
              const float w = qs[j * d + c];
              const float* __restrict__ row = tile.data() + c * group;
#pragma omp simd
              for (int64_t t = 0; t < group; ++t) acc[t] += w * row[t];
            }
            if (GC) std::memcpy(s.data() + j * group, acc, sizeof(float) * group);
          }
          auto value_row = [&](int64_t t, float* out_row) {
            const int64_t token = bh * a.v_tokens + g0 + t;
            const int32_t* vw = a.v_codes + token * (d / per);
            for (int64_t w = 0; w < d / per; ++w) {
              const int64_t vg = token * (d / group) + (w * per) / group;
              const float sc = load<DT>(a.v_scale, vg), lo = load<DT>(a.v_min, vg);
              const uint32_t word = (uint32_t)vw[w];
#pragma omp simd
              for (int32_t i = 0; i < per; ++i) out_row[w * per + i] = (float)((word >> (i * bits)) & mask) * sc + lo;
            }
          };
          fold(part, gq, d, group, s.data(), group, value_row, p, v);
        }
      } else {  // exact tokens: sink, residual window, the new token
        const int64_t n = sunk + waiting + 1;
        auto key_row = [&](int64_t t, float* out_row) {
          for (int64_t c = 0; c < d; ++c)
            out_row[c] = t < sunk ? load<DT>(a.k_sink, (bh * a.sink_cap + t) * d + c)
                       : t < sunk + waiting ? load<DT>(a.k_res, (bh * a.res_cap + t - sunk) * d + c)
                       : a.k_new[bh * d + c];
        };
        for (int64_t t = 0; t < n; ++t) {
          key_row(t, v.data());
          for (int64_t j = 0; j < gq; ++j) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < d; ++c) dot += qh[j * d + c] * v[c];
            s[j * n + t] = dot;
          }
        }
        auto value_row = [&](int64_t t, float* out_row) {
          for (int64_t c = 0; c < d; ++c)
            out_row[c] = t < sunk ? load<DT>(a.v_sink, (bh * a.sink_cap + t) * d + c)
                       : t < sunk + waiting ? load<DT>(a.v_res, (bh * a.res_cap + t - sunk) * d + c)
                       : a.v_new[bh * d + c];
        };
        fold(part, gq, d, n, s.data(), n, value_row, p, v);
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

template <int DT>
void decode_group(const Args& a) {
  switch (a.group) {
    case 32: return decode<DT, 32>(a);
    case 64: return decode<DT, 64>(a);
    case 128: return decode<DT, 128>(a);
    default: return decode<DT, 0>(a);
  }
}

}  // namespace

extern "C" {

// out[b, h * gq + j, :] (float32) for every sequence b, KV head h and query head j of its group.
// q: float32 [B, H * gq, d], already multiplied by the softmax scale. k_new, v_new: float32 [B, H, d].
// Store tensors (dtype: 0 float32, 1 float16, 2 bfloat16 for the float ones) at their allocated
// sizes: k_codes [B, H, k_words, d], k_scale/k_min [B, H, k_groups, d], v_codes [B, H, v_tokens, d/per],
// v_scale/v_min [B, H, v_tokens, d/G], k_res/v_res [B, H, res_cap, d], k_sink/v_sink [B, H, sink_cap, d].
void fxpress_kivi_decode(const float* q, const int32_t* k_codes, const void* k_scale, const void* k_min,
                         const int32_t* v_codes, const void* v_scale, const void* v_min, const void* k_res,
                         const void* v_res, const void* k_sink, const void* v_sink, const float* k_new,
                         const float* v_new, int dtype, int64_t batch, int64_t heads, int64_t gq, int64_t d,
                         int64_t group, int bits, int64_t quantised, int64_t k_words, int64_t k_groups,
                         int64_t v_tokens, int64_t waiting, int64_t res_cap, int64_t sunk, int64_t sink_cap,
                         int64_t tokens_per_split, float* out, int threads) {
  const Args a{q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_sink, v_sink, k_new, v_new,
               batch, heads, gq, d, group, bits, quantised, k_words, k_groups, v_tokens, waiting, res_cap, sunk,
               sink_cap, tokens_per_split, out, threads};
  if (dtype == F16) decode_group<F16>(a);
  else if (dtype == BF16) decode_group<BF16>(a);
  else decode_group<F32>(a);
}

}  // extern "C"
