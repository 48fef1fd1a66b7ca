// Argument checks shared by the CPU, CUDA and Meta implementations of the vipo:: ops, in the
// manner of FlashAttention's flash_api.cpp: each message names the tensor and gives what was
// expected and what came. TORCH_CHECK_VALUE surfaces in Python as ValueError, a bad latent
// dtype (TORCH_CHECK_TYPE) as TypeError, like the public API's own checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "cpu/vipo_cpu.h"
#include "partials.h"

namespace vipo {

inline DType latent_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

// A (B, C, P) latent input: rank 3, the shape of v, positions at stride 1, same device.
inline void check_latent(const at::Tensor& t, const at::Tensor& v, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must be (B, C, P), got ", t.sizes());
  TORCH_CHECK_VALUE(t.sizes() == v.sizes(), name, " has shape ", t.sizes(), " but v has ", v.sizes());
  TORCH_CHECK_VALUE(t.device() == v.device(), name, " is on ", t.device(), " but v is on ", v.device());
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) == 1, name,
              " must have stride 1 along positions (dim 2), got strides ", t.strides());
  latent_dtype(t, name);
}

// (B,) contiguous fp32 per-sample values on v's device.
inline void check_per_sample(const at::Tensor& t, const at::Tensor& v, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == v.size(0), name, " must have shape (", v.size(0),
              ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == v.device(), name, " is on ", t.device(), " but v is on ", v.device());
}

// (B, P) contiguous fp32 per-position values (or (B, K) partial sums) on v's device.
inline void check_per_position(const at::Tensor& t, const at::Tensor& v, int64_t cols,
                               const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == v.size(0) && t.size(1) == cols, name,
              " must have shape (", v.size(0), ", ", cols, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == v.device(), name, " is on ", t.device(), " but v is on ", v.device());
}

inline int64_t num_position_blocks(const at::Tensor& v, int64_t block_p) {
  TORCH_CHECK_VALUE(block_p >= 1, "block_p must be >= 1, got ", block_p);
  return (v.size(2) + block_p - 1) / block_p;
}

// The gradient output: (B, C, P) contiguous in v's dtype (it may alias v).
inline void check_grad(const c10::optional<at::Tensor>& grad, const at::Tensor& v) {
  if (!grad.has_value()) return;
  TORCH_CHECK_VALUE(grad->sizes() == v.sizes() && grad->is_contiguous(),
              "grad must be a contiguous tensor of shape ", v.sizes(), ", got ", grad->sizes());
  TORCH_CHECK_VALUE(grad->scalar_type() == v.scalar_type(), "grad must have v's dtype ",
              v.scalar_type(), ", got ", grad->scalar_type());
  TORCH_CHECK_VALUE(grad->device() == v.device(), "grad is on ", grad->device(), " but v is on ",
              v.device());
}

struct StepArgs {
  const at::Tensor &v, &z, &x, &cs, &co, &std;
};

inline void check_step_inputs(const StepArgs& a) {
  check_latent(a.v, a.v, "v");
  check_latent(a.z, a.v, "z");
  check_latent(a.x, a.v, "x");
  check_per_sample(a.cs, a.v, "cs");
  check_per_sample(a.co, a.v, "co");
  check_per_sample(a.std, a.v, "std");
}

// Everything vipo::step checks, on any device (the Meta kernel runs exactly this).
inline void check_step(const StepArgs& a, const at::Tensor& next_out, const at::Tensor& logp_out,
                       int64_t block_p) {
  check_step_inputs(a);
  check_latent(next_out, a.v, "next_out");
  TORCH_CHECK_VALUE(next_out.scalar_type() == a.z.scalar_type(), "next_out must have z's dtype ",
              a.z.scalar_type(), ", got ", next_out.scalar_type());
  check_per_position(logp_out, a.v, a.v.size(2), "logp_out");
  num_position_blocks(a.v, block_p);
}

inline void check_log_prob(const StepArgs& a, const at::Tensor& logp_out, int64_t block_p) {
  check_step_inputs(a);
  check_per_position(logp_out, a.v, a.v.size(2), "logp_out");
  num_position_blocks(a.v, block_p);
}

// (B, K) advantages and their (K,) weights, contiguous fp32 on v's device.
inline void check_advantages(const at::Tensor& adv, const at::Tensor& weights, const at::Tensor& v) {
  TORCH_CHECK_VALUE(adv.dim() == 2 && adv.size(0) == v.size(0) && adv.size(1) >= 1, "adv must have shape (",
              v.size(0), ", K), got ", adv.sizes());
  check_per_position(adv, v, adv.size(1), "adv");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == adv.size(1), "weights must have shape (",
              adv.size(1), ",), got ", weights.sizes());
  TORCH_CHECK_VALUE(weights.scalar_type() == at::kFloat && weights.is_contiguous(),
              "weights must be a contiguous float32 tensor, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == v.device(), "weights is on ", weights.device(),
              " but v is on ", v.device());
}

// A contiguous fp32 output of the given shape on v's device.
inline void check_output(const at::Tensor& out, c10::IntArrayRef shape, const at::Tensor& v,
                         const char* name) {
  TORCH_CHECK_VALUE(out.sizes() == shape && out.scalar_type() == at::kFloat && out.is_contiguous(),
              name, " must be a contiguous float32 tensor of shape ", shape, ", got ", out.sizes(),
              " ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == v.device(), name, " is on ", out.device(), " but v is on ",
              v.device());
}

inline void check_loss_position(const StepArgs& a, const at::Tensor& old, const at::Tensor& adv,
                                const at::Tensor& weights, const c10::optional<at::Tensor>& amap,
                                const c10::optional<at::Tensor>& ref,
                                const c10::optional<at::Tensor>& grad,
                                const at::Tensor& partials_out, int64_t block_p) {
  check_step_inputs(a);
  check_per_position(old, a.v, a.v.size(2), "old");
  check_advantages(adv, weights, a.v);
  if (amap.has_value()) check_per_position(*amap, a.v, a.v.size(2), "amap");
  if (ref.has_value()) check_latent(*ref, a.v, "ref");
  check_grad(grad, a.v);
  const int64_t blocks = num_position_blocks(a.v, block_p);
  check_output(partials_out, {a.v.size(0), blocks, int64_t{partial::kCount}}, a.v, "partials_out");
}

// partials (B, n_blocks, partial::kCount) -> stats_out (stat::kCount + K,).
inline void check_reduce_partials(const at::Tensor& partials, const at::Tensor& adv,
                                  const at::Tensor& weights, const at::Tensor& std,
                                  const at::Tensor& stats_out, int64_t positions) {
  TORCH_CHECK_VALUE(partials.dim() == 3 && partials.size(2) == partial::kCount &&
                        partials.scalar_type() == at::kFloat && partials.is_contiguous(),
                    "partials must be a contiguous float32 tensor of shape (B, n_blocks, ",
                    int64_t{partial::kCount}, "), got ", partials.sizes(), " ", partials.scalar_type());
  check_advantages(adv, weights, partials);
  check_per_sample(std, partials, "std");
  TORCH_CHECK_VALUE(positions >= 1, "positions must be >= 1, got ", positions);
  check_output(stats_out, {stat::kCount + adv.size(1)}, partials, "stats_out");
}

// The upstream gradient of the loss: one fp32 value on grad's device.
inline void check_scale_grad(const at::Tensor& grad, const at::Tensor& dloss) {
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad must be contiguous");
  latent_dtype(grad, "grad");
  TORCH_CHECK_VALUE(dloss.numel() == 1 && dloss.scalar_type() == at::kFloat,
              "dloss must hold one float32 value, got ", dloss.sizes(), " ", dloss.scalar_type());
  TORCH_CHECK_VALUE(dloss.device() == grad.device(), "dloss is on ", dloss.device(),
              " but grad is on ", grad.device());
}

inline void check_grad_sample(const StepArgs& a, const at::Tensor& dlogp,
                              const c10::optional<at::Tensor>& ref,
                              const c10::optional<at::Tensor>& grad, const at::Tensor& kl_out,
                              int64_t block_p) {
  check_step_inputs(a);
  check_per_sample(dlogp, a.v, "dlogp");
  if (ref.has_value()) check_latent(*ref, a.v, "ref");
  check_grad(grad, a.v);
  check_per_position(kl_out, a.v, num_position_blocks(a.v, block_p), "kl_out");
}

}  // namespace vipo
