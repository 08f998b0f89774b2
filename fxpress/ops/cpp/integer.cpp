// Integer-only ops (I-BERT / I-ViT) on the CPU, bit-exact with fxpress.integer.arith.
//
// Each op's per-row constants are computed here from the row's float scale with the float64
// operations of fxpress.integer.constants, in the same order (built with -ffp-contract=off, so
// each is exactly rounded as in torch); the rest is integer arithmetic. Integer divisions by a
// per-row or per-element divisor run as a float64 division of the two integers, truncated: for
// 0 <= a < 2**31 and 0 < b < 2**31 that is exactly floor(a / b) (a quotient just below an integer
// k lies at least 1/a below it, far more than float64's rounding error), and it vectorises.
// Functions that derive constants return 0, or 1 when a scale is not finite and positive, or 2
// when a constant overflows int32 (the reference raises for both; so does the launcher).

// On AVX-512 cores GCC still picks 256-bit vectors by default; these loops are integer arithmetic
// with no frequency-heavy instructions, and full-width vectors made softmax 1.1x and the per-row GELU
// tables 1.2x faster on a 2-core Xeon (Sapphire Rapids). Elsewhere (no AVX-512) this changes nothing.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int32_t INT32_MAX_ = 2147483647;
constexpr int MASKED = -128;

// value * 2**amount, floored; >> saturates at 31. Both shifts are computed (each by an amount in
// [0, 31], so both are defined) and one is chosen: a choice without a branch, which vectorises.
inline int32_t shift(int32_t value, int32_t amount) {
  const int32_t left = (int32_t)((uint32_t)value << std::min(std::max(amount, 0), 31));
  const int32_t right = value >> std::min(std::max(-amount, 0), 31);
  return amount >= 0 ? left : right;
}

inline int32_t div_floor(int32_t a, int32_t b) {  // 0 <= a, 0 < b
  return (int32_t)((double)a / (double)b);
}

// The same for 0 <= a < 2**53 (an int64 division takes tens of cycles more).
inline int64_t div_floor64(int64_t a, int64_t b) { return (int64_t)((double)a / (double)b); }

inline int exponent(double x) {  // frexp's: x in [2**(e-1), 2**e)
  int e;
  std::frexp(x, &e);
  return e;
}

bool fits(double v) { return std::fabs(v) < 2147483648.0; }

// constants._normalise: (pre, s * 2**pre) with s * 2**pre in [2**-14, 2**-13), pre >= -20.
inline int normalise(double s, double* scaled) {
  int pre = std::max(-13 - exponent(s), -20);
  *scaled = s * std::ldexp(1.0, pre);
  return pre;
}

struct ExpConstants {
  int32_t pre, x0, b, c, norm, low;
  float inv_x0;  // 1 / -x0, for the quotient's first estimate
  int32_t pre_left, pre_right;  // shift(d, -pre) = (d << pre_left) >> pre_right: see with_shifts
};

// The constants with shift(., -pre) split into a left and a right shift by amounts in [0, 31].
inline ExpConstants with_shifts(ExpConstants k) {
  k.pre_left = std::min(std::max(-k.pre, 0), 31);
  k.pre_right = std::min(std::max(k.pre, 0), 31);
  return k;
}

// q = floor(a / b) and q * b, for 0 <= a, 0 < b, a / b <= 2**20 (shift_exp's quotients are at most
// max_q <= 30): a float32 estimate, then one correction each way (its error is far below 1). The
// product is kept through the corrections: one 32-bit vector multiply (two uops on x86) in all.
struct Quotient {
  int32_t q, qb;
};
inline Quotient small_quotient(int32_t a, int32_t b, float inv_b) {
  int32_t q = (int32_t)((float)a * inv_b), qb = q * b;
  const bool over = qb > a;
  q -= over;
  qb -= over ? b : 0;
  const bool under = qb + b <= a;
  q += under;
  qb += under ? b : 0;
  return {q, qb};
}

// constants.softmax_constants for one scale (coef: constants.COEFFICIENTS).
int softmax_constants(double s, const double* coef, bool poly, int exp_bits, int max_q, ExpConstants* k) {
  if (!(std::isfinite(s) && s > 0)) return 1;
  double sp, x0, b = 0, c = 0, top;
  int pre = normalise(s, &sp);
  if (poly) {
    x0 = std::floor(coef[0] / sp);
    b = std::floor(coef[1] / sp);
    c = std::floor(coef[2] / (sp * sp));
    top = c;
  } else {
    x0 = std::floor(-1.0 / sp);
    top = -2 * x0;
  }
  double low = max_q * x0;
  if (!(fits(x0) && fits(b) && fits(c) && fits(low))) return 2;
  *k = with_shifts({pre, (int32_t)x0, (int32_t)b, (int32_t)c, exp_bits - exponent(top), (int32_t)low,
                    (float)(-1.0 / x0), 0, 0});
  return 0;
}

// arith.shift_exp: exp(d) for d <= 0 at the row's scale, normalised. The method is a template
// argument so the loops calling it have no choice of method inside and vectorise.
template <bool POLY>
inline int32_t shift_exp(int32_t d, const ExpConstants& k) {
  // shift(d, -pre) with the row's pre split into its two shifts once (one of them is 0), so the
  // loop does two shifts where shift() does two shifts, four clamps and a choice.
  d = (int32_t)((uint32_t)d << k.pre_left) >> k.pre_right;
  if (!POLY) d = d + (d >> 1) - (d >> 4);
  d = std::max(d, k.low);
  const Quotient quotient = small_quotient(-d, -k.x0, k.inv_x0);
  const int32_t q = quotient.q, r = d + quotient.qb;  // d - x0 q
  int32_t z = POLY ? (r + k.b) * r + k.c : r - 2 * k.x0;
  return shift(z, k.norm - q);
}

// One softmax row's exp values (0 at masked codes unless the whole row is masked) and their sum,
// which fits int32: the row is shorter than 2**(31 - exp_bits) (arith.check_row_length).
template <bool POLY>
int32_t softmax_exps(const int8_t* v, int64_t width, const ExpConstants& k, int32_t* e) {
  int32_t m = MASKED;
  for (int64_t i = 0; i < width; ++i) m = std::max(m, (int32_t)v[i]);
  int32_t total = 0;
  if (m == MASKED) {  // every code masked: the row is uniform, as in the reference
    for (int64_t i = 0; i < width; ++i) total += e[i] = shift_exp<POLY>((int32_t)v[i] - m, k);
    return total;
  }
  for (int64_t i = 0; i < width; ++i) {
    const int32_t x = shift_exp<POLY>((int32_t)v[i] - m, k);
    e[i] = (int32_t)v[i] != MASKED ? x : 0;
    total += e[i];
  }
  return total;
}

// arith.isqrt: Newton's iteration from 2**16, whose fixed point is max(1, floor(sqrt(v))) for
// v < 2**31; there it is computed from the correctly rounded float64 square root, corrected by one
// either way. Past that domain, the iteration itself (a float64 division is exact: v < 2**53).
inline int64_t isqrt(int64_t v, int newton_steps) {
  if (v < (int64_t(1) << 31)) {
    int64_t r = (int64_t)std::sqrt((double)v);
    r -= (r * r > v);
    r += ((r + 1) * (r + 1) <= v);
    return std::max<int64_t>(r, 1);
  }
  int64_t k = 1 << 16;
  for (int step = 0; step < newton_steps; ++step)
    k = std::min(k, std::max((k + (int64_t)((double)v / (double)k)) >> 1, (int64_t)1));
  return k;
}

// GELU of all 256 int8 codes at one row scale, as int32 codes at constants.gelu_output_scale:
// I-BERT's i-GELU (poly) or I-ViT's ShiftGELU. Returns a status as the constants do.
int gelu_table(double s, const double* coef, int poly, int exp_bits, int max_q, int erf_bits, int sigmoid_bits,
               int32_t* table) {
  if (!(std::isfinite(s) && s > 0)) return 1;
  if (poly) {
    double se;
    const int32_t pre = normalise(s / coef[3], &se);
    const double b = std::floor(coef[4] / se), c = std::floor(coef[5] / (se * se));
    if (!(fits(b) && fits(c))) return 2;
    const int32_t rs = std::max(exponent(-c) - erf_bits, 0);
    const double one = std::floor(1.0 / (se * se * coef[6] * std::ldexp(1.0, rs)));
    if (!fits(one)) return 2;
    const int32_t bi = (int32_t)b, ci = (int32_t)c, onei = (int32_t)one;
    for (int32_t v = -128; v < 128; ++v) {
      int32_t x = shift(v, -pre);
      int32_t a = std::min(std::abs(x), -bi);
      int32_t sign = (x > 0) - (x < 0);
      int32_t erf = (sign * ((a + bi) * (a + bi) + ci)) >> rs;
      table[v + 128] = (int32_t)(-(int64_t)v * (erf + onei));
    }
  } else {
    double sg;
    const int32_t pre = normalise(s * coef[7], &sg);
    const double x0 = std::floor(-1.0 / sg), low = max_q * x0;
    if (!(fits(x0) && fits(low))) return 2;
    const ExpConstants k = with_shifts({pre, (int32_t)x0, 0, 0, exp_bits - exponent(-2 * x0), (int32_t)low,
                                        (float)(-1.0 / x0), 0, 0});
    // The sigmoid of v reads exp(min(v, 0)) and exp(-max(v, 0)): one of them is exp(0), the other
    // exp(-|v|), and their sum (hence the quotient) is the same for v and -v. So the 129 exps and
    // quotients are made once each, not 512 exps and 256 quotients.
    int32_t e[129], factor[129];
    for (int32_t a = 0; a <= 128; ++a) e[a] = shift_exp<false>(-a, k);
    for (int32_t a = 0; a <= 128; ++a) factor[a] = div_floor(INT32_MAX_, e[a] + e[0]);
    for (int32_t v = -128; v < 128; ++v) {
      const int32_t a = v < 0 ? -v : v, e1 = v < 0 ? e[a] : e[0];
      table[v + 128] = (int32_t)((int64_t)v * (((int64_t)e1 * factor[a]) >> (31 - sigmoid_bits)));
    }
  }
  return 0;
}

// max |v[i]| over a row (masked positions, v <= mask_limit, count as 0), in LANES running maxima
// that the compiler keeps in one vector register: a float max reduction in one accumulator does
// not vectorise without -ffast-math. The maximum is exact whatever the order.
template <bool MASKED_ROW>
float row_max_magnitude(const float* v, int64_t width, float mask_limit) {
  constexpr int LANES = 16;
  float top[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= width; i += LANES)
    for (int l = 0; l < LANES; ++l) {
      const float m = (MASKED_ROW && v[i + l] <= mask_limit) ? 0.f : std::fabs(v[i + l]);
      top[l] = std::max(top[l], m);
    }
  for (; i < width; ++i) top[0] = std::max(top[0], (MASKED_ROW && v[i] <= mask_limit) ? 0.f : std::fabs(v[i]));
  float result = 0.f;
  for (int l = 0; l < LANES; ++l) result = std::max(result, top[l]);
  return result;
}

}  // namespace

extern "C" {


void fxpress_int_row_scale(const float* x, int64_t rows, int64_t width, int masked, float mask_limit, float inv_limit,
                           float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float* v = x + row * width;
    const float top = masked ? row_max_magnitude<true>(v, width, mask_limit) : row_max_magnitude<false>(v, width, 0.f);
    out[row] = top > 0.f ? top * inv_limit : 1.f;
  }
}

// codes (int8 when code_bytes == 1, else int32) = clamp(floor(x * inv + 1/2), -limit, limit).
void fxpress_int_quantize(const float* x, const float* inv, int64_t inv_stride, int64_t rows, int64_t width,
                          int masked, float mask_limit, float limit, int code_bytes, void* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float* v = x + row * width;
    const float r = inv[row * inv_stride];
    if (code_bytes == 1) {
      int8_t* o = (int8_t*)out + row * width;
      for (int64_t i = 0; i < width; ++i) {
        float c = std::min(std::max(std::floor(v[i] * r + 0.5f), -limit), limit);
        o[i] = (masked && v[i] <= mask_limit) ? (int8_t)MASKED : (int8_t)c;
      }
    } else {
      int32_t* o = (int32_t*)out + row * width;
      for (int64_t i = 0; i < width; ++i) o[i] = (int32_t)std::min(std::max(std::floor(v[i] * r + 0.5f), -limit), limit);
    }
  }
}

}  // extern "C"

namespace {

// One row's probabilities at 2**-out_bits (uint8 up to 8 bits, int16 above) from its int8 codes.
void softmax_row(const int8_t* v, int64_t width, const ExpConstants& k, bool poly, int out_bits, int32_t* e,
                 void* out_row) {
  const int32_t total = poly ? softmax_exps<true>(v, width, k, e) : softmax_exps<false>(v, width, k, e);
  const int sh = 31 - out_bits;
  // e <= total, so e * factor + half <= 2**31 - 1: int32 throughout.
  const int32_t half = int32_t(1) << (sh - 1), cap = (int32_t(1) << out_bits) - 1;
  const int32_t factor = (int32_t)((INT32_MAX_ - half) / total);
  if (out_bits <= 8) {
    uint8_t* o = (uint8_t*)out_row;
    for (int64_t i = 0; i < width; ++i) o[i] = (uint8_t)std::min((e[i] * factor + half) >> sh, cap);
  } else {
    int16_t* o = (int16_t*)out_row;
    for (int64_t i = 0; i < width; ++i) o[i] = (int16_t)std::min((e[i] * factor + half) >> sh, cap);
  }
}

}  // namespace

extern "C" {

// Probabilities of int8 codes, per row.
int fxpress_int_softmax(const int8_t* q, const double* scale, int64_t s_stride, const double* coef, int64_t rows,
                        int64_t width, int poly, int exp_bits, int max_q, int out_bits, void* out, int threads) {
  int status = 0;
  const int64_t out_bytes = out_bits <= 8 ? 1 : 2;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int32_t> e(width);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      ExpConstants k;
      int bad = softmax_constants(scale[row * s_stride], coef, poly, exp_bits, max_q, &k);
      if (bad) {
#pragma omp atomic write
        status = bad;
        continue;
      }
      softmax_row(q + row * width, width, k, poly, out_bits, e.data(), (char*)out + row * width * out_bytes);
    }
  }
  return status;
}

// The same from float inputs with a scale per row computed here: fxpress_int_row_scale (masked),
// fxpress_int_quantize (int8) and fxpress_int_softmax in one pass over each row, its codes in a
// buffer of the thread's, with the same float operations as the three.
int fxpress_int_softmax_dynamic(const float* x, int64_t rows, int64_t width, float mask_limit, float inv_limit,
                                const double* coef, int poly, int exp_bits, int max_q, int out_bits, void* out,
                                int threads) {
  int status = 0;
  const int64_t out_bytes = out_bits <= 8 ? 1 : 2;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int32_t> e(width);
    std::vector<int8_t> codes(width);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const float* v = x + row * width;
      const float top = row_max_magnitude<true>(v, width, mask_limit);
      const float scale = top > 0.f ? top * inv_limit : 1.f;
      const float r = 1.f / scale;
      for (int64_t i = 0; i < width; ++i) {
        const float c = std::min(std::max(std::floor(v[i] * r + 0.5f), -127.f), 127.f);
        codes[i] = v[i] <= mask_limit ? (int8_t)MASKED : (int8_t)c;
      }
      ExpConstants k;
      int bad = softmax_constants((double)scale, coef, poly, exp_bits, max_q, &k);
      if (bad) {
#pragma omp atomic write
        status = bad;
        continue;
      }
      softmax_row(codes.data(), width, k, poly, out_bits, e.data(), (char*)out + row * width * out_bytes);
    }
  }
  return status;
}

// GELU of int8 codes: an int8 code has 256 values, so each row scale's results are tabulated once
// (once in all for one scale, s_stride 0) and looked up.
int fxpress_int_gelu(const int8_t* q, const double* scale, int64_t s_stride, const double* coef, int64_t rows,
                     int64_t width, int poly, int exp_bits, int max_q, int erf_bits, int sigmoid_bits, int32_t* out,
                     int threads) {
  int32_t shared[256];
  const bool one_scale = s_stride == 0;
  if (one_scale && rows > 0) {
    const int status = gelu_table(scale[0], coef, poly, exp_bits, max_q, erf_bits, sigmoid_bits, shared);
    if (status) return status;
  }
  int status = 0;
#pragma omp parallel num_threads(threads)
  {
    int32_t own[256];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int32_t* table = shared;
      if (!one_scale) {
        const int failed = gelu_table(scale[row * s_stride], coef, poly, exp_bits, max_q, erf_bits, sigmoid_bits, own);
        if (failed) {
#pragma omp atomic write
          status = failed;
          continue;
        }
        table = own;
      }
      const int8_t* v = q + row * width;
      int32_t* o = out + row * width;
      for (int64_t i = 0; i < width; ++i) o[i] = table[v[i] + 128];
    }
  }
  return status;
}

// I-ViT's integer LayerNorm of int8 (code_bytes 1) or int32 codes; int32 out.
void fxpress_int_layer_norm(const void* q, int code_bytes, const int32_t* bias, int64_t rows, int64_t width,
                            int in_shift, int var_shift, int out_shift, int newton_steps, int32_t* out, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<int32_t> x(width);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      if (code_bytes == 1)
        for (int64_t i = 0; i < width; ++i) x[i] = ((const int8_t*)q)[row * width + i] >> in_shift;
      else
        for (int64_t i = 0; i < width; ++i) x[i] = ((const int32_t*)q)[row * width + i] >> in_shift;
      int64_t sum = 0;
      for (int64_t i = 0; i < width; ++i) sum += x[i];
      const int64_t n = sum + width / 2;
      const int32_t mean = (int32_t)(n >= 0 ? div_floor64(n, width) : -div_floor64(width - 1 - n, width));
      // Each squared deviation is below 2**31 (their sum is: isqrt's domain), the sum is int64.
      int64_t var = 0;
      for (int64_t i = 0; i < width; ++i) {
        int32_t sh = (x[i] - mean) >> var_shift;
        var += sh * sh;
      }
      const int64_t std_ = isqrt(var, newton_steps);
      // |x - mean| <= the deviation bound, so (x - mean) * factor fits int32 (arith.deviation_bound).
      const int32_t factor = (int32_t)div_floor64(INT32_MAX_, (std_ << var_shift) + ((int64_t(1) << var_shift) - 1));
      int32_t* o = out + row * width;
      for (int64_t i = 0; i < width; ++i) o[i] = (((x[i] - mean) * factor) >> out_shift) + bias[i];
    }
  }
}

}  // extern "C"
