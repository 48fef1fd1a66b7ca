// CPU kernels of the SDE step, the log-prob and the fused ViPO loss (METHOD.md sections 1-4).
//
// llm.c style: plain loops over raw pointers with an OpenMP pragma, no torch headers; the
// torch binding (csrc/ops_cpu.cpp) checks arguments and allocates. Every latent is seen as
// (B, C, P) with positions at stride 1 and free batch/channel strides. One task owns one
// sample and a block of block_p positions with all C channels, as a Triton program does in
// vipo_kernels/triton_backend.py, so a position's channel sum, ratio, clip decision and
// gradient come out of one read of memory. Each task writes its own partial sums and the
// tasks' order of work is fixed, so results do not depend on the number of threads.
#pragma once

#include <cstdint>

#include "convert.h"

namespace vipo {

// A (B, C, P) latent: element (b, c, p) at ptr + b * stride_b + c * stride_c + p.
struct Latent {
  const void* ptr;
  DType dtype;
  int64_t stride_b;
  int64_t stride_c;
};

// (B,) fp32 per-sample step coefficients: mu = cs * z + co * v, N(mu, std^2).
struct StepCoefficients {
  const float* cs;
  const float* co;
  const float* std;
};

struct Sizes {
  int64_t B, C, P;
  int64_t block_p;  // positions per task; partial-sum outputs have ceil(P / block_p) blocks
};

// sample_noise: next = round(cs z + co v + std x) into next_out (B, C, P) of next_out.dtype,
//   then logp of the rounded value. Otherwise x is the next sample and next_out is unused.
// logp_out: (B, P) fp32 contiguous, channel-summed Gaussian log-density.
void gaussian_step_cpu(void* next_out, DType next_dtype, int64_t next_stride_b,
                       int64_t next_stride_c, float* logp_out, Latent v, Latent z, Latent x,
                       StepCoefficients coef, Sizes sizes, bool sample_noise, int num_threads);

// partials_out: (B, K, 8) fp32, per block [surrogate sum, KL sum, #ratio < 1-eps,
//   #ratio > 1+eps, sum log(ratio)^2, sum ratio, min ratio, max ratio].
// grad_out: (B, C, P) contiguous of grad_dtype, or null; may alias v (read before write).
// ref: reference model output or ptr == null. old, amap: (B, P) fp32 (amap may be null).
// adv: (B,) fp32, already clipped to +-adv_clip.
void loss_position_cpu(float* partials_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                       Latent x, Latent ref, const float* old, const float* amap,
                       const float* adv, StepCoefficients coef, Sizes sizes, double clip_range,
                       float kl_coef, float grad_scale, int num_threads);

// kl_out: (B, K) fp32 per-block sums of (mu - mu_ref)^2 / (2 std^2) (zeros without ref).
// grad_out as above: dlogp[b] * dl/dv + kl_coef * grad_scale * dKL/dv.
void grad_sample_cpu(float* kl_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                     Latent x, Latent ref, const float* dlogp, StepCoefficients coef,
                     Sizes sizes, float kl_coef, float grad_scale, int num_threads);

}  // namespace vipo
