// CPU kernels: see cpu_kernels.h. The float32 operations and their order match the standard-op
// bodies in perq_onnx/functions.py: the rotation is an unnormalised Walsh-Hadamard butterfly
// (sums and differences) followed by one multiplication by 1/sqrt(b) rounded to float32; the
// quantization uses IEEE division (never a reciprocal), round half to even, and clips after
// rounding. Built with -ffp-contract=off so no multiply-add is fused.
#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#define PERQ_AVX2 1
#endif

namespace perq {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Butterfly stages. A stage of span h maps every pair (i, i + h) with (i & h) == 0 to
// (a + c, a - c); the stages h = 1, 2, ..., b/2 applied over the whole row transform every
// aligned block of b channels independently (Sylvester ordering).

// Stages h = 1, 2, 4 (those below b) from src to dst (which may alias).
void small_stages(const float* src, float* dst, int64_t n, int b) {
  int64_t i = 0;
#if PERQ_AVX2
  if (b >= 8) {
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(src + i);
      __m256 p = _mm256_permute_ps(v, 0xB1);  // [1,0,3,2]
      v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
      p = _mm256_permute_ps(v, 0x4E);  // [2,3,0,1]
      v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
      p = _mm256_permute2f128_ps(v, v, 0x01);  // swap 128-bit halves
      v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
      _mm256_storeu_ps(dst + i, v);
    }
  } else if (b == 4) {
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(src + i);
      __m256 p = _mm256_permute_ps(v, 0xB1);
      v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
      p = _mm256_permute_ps(v, 0x4E);
      v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
      _mm256_storeu_ps(dst + i, v);
    }
  } else {  // b == 2
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(src + i);
      __m256 p = _mm256_permute_ps(v, 0xB1);
      v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
      _mm256_storeu_ps(dst + i, v);
    }
  }
#endif
  const int m = std::min(b, 8);  // block of the in-register stages
  for (; i < n; i += m) {        // n - i is a multiple of min(b, 8)
    float t[8];
    for (int k = 0; k < m; ++k) t[k] = src[i + k];
    for (int h = 1; h < m; h <<= 1) {
      for (int k = 0; k < m; ++k) {
        if (k & h) continue;
        const float a = t[k], c = t[k + h];
        t[k] = a + c;
        t[k + h] = a - c;
      }
    }
    for (int k = 0; k < m; ++k) dst[i + k] = t[k];
  }
}

// One stage of span h >= 8 in place.
void radix2_stage(float* y, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 2 * h) {
    float* __restrict p0 = y + i;
    float* __restrict p1 = y + i + h;
    int64_t j = 0;
#if PERQ_AVX2
    for (; j + 8 <= h; j += 8) {
      const __m256 a = _mm256_loadu_ps(p0 + j), c = _mm256_loadu_ps(p1 + j);
      _mm256_storeu_ps(p0 + j, _mm256_add_ps(a, c));
      _mm256_storeu_ps(p1 + j, _mm256_sub_ps(a, c));
    }
#endif
    for (; j < h; ++j) {
      const float a = p0[j], c = p1[j];
      p0[j] = a + c;
      p1[j] = a - c;
    }
  }
}

// Two stages, spans h and 2h (h >= 8), in one pass; the same operations as two radix-2 passes.
void radix4_stage(float* y, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 4 * h) {
    float* __restrict p0 = y + i;
    float* __restrict p1 = y + i + h;
    float* __restrict p2 = y + i + 2 * h;
    float* __restrict p3 = y + i + 3 * h;
    int64_t j = 0;
#if PERQ_AVX2
    for (; j + 8 <= h; j += 8) {
      const __m256 a = _mm256_loadu_ps(p0 + j), b = _mm256_loadu_ps(p1 + j);
      const __m256 c = _mm256_loadu_ps(p2 + j), d = _mm256_loadu_ps(p3 + j);
      const __m256 s0 = _mm256_add_ps(a, b), s1 = _mm256_sub_ps(a, b);
      const __m256 s2 = _mm256_add_ps(c, d), s3 = _mm256_sub_ps(c, d);
      _mm256_storeu_ps(p0 + j, _mm256_add_ps(s0, s2));
      _mm256_storeu_ps(p2 + j, _mm256_sub_ps(s0, s2));
      _mm256_storeu_ps(p1 + j, _mm256_add_ps(s1, s3));
      _mm256_storeu_ps(p3 + j, _mm256_sub_ps(s1, s3));
    }
#endif
    for (; j < h; ++j) {
      const float a = p0[j], b = p1[j], c = p2[j], d = p3[j];
      const float s0 = a + b, s1 = a - b, s2 = c + d, s3 = c - d;
      p0[j] = s0 + s2;
      p2[j] = s0 - s2;
      p1[j] = s1 + s3;
      p3[j] = s1 - s3;
    }
  }
}

// The stages h = h_start .. b/2 (h_start >= 8) in place.
void big_stages(float* y, int64_t n, int64_t h_start, int b) {
  int64_t h = h_start;
  for (; 4 * h <= b; h *= 4) radix4_stage(y, n, h);
  if (2 * h <= b) radix2_stage(y, n, h);
}

// Unnormalised blockwise transform of one row: dst = blockdiag(H_b * sqrt(b)) src.
void fwht_row(const float* src, float* dst, int64_t n, int b) {
  small_stages(src, dst, n, b);
  big_stages(dst, n, 8, b);
}

#if PERQ_AVX2
// In-register transform of NV vectors (8 * NV consecutive channels): the stages h < 8 * NV.
inline __m256 in_lane_stages(__m256 v) {
  __m256 p = _mm256_permute_ps(v, 0xB1);
  v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
  p = _mm256_permute_ps(v, 0x4E);
  v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
  p = _mm256_permute2f128_ps(v, v, 0x01);
  return _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
}

template <int NV>
inline void register_stages(__m256 (&v)[NV]) {
  for (int k = 0; k < NV; ++k) v[k] = in_lane_stages(v[k]);
  for (int h = 1; h < NV; h <<= 1) {
    for (int k = 0; k < NV; ++k) {
      if (k & h) continue;
      const __m256 a = v[k], c = v[k + h];
      v[k] = _mm256_add_ps(a, c);
      v[k + h] = _mm256_sub_ps(a, c);
    }
  }
}

enum Reduce { kNoReduce = 0, kMinMax = 1, kAbsMax = 2 };

// One pass over the row doing the stages h < 8 * NV in registers, src -> out. With kFinal
// (8 * NV == b: the transform is complete) also the scaling by s and the row reduction.
// Lane-wise min of lo and max of hi reduced to two scalars.
static inline void horizontal_minmax(__m256 lo, __m256 hi, float* red_lo, float* red_hi) {
    alignas(32) float a[8], c[8];
    _mm256_store_ps(a, lo);
    _mm256_store_ps(c, hi);
    float l = a[0], h = c[0];
    for (int k = 1; k < 8; ++k) {
      l = std::min(l, a[k]);
      h = std::max(h, c[k]);
    }
    *red_lo = l;
    *red_hi = h;
}

template <int NV, bool kFinal, int kReduce, bool kStream>
void register_pass(const float* src, float* out, int64_t n, float s, float* red_lo, float* red_hi) {
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 lo = _mm256_set1_ps(INFINITY);
  __m256 hi = _mm256_set1_ps(kReduce == kAbsMax ? 0.f : -INFINITY);
  for (int64_t i = 0; i < n; i += 8 * NV) {
    __m256 v[NV];
    for (int k = 0; k < NV; ++k) v[k] = _mm256_loadu_ps(src + i + 8 * k);
    register_stages<NV>(v);
    for (int k = 0; k < NV; ++k) {
      if (kFinal) v[k] = _mm256_mul_ps(v[k], vs);
      if (kReduce == kMinMax) {
        lo = _mm256_min_ps(lo, v[k]);
        hi = _mm256_max_ps(hi, v[k]);
      } else if (kReduce == kAbsMax) {
        hi = _mm256_max_ps(hi, _mm256_and_ps(v[k], absmask));
      }
      if (kStream)
        _mm256_stream_ps(out + i + 8 * k, v[k]);
      else
        _mm256_storeu_ps(out + i + 8 * k, v[k]);
    }
  }
  if (kReduce != kNoReduce) horizontal_minmax(lo, hi, red_lo, red_hi);
}

// The last butterfly step of a transform with b > 64 (radix-2 or radix-4 at span h >= 64),
// fused with the scaling by s, the row reduction and the store to `out` (which may be y).
template <int kReduce, bool kStream>
struct Finish {
  __m256 vs, lo, hi, absmask;
  explicit Finish(float s)
      : vs(_mm256_set1_ps(s)), lo(_mm256_set1_ps(INFINITY)),
        hi(_mm256_set1_ps(kReduce == kAbsMax ? 0.f : -INFINITY)),
        absmask(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))) {}
  inline void put(float* p, __m256 v) {
    v = _mm256_mul_ps(v, vs);
    if (kReduce == kMinMax) {
      lo = _mm256_min_ps(lo, v);
      hi = _mm256_max_ps(hi, v);
    } else if (kReduce == kAbsMax) {
      hi = _mm256_max_ps(hi, _mm256_and_ps(v, absmask));
    }
    if (kStream)
      _mm256_stream_ps(p, v);
    else
      _mm256_storeu_ps(p, v);
  }
  void result(float* red_lo, float* red_hi) const { horizontal_minmax(lo, hi, red_lo, red_hi); }
};

template <int kReduce, bool kStream>
void final_step(const float* y, float* out, int64_t n, int64_t h, bool radix4, float s, float* lo, float* hi) {
  Finish<kReduce, kStream> f(s);
  if (radix4) {
    for (int64_t i = 0; i < n; i += 4 * h) {
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(y + j), b = _mm256_loadu_ps(y + j + h);
        const __m256 c = _mm256_loadu_ps(y + j + 2 * h), d = _mm256_loadu_ps(y + j + 3 * h);
        const __m256 s0 = _mm256_add_ps(a, b), s1 = _mm256_sub_ps(a, b);
        const __m256 s2 = _mm256_add_ps(c, d), s3 = _mm256_sub_ps(c, d);
        f.put(out + j, _mm256_add_ps(s0, s2));
        f.put(out + j + h, _mm256_add_ps(s1, s3));
        f.put(out + j + 2 * h, _mm256_sub_ps(s0, s2));
        f.put(out + j + 3 * h, _mm256_sub_ps(s1, s3));
      }
    }
  } else {
    for (int64_t i = 0; i < n; i += 2 * h) {
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(y + j), c = _mm256_loadu_ps(y + j + h);
        f.put(out + j, _mm256_add_ps(a, c));
        f.put(out + j + h, _mm256_sub_ps(a, c));
      }
    }
  }
  if (kReduce != kNoReduce) f.result(lo, hi);
}

// Stages h = 64 .. b/2 (b > 64) of `work`: all but the last step in place, the last one fused
// with scaling and reduction into `out`.
void late_stages(float* work, float* out, int64_t n, int b, int reduce, bool stream, float s, float* lo, float* hi) {
  int64_t h = 64;
  while (b / h >= 8) {
    radix4_stage(work, n, h);
    h *= 4;
  }
  const bool radix4 = b / h == 4;
  if (reduce == kMinMax)
    final_step<kMinMax, false>(work, out, n, h, radix4, s, lo, hi);
  else if (reduce == kAbsMax)
    final_step<kAbsMax, false>(work, out, n, h, radix4, s, lo, hi);
  else if (stream)
    final_step<kNoReduce, true>(work, out, n, h, radix4, s, lo, hi);
  else
    final_step<kNoReduce, false>(work, out, n, h, radix4, s, lo, hi);
}

template <int NV>
void register_pass_dispatch(const float* src, float* out, int64_t n, bool final_pass, int reduce, bool stream,
                            float s, float* lo, float* hi) {
  if (!final_pass)
    register_pass<NV, false, kNoReduce, false>(src, out, n, s, lo, hi);
  else if (reduce == kMinMax)
    register_pass<NV, true, kMinMax, false>(src, out, n, s, lo, hi);
  else if (reduce == kAbsMax)
    register_pass<NV, true, kAbsMax, false>(src, out, n, s, lo, hi);
  else if (stream)
    register_pass<NV, true, kNoReduce, true>(src, out, n, s, lo, hi);
  else
    register_pass<NV, true, kNoReduce, false>(src, out, n, s, lo, hi);
}
#endif

// ---------------------------------------------------------------------------------------------
// Scaling, row reductions and quantization.

// Final stores: streaming (non-temporal) stores skip the read-for-ownership of the output's cache
// lines when the output is too large to stay in cache for its consumer anyway.
#if PERQ_AVX2
template <bool kStream>
inline void store8(float* p, __m256 v) {
  if (kStream)
    _mm256_stream_ps(p, v);
  else
    _mm256_storeu_ps(p, v);
}
#endif

// dst = work * s
template <bool kStream>
void scale_row(const float* work, float* dst, int64_t n, float s) {
  int64_t i = 0;
#if PERQ_AVX2
  const __m256 vs = _mm256_set1_ps(s);
  for (; i + 8 <= n; i += 8) store8<kStream>(dst + i, _mm256_mul_ps(_mm256_loadu_ps(work + i), vs));
#endif
  for (; i < n; ++i) dst[i] = work[i] * s;
}

// y *= s, returning min and max of the scaled row.
void scale_minmax(float* y, int64_t n, float s, float* out_min, float* out_max) {
  float mn = INFINITY, mx = -INFINITY;
  int64_t i = 0;
#if PERQ_AVX2
  const __m256 vs = _mm256_set1_ps(s);
  __m256 vmn = _mm256_set1_ps(INFINITY), vmx = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(y + i), vs);
    _mm256_storeu_ps(y + i, v);
    vmn = _mm256_min_ps(vmn, v);
    vmx = _mm256_max_ps(vmx, v);
  }
  alignas(32) float a[8], c[8];
  _mm256_store_ps(a, vmn);
  _mm256_store_ps(c, vmx);
  for (int k = 0; k < 8; ++k) {
    mn = std::min(mn, a[k]);
    mx = std::max(mx, c[k]);
  }
#endif
  for (; i < n; ++i) {
    const float v = y[i] * s;
    y[i] = v;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  *out_min = mn;
  *out_max = mx;
}

// y *= s, returning max |y| of the scaled row.
float scale_absmax(float* y, int64_t n, float s) {
  float mx = 0.f;
  int64_t i = 0;
#if PERQ_AVX2
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmx = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(y + i), vs);
    _mm256_storeu_ps(y + i, v);
    vmx = _mm256_max_ps(vmx, _mm256_and_ps(v, absmask));
  }
  alignas(32) float a[8];
  _mm256_store_ps(a, vmx);
  for (int k = 0; k < 8; ++k) mx = std::max(mx, a[k]);
#endif
  for (; i < n; ++i) {
    const float v = y[i] * s;
    y[i] = v;
    mx = std::max(mx, std::fabs(v));
  }
  return mx;
}

// dst = (clip(round(work / scale + zp), qmin, qmax) - zp) * scale   (asymmetric)
// dst =  clip(round(work / scale), qmin, qmax) * scale              (symmetric: zp = 0, skipped)
// "+ 0" turns a rounded -0 into the +0 that integer codes give.
template <bool kSymmetric, bool kStream>
void quantize_row(const float* work, float* dst, int64_t n, float scale, float zp, float qmin, float qmax) {
  int64_t i = 0;
#if PERQ_AVX2
  const __m256 vscale = _mm256_set1_ps(scale), vzp = _mm256_set1_ps(zp);
  const __m256 vqmin = _mm256_set1_ps(qmin), vqmax = _mm256_set1_ps(qmax), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(work + i), vscale);
    if (!kSymmetric) v = _mm256_add_ps(v, vzp);
    __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(r, vqmin), vqmax), zero);
    if (!kSymmetric) r = _mm256_sub_ps(r, vzp);
    store8<kStream>(dst + i, _mm256_mul_ps(r, vscale));
  }
#endif
  for (; i < n; ++i) {
    float v = work[i] / scale;
    if (!kSymmetric) v = v + zp;
    float r = std::nearbyint(v);
    r = std::min(std::max(r, qmin), qmax) + 0.f;
    if (!kSymmetric) r = r - zp;
    dst[i] = r * scale;
  }
}

// Row reduction and quantization once `work` holds the scaled rotation (lo/hi: its min and max,
// or 0 and max |.| for the symmetric scheme).
template <bool kStream>
void quantize_scaled(const float* work, float* dst, int64_t n, const OpParams& p, float lo, float hi) {
  const float qmax = p.qmax(), qmin = p.qmin();
  if (p.symmetric) {
    const float scale = std::max(hi / qmax, kEps);
    quantize_row<true, kStream>(work, dst, n, scale, 0.f, qmin, qmax);
  } else {
    lo = std::min(lo, 0.f);
    hi = std::max(hi, 0.f);
    const float scale = std::max((hi - lo) / qmax, kEps);
    const float zp = std::nearbyint(-lo / scale);
    quantize_row<false, kStream>(work, dst, n, scale, zp, qmin, qmax);
  }
}

// The whole op on one row: src -> dst through `work` (n floats; src, work and dst may alias,
// except that kStream needs dst distinct from work and 32-byte aligned).
template <bool kStream>
void process_row(const float* src, float* work, float* dst, int64_t n, const OpParams& p) {
  const int b = p.block_size;
  const float s = p.inv_sqrt_block;
  float lo = 0.f, hi = 0.f;
#if PERQ_AVX2
  if (b >= 8) {
    // Stages h < min(b, 64) in registers; when b <= 64 that pass also scales (and reduces),
    // else the last step of the stages h >= 64 does.
    const bool register_final = b <= 64;
    const int reduce = !p.quantize ? kNoReduce : (p.symmetric ? kAbsMax : kMinMax);
    float* out = p.quantize ? work : dst;
    const bool stream = kStream && !p.quantize;
    switch (b >= 64 ? 8 : b / 8) {
      case 1: register_pass_dispatch<1>(src, out, n, true, reduce, stream, s, &lo, &hi); break;
      case 2: register_pass_dispatch<2>(src, out, n, true, reduce, stream, s, &lo, &hi); break;
      case 4: register_pass_dispatch<4>(src, out, n, true, reduce, stream, s, &lo, &hi); break;
      default:
        if (register_final) {
          register_pass_dispatch<8>(src, out, n, true, reduce, stream, s, &lo, &hi);
        } else {  // block by block, so that each block stays in L1 between the passes
          lo = INFINITY;
          hi = reduce == kAbsMax ? 0.f : -INFINITY;
          for (int64_t off = 0; off < n; off += b) {
            float blo, bhi;
            register_pass_dispatch<8>(src + off, work + off, b, false, reduce, stream, s, &blo, &bhi);
            late_stages(work + off, out + off, b, b, reduce, stream, s, &blo, &bhi);
            if (reduce != kNoReduce) {
              lo = std::min(lo, blo);
              hi = std::max(hi, bhi);
            }
          }
        }
        break;
    }
    if (p.quantize) quantize_scaled<kStream>(work, dst, n, p, lo, hi);
    return;
  } else
#endif
  {
    fwht_row(src, work, n, b);
  }
  if (!p.quantize) {
    scale_row<kStream>(work, dst, n, s);
  } else if (p.symmetric) {
    hi = scale_absmax(work, n, s);
    quantize_scaled<kStream>(work, dst, n, p, 0.f, hi);
  } else {
    scale_minmax(work, n, s, &lo, &hi);
    quantize_scaled<kStream>(work, dst, n, p, lo, hi);
  }
}

// FP4 quantize-dequantize of a rotated row, block by block of p.fp4_group() values.
void fp4_quantize_row(const float* work, float* dst, int64_t n, const OpParams& p) {
  const int g = p.fp4_group();
  for (int64_t off = 0; off < n; off += g) {
    float amax = 0.f;
    for (int k = 0; k < g; ++k) amax = std::max(amax, std::fabs(work[off + k]));
    float scale, divisor;
    fp4_scale(amax, p.fp4, p.tensor_scale, &scale, &divisor);
    if (p.fp4 == Fp4::kMxfp4) {  // a power-of-two divisor: multiplying by its inverse is exact
      const float inv = 1.f / divisor;
      for (int k = 0; k < g; ++k) dst[off + k] = e2m1_round(work[off + k] * inv) * scale;
    } else {
      for (int k = 0; k < g; ++k) dst[off + k] = e2m1_round(work[off + k] / divisor) * scale;
    }
  }
}

// The whole op on one row (src, work and dst may alias, as for process_row<false>).
void op_row(const float* src, float* work, float* dst, int64_t n, const OpParams& p) {
  if (p.fp4 == Fp4::kNone) {
    process_row<false>(src, work, dst, n, p);
    return;
  }
  process_row<false>(src, work, work, n, p);  // the rotation alone (p.quantize is false)
  fp4_quantize_row(work, dst, n, p);
}

float* row_buffer(int64_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(n)) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

void load_half(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && PERQ_AVX2
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

void store_half(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && PERQ_AVX2
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace

void run_rows_f32(const float* x, float* y, int64_t channels, int64_t row_begin, int64_t row_end,
                  const OpParams& p, bool stream) {
  float* work = row_buffer(channels);
#if PERQ_AVX2
  if (stream && p.fp4 == Fp4::kNone && channels % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 32 == 0) {
    for (int64_t r = row_begin; r < row_end; ++r)
      process_row<true>(x + r * channels, work, y + r * channels, channels, p);
    _mm_sfence();  // order the streaming stores before the thread pool reports completion
    return;
  }
#endif
  (void)stream;
  for (int64_t r = row_begin; r < row_end; ++r) op_row(x + r * channels, work, y + r * channels, channels, p);
}

void run_rows_f16(const uint16_t* x, uint16_t* y, int64_t channels, int64_t row_begin, int64_t row_end,
                  const OpParams& p) {
  float* work = row_buffer(channels);
  for (int64_t r = row_begin; r < row_end; ++r) {
    load_half(x + r * channels, work, channels);
    op_row(work, work, work, channels, p);
    store_half(work, y + r * channels, channels);
  }
}

}  // namespace cpu
}  // namespace perq
