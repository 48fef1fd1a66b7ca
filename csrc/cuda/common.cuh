// Device helpers shared by the CUDA kernels: fp32 conversion of fp32/bf16/fp16, vectorised
// loads and stores of kVecPositions consecutive positions, a deterministic block
// reduction, and the dtype dispatch of the launchers. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "vipo_cuda.h"

namespace vipo {
namespace cuda_detail {

constexpr int kVec = kVecPositions;
constexpr double kHalfLog2Pi = 0.91893853320467274178;  // log(2 pi) / 2

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

// Round to nearest even, as torch's .to() does.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// kVec elements in one aligned access: 16 bytes for fp32, 8 for 16-bit types.
template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Positions [p, p + kVec) of a row as fp32, 0 beyond P. One vector load when the launcher
// found every pointer and stride aligned to a pack; element loads for the ragged tail.
template <typename T>
__device__ __forceinline__ void load_positions(const T* row, int64_t p, int64_t P, bool aligned,
                                               float (&out)[kVec]) {
  if (aligned && p + kVec <= P) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + p);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = p + i < P ? to_float(row[p + i]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_positions(T* row, int64_t p, int64_t P, bool aligned,
                                                const float (&in)[kVec]) {
  if (aligned && p + kVec <= P) {
    Pack<T> pack;
#pragma unroll
    for (int i = 0; i < kVec; ++i) pack.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T>*>(row + p) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (p + i < P) row[p + i] = from_float<T>(in[i]);
  }
}

// Which (sample, position block) a thread block owns. A 1-D grid, because the second
// grid dimension stops at 65535 and the batch must not.
struct Tile {
  int64_t b, block, p;  // p: this thread's first position
};

__device__ __forceinline__ Tile tile(int64_t n_blocks, int64_t block_p) {
  const int64_t task = blockIdx.x;
  Tile t;
  t.b = task / n_blocks;
  t.block = task % n_blocks;
  t.p = t.block * block_p + static_cast<int64_t>(threadIdx.x) * kVec;
  return t;
}

// Reduces N values per thread over the block: a min at index kMin, a max at index kMax (-1:
// none), sums elsewhere. A fixed shuffle tree then a fixed pass over warps, so the result
// does not depend on scheduling. Returns the totals in thread 0's array (others: unspecified).
template <int N, int kMin, int kMax>
__device__ __forceinline__ float combine(int k, float a, float b) {
  return k == kMin ? fminf(a, b) : (k == kMax ? fmaxf(a, b) : a + b);
}

template <int N, int kMin, int kMax>
__device__ __forceinline__ void block_reduce(float (&vals)[N]) {
  __shared__ float shared[kMaxThreadsPerBlock / 32][N];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n_warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < N; ++k)
      vals[k] = combine<N, kMin, kMax>(k, vals[k], __shfl_xor_sync(0xffffffffu, vals[k], offset));
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) shared[warp][k] = vals[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < n_warps; ++w) {
#pragma unroll
      for (int k = 0; k < N; ++k) vals[k] = combine<N, kMin, kMax>(k, vals[k], shared[w][k]);
    }
  }
}

// True if ptr and both strides keep every kVec-position pack of T aligned.
template <typename T>
inline bool pack_aligned(const void* ptr, int64_t stride_b, int64_t stride_c) {
  return ptr == nullptr ||
         (reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0 && stride_b % kVec == 0 &&
          stride_c % kVec == 0);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the C++ type of dtype.
template <typename F>
inline cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

// Grid of one thread block per (sample, position block); checks the launch is legal.
inline cudaError_t grid_for(const CudaStep& s, int64_t* n_blocks, dim3* grid, dim3* block) {
  if (!valid_block_p(s.block_p) || s.B < 1 || s.C < 1 || s.P < 1) return cudaErrorInvalidValue;
  *n_blocks = (s.P + s.block_p - 1) / s.block_p;
  const int64_t tasks = *n_blocks * s.B;
  if (tasks > INT32_MAX) return cudaErrorInvalidConfiguration;
  *grid = dim3(static_cast<unsigned>(tasks));
  *block = dim3(static_cast<unsigned>(s.block_p / kVec));
  return cudaSuccess;
}

}  // namespace cuda_detail
}  // namespace vipo
