// CUDA SDE step and log-prob (docs/method.md sections 1-2); host API in vipo_cuda.h. Mirrors
// _gaussian_step_kernel of vipo_kernels/triton_backend.py and csrc/cpu/step_cpu.cpp.
#include "common.cuh"

namespace vipo {
namespace {

using cuda_detail::kVec;

// One thread block: sample b, block_p positions, all channels; one thread: kVec positions.
template <typename TV, typename TZ, bool kSampleNoise>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    gaussian_step_kernel(TZ* next_out, int64_t next_stride_b, int64_t next_stride_c,
                         float* __restrict__ logp_out, const TV* v, const TZ* z, const TZ* x,
                         int64_t v_stride_b, int64_t v_stride_c, int64_t z_stride_b,
                         int64_t z_stride_c, int64_t x_stride_b, int64_t x_stride_c,
                         const float* __restrict__ cs_ptr, const float* __restrict__ co_ptr,
                         const float* __restrict__ std_ptr, int64_t C, int64_t P,
                         int64_t n_blocks, int64_t block_p, bool aligned) {
  const cuda_detail::Tile t = cuda_detail::tile(n_blocks, block_p);
  if (t.p >= P) return;  // no reduction below, so idle threads may leave
  const float cs = cs_ptr[t.b], co = co_ptr[t.b], sd = std_ptr[t.b];
  double sq[kVec] = {};  // sum_c diff^2 in double, see csrc/cpu/common.h
  for (int64_t c = 0; c < C; ++c) {
    float vv[kVec], zz[kVec], xx[kVec], target[kVec];
    cuda_detail::load_positions(v + t.b * v_stride_b + c * v_stride_c, t.p, P, aligned, vv);
    cuda_detail::load_positions(z + t.b * z_stride_b + c * z_stride_c, t.p, P, aligned, zz);
    cuda_detail::load_positions(x + t.b * x_stride_b + c * x_stride_c, t.p, P, aligned, xx);
    float mean[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      mean[i] = __fadd_rn(__fmul_rn(cs, zz[i]), __fmul_rn(co, vv[i]));  // the reference's order
      target[i] = xx[i];
    }
    if (kSampleNoise) {
      float nxt[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) nxt[i] = __fadd_rn(mean[i], __fmul_rn(sd, xx[i]));
      TZ* row = next_out + t.b * next_stride_b + c * next_stride_c;
      cuda_detail::store_positions(row, t.p, P, aligned, nxt);
      // The log-prob is of the stored (rounded) value, so a recompute from it matches.
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        target[i] = cuda_detail::to_float(cuda_detail::from_float<TZ>(nxt[i]));
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float d = target[i] - mean[i];
      sq[i] += static_cast<double>(d) * d;
    }
  }
  const double norm = static_cast<double>(C) * (log(static_cast<double>(sd)) +
                                                cuda_detail::kHalfLog2Pi);
  const double two_var = 2.0 * sd * sd;
#pragma unroll
  for (int i = 0; i < kVec; ++i)
    if (t.p + i < P) logp_out[t.b * P + t.p + i] = static_cast<float>(-sq[i] / two_var - norm);
}

}  // namespace

bool valid_block_p(int64_t block_p) {
  return block_p > 0 && block_p % (32 * kVecPositions) == 0 &&
         block_p / kVecPositions <= kMaxThreadsPerBlock;
}

cudaError_t launch_gaussian_step(void* next_out, int64_t next_stride_b, int64_t next_stride_c,
                                 float* logp_out, CudaLatent v, CudaLatent z, CudaLatent x,
                                 DType v_dtype, DType z_dtype, CudaStep s, bool sample_noise,
                                 cudaStream_t stream) {
  int64_t n_blocks;
  dim3 grid, block;
  cudaError_t err = cuda_detail::grid_for(s, &n_blocks, &grid, &block);
  if (err != cudaSuccess) return err;
  return cuda_detail::dispatch_dtype(v_dtype, [&](auto v_tag) {
    using TV = typename decltype(v_tag)::type;
    return cuda_detail::dispatch_dtype(z_dtype, [&](auto z_tag) {
      using TZ = typename decltype(z_tag)::type;
      const bool aligned =
          cuda_detail::pack_aligned<TV>(v.ptr, v.stride_b, v.stride_c) &&
          cuda_detail::pack_aligned<TZ>(z.ptr, z.stride_b, z.stride_c) &&
          cuda_detail::pack_aligned<TZ>(x.ptr, x.stride_b, x.stride_c) &&
          (!sample_noise || cuda_detail::pack_aligned<TZ>(next_out, next_stride_b, next_stride_c));
      auto kernel = sample_noise ? gaussian_step_kernel<TV, TZ, true>
                                 : gaussian_step_kernel<TV, TZ, false>;
      kernel<<<grid, block, 0, stream>>>(
          static_cast<TZ*>(next_out), next_stride_b, next_stride_c, logp_out,
          static_cast<const TV*>(v.ptr), static_cast<const TZ*>(z.ptr),
          static_cast<const TZ*>(x.ptr), v.stride_b, v.stride_c, z.stride_b, z.stride_c,
          x.stride_b, x.stride_c, s.cs, s.co, s.std, s.C, s.P, n_blocks, s.block_p, aligned);
      return cudaGetLastError();
    });
  });
}

}  // namespace vipo
