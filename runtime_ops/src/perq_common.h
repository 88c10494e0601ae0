// Shared definitions of the perq custom-op kernels (CPU and CUDA).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PERQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PERQ_HOST_DEVICE inline
#endif

namespace perq {

constexpr float kEps = 1e-8f;  // perq_onnx.functions.EPS

// Microscaling FP4 activation formats of BlockHadamardQuantizeFP4 (perq_onnx/formats.py).
enum class Fp4 { kNone = 0, kNvfp4 = 1, kMxfp4 = 2 };

// What one BlockHadamard / BlockHadamardQuantize node computes.
struct OpParams {
  int block_size = 0;      // power of two, 2..1024
  int log2_block = 0;
  bool quantize = false;   // BlockHadamardQuantize
  int bits = 8;            // 4 or 8
  bool symmetric = false;
  float inv_sqrt_block = 0.f;  // 1/sqrt(block_size) rounded to float32
  Fp4 fp4 = Fp4::kNone;    // BlockHadamardQuantizeFP4: the format (quantize is false)
  float tensor_scale = 1.f;  // NVFP4's per-tensor float32 scale

  // FP4 scale block: 16 values (NVFP4) or 32 (MXFP4).
  int fp4_group() const { return fp4 == Fp4::kNvfp4 ? 16 : 32; }

  // asymmetric: codes 0..2^n-1; symmetric: codes -2^(n-1)..2^(n-1)-1
  float qmax() const { return symmetric ? float((1 << (bits - 1)) - 1) : float((1 << bits) - 1); }
  float qmin() const { return symmetric ? -qmax() - 1.f : 0.f; }
};

// -- FP4 rounding, shared by the CPU and CUDA kernels: only exact or IEEE-rounded float32
// operations (division, round half to even, exact powers of two read from and written as bits),
// so both give the bits of the standard-op chain in perq_onnx/formats.py (emit_fp4_activation_qdq).

PERQ_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// 2^k as float32, exact for k in [-149, 127] (subnormal below -126).
PERQ_HOST_DEVICE float pow2(int k) {
  const uint32_t u = k >= -126 ? uint32_t(k + 127) << 23 : 1u << (k + 149);
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// floor(log2 v) of a positive normal float32 (-127 for subnormals).
PERQ_HOST_DEVICE int exponent_of(float v) { return int((float_bits(v) >> 23) & 0xffu) - 127; }

// y rounded half to even onto the E2M1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating at +-6.
// (y / step with step a power of two is the exact y * (1 / step).)
PERQ_HOST_DEVICE float e2m1_round(float y) {
  const float a = fabsf(y);
  const float inv = a < 2.f ? 2.f : (a < 4.f ? 1.f : 0.5f);
  const float step = a < 2.f ? 0.5f : (a < 4.f ? 1.f : 2.f);
  const float r = nearbyintf(y * inv) * step;
  return r < -6.f ? -6.f : (r > 6.f ? 6.f : r);  // (not fminf/fmaxf: library calls on the CPU)
}

// v in [0, 448] rounded half to even onto float8 E4M3FN (3 mantissa bits; below 2^-6 the
// subnormal step 2^-9), as float32.
PERQ_HOST_DEVICE float e4m3_round(float v) {
  if (!(v > 0.f)) return v == v ? 0.f : v;  // zero stays zero, NaN stays NaN
  int e = exponent_of(v);
  e = e < -6 ? -6 : e;
  return nearbyintf(v * pow2(3 - e)) * pow2(e - 3);
}

// One FP4 block: scale s and divisor d (d = s, or 1 where s == 0) from the block's max |x|.
// NVFP4: s = e4m3(min((amax / 6) / ts, 448)) * ts. MXFP4: s = 2^(floor(log2 max(amax, 2^-125)) - 2).
PERQ_HOST_DEVICE void fp4_scale(float amax, Fp4 fmt, float ts, float* scale, float* divisor) {
  if (fmt == Fp4::kNvfp4) {
    const float raw = (amax / 6.f) / ts;
    const float s = e4m3_round(raw > 448.f ? 448.f : raw) * ts;
    *scale = s;
    *divisor = s == 0.f ? 1.f : s;
    return;
  }
  const float floored = amax > 0x1p-125f ? amax : 0x1p-125f;
  *scale = *divisor = pow2(exponent_of(floored) - 2);  // E2M1's largest exponent is 2
}

// IEEE binary16 <-> binary32, round to nearest even (portable fallbacks).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));  // inf / nan
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (ax < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (ax < 0x33000000u) return sign;  // < 2^-25: rounds to zero
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    // value = m * 2^(e-150); the half subnormal ulp is 2^-24, so q = m * 2^(e-126) = m >> (126 - e)
    const uint32_t shift = 126u - e;  // 14..24
    const uint32_t shifted = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t q = shifted;
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (carry may bump the exponent)
  uint32_t h = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

}  // namespace perq
