// CUDA kernels of the perq ops (see perq_ops.cc for the op definitions and cpu_kernels.cc for the
// float32 operation order, which these kernels follow: compiled with --fmad=false and explicit
// round-to-nearest intrinsics so that no multiply-add is contracted).
//
// One thread block per row (grid-stride over rows). A row is processed in tiles of whole
// Hadamard blocks held in shared memory (the whole row when it fits in 48 KiB):
//   1. load the tile, butterfly stages h < 32 in registers with warp shuffles,
//   2. the stages h = 32 .. b/2 in shared memory,
//   3. scale by 1/sqrt(b); for the fused INT op, a block reduction of min/max (or max |y|) over
//      the row, then per-element quantize-dequantize. When the row spans several tiles the
//      transform is recomputed in the second pass instead of being stored. The FP4 op needs no
//      row reduction: each FP4 block of g = 16 or 32 values is g consecutive lanes of one warp,
//      which share its max |y| by shuffles, so it quantizes in the same pass as the rotation.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"

namespace perq {
namespace cuda {
namespace {

constexpr int kReduceFloats = 32;  // the static shared array of block_reduce
// Dynamic plus static shared memory within 48 KiB: no opt-in needed on any architecture.
constexpr int kMaxTileBytes = 48 * 1024 - kReduceFloats * static_cast<int>(sizeof(float));
constexpr int kMaxThreads = 256;

enum Mode { kHadamard = 0, kAsymmetric = 1, kSymmetric = 2, kFp4 = 3 };

struct DeviceParams {
  int block_size;
  float inv_sqrt_block;
  float qmin;
  float qmax;
  Fp4 fp4;
  int fp4_group;
  float tensor_scale;
};

__device__ __forceinline__ float load(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

// Unnormalised blockwise Walsh-Hadamard transform of xr[0, n) into sm[0, n); ends synchronised.
template <typename T>
__device__ void fwht_tile(const T* __restrict__ xr, float* sm, int n, int b) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
  const int reg_span = b < 32 ? b : 32;
  for (int base = 0; base < n; base += nt) {  // uniform trip count: every lane joins the shuffles
    const int e = base + tid;
    float v = e < n ? load(xr + e) : 0.f;
    for (int h = 1; h < reg_span; h <<= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, h);
      v = (lane & h) ? __fsub_rn(o, v) : __fadd_rn(v, o);
    }
    if (e < n) sm[e] = v;
  }
  __syncthreads();
  for (int h = 32, lh = 5; h < b; h <<= 1, ++lh) {
    for (int k = tid; k < n / 2; k += nt) {
      const int i = ((k >> lh) << (lh + 1)) | (k & (h - 1));
      const float a = sm[i], c = sm[i + h];
      sm[i] = __fadd_rn(a, c);
      sm[i + h] = __fsub_rn(a, c);
    }
    __syncthreads();
  }
}

template <bool kMax>
__device__ __forceinline__ float combine(float a, float b) { return kMax ? fmaxf(a, b) : fminf(a, b); }

// Reduction over the thread block; every thread gets the result. `red` holds 32 floats.
template <bool kMax>
__device__ float block_reduce(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = combine<kMax>(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < nwarps; ++w) v = combine<kMax>(v, red[w]);
  __syncthreads();  // red is reused by the next reduction
  return v;
}

template <int kMode>
__device__ __forceinline__ float quantize(float v, float scale, float zp, float qmin, float qmax) {
  float q = __fdiv_rn(v, scale);
  if (kMode == kAsymmetric) q = __fadd_rn(q, zp);
  q = __fadd_rn(fminf(fmaxf(rintf(q), qmin), qmax), 0.f);  // round half to even, clip, -0 -> +0
  if (kMode == kAsymmetric) q = __fsub_rn(q, zp);
  return __fmul_rn(q, scale);
}

template <typename T, int kMode>
__global__ void __launch_bounds__(kMaxThreads) perq_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows,
                                                           int channels, int tile, DeviceParams p) {
  extern __shared__ float sm[];
  __shared__ float red[kReduceFloats];
  const int tid = threadIdx.x, nt = blockDim.x;
  const float rs = p.inv_sqrt_block;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * channels;
    T* yr = y + row * channels;
    if (kMode == kHadamard) {
      for (int t0 = 0; t0 < channels; t0 += tile) {
        const int n = min(tile, channels - t0);
        fwht_tile(xr + t0, sm, n, p.block_size);
        for (int e = tid; e < n; e += nt) store(yr + t0 + e, __fmul_rn(sm[e], rs));
        __syncthreads();
      }
      continue;
    }
    if (kMode == kFp4) {  // tiles and the thread count are multiples of the FP4 block
      for (int t0 = 0; t0 < channels; t0 += tile) {
        const int n = min(tile, channels - t0);
        fwht_tile(xr + t0, sm, n, p.block_size);
        for (int base = 0; base < n; base += nt) {  // uniform trip count for the shuffles
          const int e = base + tid;
          const float v = e < n ? __fmul_rn(sm[e], rs) : 0.f;
          float amax = fabsf(v);
          for (int o = p.fp4_group / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
          float scale, divisor;
          fp4_scale(amax, p.fp4, p.tensor_scale, &scale, &divisor);
          if (e < n) store(yr + t0 + e, __fmul_rn(e2m1_round(__fdiv_rn(v, divisor)), scale));
        }
        __syncthreads();
      }
      continue;
    }
    const bool single = tile >= channels;
    float mn = INFINITY, mx = (kMode == kSymmetric) ? 0.f : -INFINITY;
    for (int t0 = 0; t0 < channels; t0 += tile) {
      const int n = min(tile, channels - t0);
      fwht_tile(xr + t0, sm, n, p.block_size);
      for (int e = tid; e < n; e += nt) {
        const float v = __fmul_rn(sm[e], rs);
        if (single) sm[e] = v;
        if (kMode == kSymmetric) {
          mx = fmaxf(mx, fabsf(v));
        } else {
          mn = fminf(mn, v);
          mx = fmaxf(mx, v);
        }
      }
      __syncthreads();
    }
    float scale, zp = 0.f;
    if (kMode == kSymmetric) {
      const float amax = block_reduce<true>(mx, red);
      scale = fmaxf(__fdiv_rn(amax, p.qmax), kEps);
    } else {
      const float lo = fminf(block_reduce<false>(mn, red), 0.f);
      const float hi = fmaxf(block_reduce<true>(mx, red), 0.f);
      scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), p.qmax), kEps);
      zp = rintf(__fdiv_rn(-lo, scale));
    }
    for (int t0 = 0; t0 < channels; t0 += tile) {
      const int n = min(tile, channels - t0);
      if (!single) fwht_tile(xr + t0, sm, n, p.block_size);
      for (int e = tid; e < n; e += nt) {
        const float v = single ? sm[e] : __fmul_rn(sm[e], rs);
        store(yr + t0 + e, quantize<kMode>(v, scale, zp, p.qmin, p.qmax));
      }
      __syncthreads();
    }
  }
}

template <typename T, int kMode>
cudaError_t launch_typed(const void* x, void* y, int64_t rows, int channels, int tile, int threads, int64_t grid,
                         const DeviceParams& dp, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(tile) * sizeof(float);
  perq_kernel<T, kMode><<<static_cast<unsigned>(grid), threads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(y), rows, channels, tile, dp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mode(const void* x, void* y, int64_t rows, int channels, int tile, int threads, int64_t grid,
                        const OpParams& p, const DeviceParams& dp, cudaStream_t stream) {
  if (p.fp4 != Fp4::kNone) return launch_typed<T, kFp4>(x, y, rows, channels, tile, threads, grid, dp, stream);
  if (!p.quantize) return launch_typed<T, kHadamard>(x, y, rows, channels, tile, threads, grid, dp, stream);
  if (p.symmetric) return launch_typed<T, kSymmetric>(x, y, rows, channels, tile, threads, grid, dp, stream);
  return launch_typed<T, kAsymmetric>(x, y, rows, channels, tile, threads, grid, dp, stream);
}

}  // namespace

const char* launch(const void* x, void* y, int64_t rows, int64_t channels, const OpParams& p, bool fp16,
                   void* stream) {
  if (rows <= 0 || channels <= 0) return nullptr;
  if (channels > (int64_t{1} << 30)) return "last axis too long";
  const int c = static_cast<int>(channels);
  const int max_tile = kMaxTileBytes / static_cast<int>(sizeof(float));
  const int align = p.block_size > 32 ? p.block_size : 32;  // whole Hadamard blocks and FP4 blocks
  const int tile = c <= max_tile ? c : (max_tile / align) * align;
  int threads = (c / 4 + 31) / 32 * 32;
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  const int64_t grid = rows < 2147483647 ? rows : 2147483647;
  DeviceParams dp{p.block_size, p.inv_sqrt_block, p.qmin(), p.qmax(), p.fp4, p.fp4_group(), p.tensor_scale};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = fp16 ? launch_mode<__half>(x, y, rows, c, tile, threads, grid, p, dp, s)
                               : launch_mode<float>(x, y, rows, c, tile, threads, grid, p, dp, s);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace perq
