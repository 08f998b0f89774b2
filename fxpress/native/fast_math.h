// Float functions in plain arithmetic, shared by the C++ kernels (build.py prepends this file to a
// kernel's source, so it is part of the library's key). std::exp and std::erf are scalar calls;
// loops over these vectorise.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fxpress_math {

// Rounds to the nearest integer for |v| < 2**22 by adding and removing 1.5 * 2**23 (std::nearbyint
// is a library call that stops loops from vectorising).
inline float round_nearest(float v) { return (v + 12582912.f) - 12582912.f; }

// exp(x) for x <= 0 in float32 to within 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its
// degree-6 Taylor polynomial, times 2**n through the exponent bits. Below -87 it is 0.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = round_nearest(x * 1.44269504f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 in two parts
  float e = 1.f / 720;
  e = e * r + 1.f / 120;
  e = e * r + 1.f / 24;
  e = e * r + 1.f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return e * scale;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the formula ATen's vectorised
// erf uses too.
inline float erf_approx(float x) {
  const float a = std::fabs(x);
  const float t = 1.f / (1.f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.f - p * t * exp_nonpositive(-a * a);
  return x < 0.f ? -y : y;
}

inline float gelu(float x) { return 0.5f * x * (1.f + erf_approx(x * 0.70710678118654752f)); }

inline float gelu_tanh(float x) {  // tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|)
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float e = exp_nonpositive(-2.f * std::fabs(u));
  const float t = (1.f - e) / (1.f + e);
  return 0.5f * x * (1.f + (u < 0.f ? -t : t));
}

// Both sides of every choice are computed first: the compiler does not evaluate a division or a
// product only on one side (it might trap), so a choice between them would keep a loop scalar.
inline float silu(float x) {  // x sigmoid(x), e = exp(-|x|)
  const float e = exp_nonpositive(-std::fabs(x));
  const float s = 1.f / (1.f + e), t = e * s;
  return x * (x >= 0.f ? s : t);
}

inline float relu(float x) { return x > 0.f ? x : 0.f; }

}  // namespace fxpress_math
