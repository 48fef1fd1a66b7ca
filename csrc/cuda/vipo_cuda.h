// Host API of the CUDA kernels: launchers on raw pointers, sizes and a stream (llm.c
// style). No torch headers, so the .cu files compile with plain nvcc; the torch binding
// (csrc/ops_cuda.cpp) checks arguments, picks the stream and calls these.
//
// Layout and semantics are those of the CPU kernels (csrc/cpu/vipo_cpu.h) and of
// vipo_kernels/triton_backend.py: latents are (B, C, P) with positions at stride 1; one
// thread block owns one sample and block_p positions with all channels, each thread
// kVecPositions consecutive positions. v and ref share one dtype, z, x (or noise) and the
// next sample another.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../dtype.h"
#include "../partials.h"

namespace vipo {

constexpr int kVecPositions = 4;       // positions per thread
constexpr int kMaxThreadsPerBlock = 256;

// A (B, C, P) latent: element (b, c, p) at ptr + b * stride_b + c * stride_c + p elements.
struct CudaLatent {
  const void* ptr;
  int64_t stride_b;
  int64_t stride_c;
};

struct CudaStep {
  const float* cs;  // (B,) coefficients: mu = cs z + co v, N(mu, std^2)
  const float* co;
  const float* std;
  int64_t B, C, P;
  int64_t block_p;  // positions per thread block: kVecPositions x (32 .. 256 threads)
};

// True if block_p is a valid launch setting (a multiple of 32 * kVecPositions threads'
// worth of positions, at most kMaxThreadsPerBlock threads).
bool valid_block_p(int64_t block_p);

// sample_noise: next = round(cs z + co v + std x) into next_out (z's dtype, its own batch
// and channel strides), logp of the rounded value. Else x is the next sample.
// logp_out: (B, P) fp32 contiguous.
cudaError_t launch_gaussian_step(void* next_out, int64_t next_stride_b, int64_t next_stride_c,
                                 float* logp_out, CudaLatent v, CudaLatent z, CudaLatent x,
                                 DType v_dtype, DType z_dtype, CudaStep step,
                                 bool sample_noise, cudaStream_t stream);

// The fused loss's advantages: (B, K) fp32 raw values, clipped in the kernel to
// [-adv_clip, adv_clip], and the (K,) fp32 reward weights.
struct CudaAdvantages {
  const float* values;
  const float* weights;
  int64_t K;
  float adv_clip;
};

// partials_out: (B, n_blocks, partial::kCount) fp32 with n_blocks = ceil(P / block_p), the
// columns of ../partials.h. grad_out: (B, C, P) contiguous in v's dtype, or null; may alias v
// (read before write). ref.ptr may be null; amap may be null; old, amap (B, P) fp32.
cudaError_t launch_loss_position(float* partials_out, void* grad_out, CudaLatent v,
                                 CudaLatent z, CudaLatent x, CudaLatent ref, const float* old,
                                 const float* amap, CudaAdvantages adv, DType v_dtype,
                                 DType z_dtype, CudaStep step, double clip_range,
                                 float kl_coef, cudaStream_t stream);

// kl_out: (B, n_blocks) fp32 per-block sums of (mu - mu_ref)^2 / (2 std^2), zeros without ref.
// grad_out: dlogp[b] co (x - mu) / std^2 + kl_coef / (B P) co (mu - mu_ref) / std^2.
cudaError_t launch_grad_sample(float* kl_out, void* grad_out, CudaLatent v, CudaLatent z,
                               CudaLatent x, CudaLatent ref, const float* dlogp, DType v_dtype,
                               DType z_dtype, CudaStep step, float kl_coef, cudaStream_t stream);

// grad (n contiguous elements of dtype) *= *dloss, unless *dloss == 1: the value is read by
// the kernel, so the host never waits for it.
cudaError_t launch_scale_grad(void* grad, DType dtype, int64_t n, const float* dloss,
                              cudaStream_t stream);

}  // namespace vipo
