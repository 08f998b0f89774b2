// Scalar definitions of the NEON intrinsics fxpress/ops/cpp/lut.cpp's NEON path uses, with their
// ARM semantics (lane order, tbl's zero for an index past 15, wrapping int16 adds), so the path
// builds and runs on x86 in tests (FXPRESS_LUT_NEON_SHIM). Not for speed.

#include <cstdint>

struct uint8x16_t { uint8_t v[16]; };
struct int16x8_t { int16_t v[8]; };
struct int16x4_t { int16_t v[4]; };
struct int32x4_t { int32_t v[4]; };

inline uint8x16_t vdupq_n_u8(uint8_t x) { uint8x16_t r; for (auto& e : r.v) e = x; return r; }
inline int16x8_t vdupq_n_s16(int16_t x) { int16x8_t r; for (auto& e : r.v) e = x; return r; }
inline uint8x16_t vld1q_u8(const uint8_t* p) { uint8x16_t r; for (int i = 0; i < 16; ++i) r.v[i] = p[i]; return r; }
inline uint8x16_t vandq_u8(uint8x16_t a, uint8x16_t b) {
  for (int i = 0; i < 16; ++i) a.v[i] &= b.v[i];
  return a;
}
inline uint8x16_t vshrq_n_u8(uint8x16_t a, int n) { for (auto& e : a.v) e = (uint8_t)(e >> n); return a; }
inline uint8x16_t vqtbl1q_u8(uint8x16_t t, uint8x16_t idx) {
  uint8x16_t r;
  for (int i = 0; i < 16; ++i) r.v[i] = idx.v[i] < 16 ? t.v[idx.v[i]] : 0;
  return r;
}
inline uint8x16_t vzip1q_u8(uint8x16_t a, uint8x16_t b) {
  uint8x16_t r;
  for (int i = 0; i < 8; ++i) r.v[2 * i] = a.v[i], r.v[2 * i + 1] = b.v[i];
  return r;
}
inline uint8x16_t vzip2q_u8(uint8x16_t a, uint8x16_t b) {
  uint8x16_t r;
  for (int i = 0; i < 8; ++i) r.v[2 * i] = a.v[8 + i], r.v[2 * i + 1] = b.v[8 + i];
  return r;
}
inline int16x8_t vreinterpretq_s16_u8(uint8x16_t a) {  // little-endian lanes, as on ARM
  int16x8_t r;
  for (int i = 0; i < 8; ++i) r.v[i] = (int16_t)(uint16_t)(a.v[2 * i] | a.v[2 * i + 1] << 8);
  return r;
}
inline int16x8_t vaddq_s16(int16x8_t a, int16x8_t b) {
  for (int i = 0; i < 8; ++i) a.v[i] = (int16_t)(uint16_t)((uint16_t)a.v[i] + (uint16_t)b.v[i]);
  return a;
}
inline int16x4_t vget_low_s16(int16x8_t a) { int16x4_t r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i]; return r; }
inline int16x4_t vget_high_s16(int16x8_t a) { int16x4_t r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[4 + i]; return r; }
inline int32x4_t vmovl_s16(int16x4_t a) { int32x4_t r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i]; return r; }
inline int32x4_t vld1q_s32(const int32_t* p) { int32x4_t r; for (int i = 0; i < 4; ++i) r.v[i] = p[i]; return r; }
inline int32x4_t vaddq_s32(int32x4_t a, int32x4_t b) { for (int i = 0; i < 4; ++i) a.v[i] += b.v[i]; return a; }
inline void vst1q_s32(int32_t* p, int32x4_t a) { for (int i = 0; i < 4; ++i) p[i] = a.v[i]; }
