// CPU kernels of the SDE step, the log-prob and the fused ViPO loss (docs/method.md sections 1-4).
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

#include "../partials.h"
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

// The advantages of the fused loss: (B, K) fp32 raw values A, clipped in the kernel to
// [-adv_clip, adv_clip], and the (K,) fp32 reward weights w.
struct Advantages {
  const float* values;
  const float* weights;
  int64_t K;
  float adv_clip;
};

// partials_out: (B, n_blocks, partial::kCount) fp32, one row per block (csrc/partials.h).
// grad_out: (B, C, P) contiguous of grad_dtype, or null; may alias v (read before write);
//   dL/dv = sum_k w_k dL_clip(A_k)/dv + dL_KL/dv, with the 1/(B|P|) of the mean.
// ref: reference model output or ptr == null. old, amap: (B, P) fp32 (amap may be null).
void loss_position_cpu(float* partials_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                       Latent x, Latent ref, const float* old, const float* amap,
                       Advantages adv, StepCoefficients coef, Sizes sizes, double clip_range,
                       float kl_coef, int num_threads);

// The partials (B, n_blocks, partial::kCount) -> stats_out (stat::kCount + K,) fp32, the
// statistics then the unweighted clip loss of each reward; sums in double, in a fixed order.
// Returns null, or the message of the first bad input (std, advantages, old, map).
const char* reduce_partials_cpu(const float* partials, int64_t B, int64_t n_blocks,
                                int64_t positions, Advantages adv, const float* std,
                                double kl_coef, float* stats_out);

// kl_out: (B, K) fp32 per-block sums of (mu - mu_ref)^2 / (2 std^2) (zeros without ref).
// grad_out as above: dlogp[b] * dl/dv + kl_coef / (B|P|) * dKL/dv.
void grad_sample_cpu(float* kl_out, void* grad_out, DType grad_dtype, Latent v, Latent z,
                     Latent x, Latent ref, const float* dlogp, StepCoefficients coef,
                     Sizes sizes, float kl_coef, int num_threads);

}  // namespace vipo
