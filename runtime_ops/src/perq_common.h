// Shared definitions of the perq custom-op kernels (CPU and CUDA).
#pragma once

#include <cstdint>
#include <cstring>

namespace perq {

constexpr float kEps = 1e-8f;  // perq_onnx.functions.EPS

// What one BlockHadamard / BlockHadamardQuantize node computes.
struct OpParams {
  int block_size = 0;      // power of two, 2..1024
  int log2_block = 0;
  bool quantize = false;   // BlockHadamardQuantize
  int bits = 8;            // 4 or 8
  bool symmetric = false;
  float inv_sqrt_block = 0.f;  // 1/sqrt(block_size) rounded to float32

  // asymmetric: codes 0..2^n-1; symmetric: codes -2^(n-1)..2^(n-1)-1
  float qmax() const { return symmetric ? float((1 << (bits - 1)) - 1) : float((1 << bits) - 1); }
  float qmin() const { return symmetric ? -qmax() - 1.f : 0.f; }
};

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
