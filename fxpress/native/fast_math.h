// Float functions in plain arithmetic, shared by the C++ kernels (build.py prepends this file to a
// kernel's source, so it is part of the library's key). std::exp and std::erf are scalar calls;
// loops over these vectorise.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fxpress_math {

// a * b + c, fused (one rounding) where the CPU has FMA: the polynomials below take half the
// instructions. Build flags keep the compiler from fusing anything on its own (-ffp-contract=off).
inline float fmadd(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Rounds to the nearest integer for |v| < 2**22 by adding and removing 1.5 * 2**23 (std::nearbyint
// is a library call that stops loops from vectorising).
inline float round_nearest(float v) { return (v + 12582912.f) - 12582912.f; }

// x = n ln2 + r with |r| <= ln2 / 2 (ln 2 in two parts, so r is exact), for x in [-87, 0].
struct Reduced {
  float n, r;
};
inline Reduced reduce_ln2(float x) {
  const float n = round_nearest(x * 1.44269504f);
  return {n, fmadd(n, -1.428606765330187e-06f, fmadd(n, -0.693145751953125f, x))};
}

// exp(r) - 1 for |r| <= ln2 / 2: r + r**2 p(r), p Cephes' minimax polynomial for expf (relative
// error about 1e-7).
inline float expm1_reduced(float r) {
  float p = 1.9875691500e-4f;
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  return fmadd(p * r, r, r);
}

inline float pow2(float n) {  // 2**n for integral n in [-126, 127]
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return scale;
}

// exp(x) for x <= 0 in float32 to within 2 ulp: exp(r) * 2**n through the exponent bits.
// Below -87 it is 0 (float32's normal range ends there).
inline float exp_nonpositive(float x) {
  const bool underflows = x < -87.f;
  const Reduced v = reduce_ln2(underflows ? -87.f : x);
  const float e = (expm1_reduced(v.r) + 1.f) * pow2(v.n);
  return underflows ? 0.f : e;
}

// exp(x) - 1 for x <= 0, accurate relative to the result near 0 too: 2**n (exp(r) - 1) + (2**n - 1).
inline float expm1_nonpositive(float x) {
  const Reduced v = reduce_ln2(x < -87.f ? -87.f : x);
  const float scale = pow2(v.n);
  return fmadd(expm1_reduced(v.r), scale, scale - 1.f);
}

// erf(x) = x P(x^2) / Q(x^2) for |x| <= 4 (erf(4) is 1 in float32), a rational fit made for this
// file (least squares reweighted towards the largest errors, Lawson's method): absolute error below
// 3.1e-7 in float32 with FMA, and odd by construction. It has no exp and one division: half the
// instructions of Abramowitz & Stegun's 7.1.26 (1 - t p(t) exp(-x^2), the formula ATen's
// vectorised erf uses), which this file used before. It is evaluated at |x| and given x's sign,
// so each clamp (|x| to 4, the quotient to 1, which its rounding can pass by an ulp) is one
// one-sided choice: clamping x to [-4, 4] with a NaN passed on took a third of GELU's time in
// compares and mask operations. A NaN x gives +-1 here; gelu, the one caller, multiplies by x,
// which carries the NaN to its result.
inline float erf_approx(float x) {
  float a = std::fabs(x);
  a = a < 4.f ? a : 4.f;
  const float z = a * a;
  float p = 1.9218544977661622e-08f;
  p = fmadd(p, z, -1.990293412745814e-06f);
  p = fmadd(p, z, 0.0001555170601932332f);
  p = fmadd(p, z, 0.004292154684662819f);
  p = fmadd(p, z, 0.05243058502674103f);
  p = fmadd(p, z, 0.2139231264591217f);
  p = fmadd(p, z, 1.1283786296844482f);
  float q = 0.001097826287150383f;
  q = fmadd(q, z, 0.015549246221780777f);
  q = fmadd(q, z, 0.12079068273305893f);
  q = fmadd(q, z, 0.5229120850563049f);
  q = fmadd(q, z, 1.f);
  const float r = a * p / q;
  return std::copysign(r < 1.f ? r : 1.f, x);
}

inline float gelu(float x) { return 0.5f * x * (1.f + erf_approx(x * 0.70710678118654752f)); }

// tanh(|x|) = -m / (2 + m) with m = expm1(-2|x|): no cancellation near 0.
inline float tanh_approx(float x) {
  const float m = expm1_nonpositive(-2.f * std::fabs(x));
  const float t = -m / (2.f + m);
  return x < 0.f ? -t : t;
}

inline float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanh_approx(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// Both sides of every choice are computed first: the compiler does not evaluate a division or a
// product only on one side (it might trap), so a choice between them would keep a loop scalar.
inline float sigmoid(float x) {  // e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below
  const float e = exp_nonpositive(-std::fabs(x));
  const float d = 1.f + e;
  return x >= 0.f ? 1.f / d : e / d;
}

inline float silu(float x) {  // x sigmoid(x) with one rounding fewer: x / (1 + e), x e / (1 + e)
  const float e = exp_nonpositive(-std::fabs(x));
  const float d = 1.f + e;
  return x >= 0.f ? x / d : (x * e) / d;
}

inline float relu(float x) { return x < 0.f ? 0.f : x; }  // NaN stays NaN, as in torch

}  // namespace fxpress_math
