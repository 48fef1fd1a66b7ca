// CUDA kernels of the vipo:: ops (schemas in ops.cpp), compiled only in a CUDA build: the
// shared checks, a device guard and the current stream (FlashAttention's flash_api.cpp
// pattern), then the launchers of csrc/cuda/, which take raw pointers and no torch types.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/vipo_cuda.h"
#include "ops_common.h"

namespace vipo {
namespace {

CudaLatent latent(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

CudaLatent optional_latent(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? latent(*t) : CudaLatent{nullptr, 0, 0};
}

// The CUDA kernels are instantiated for (v's dtype, z's dtype): x or noise must come in
// z's dtype and ref in v's (vipo_kernels/cuda_backend.py converts the rare other mixes).
void check_cuda_dtypes(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                       const c10::optional<at::Tensor>& ref, int64_t block_p) {
  TORCH_CHECK_VALUE(x.scalar_type() == z.scalar_type(), "x (or noise) must have z's dtype ",
                    z.scalar_type(), " on CUDA, got ", x.scalar_type());
  TORCH_CHECK_VALUE(!ref.has_value() || ref->scalar_type() == v.scalar_type(),
                    "ref must have v's dtype ", v.scalar_type(), " on CUDA, got ",
                    ref.has_value() ? ref->scalar_type() : v.scalar_type());
  TORCH_CHECK_VALUE(valid_block_p(block_p), "block_p must be a multiple of ",
                    32 * kVecPositions, " and at most ", kMaxThreadsPerBlock * kVecPositions,
                    " on CUDA, got ", block_p);
}

CudaStep step_args(const at::Tensor& v, const at::Tensor& cs, const at::Tensor& co,
                   const at::Tensor& std, int64_t block_p) {
  return {cs.data_ptr<float>(), co.data_ptr<float>(), std.data_ptr<float>(),
          v.size(0),           v.size(1),           v.size(2),
          block_p};
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "vipo::", op, ": CUDA launch failed: ",
              cudaGetErrorString(err));
}

void step_cuda(const at::Tensor& v, const at::Tensor& z, const at::Tensor& noise,
               const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std,
               at::Tensor& next_out, at::Tensor& logp_out, int64_t block_p) {
  check_step({v, z, noise, cs, co, std}, next_out, logp_out, block_p);
  check_cuda_dtypes(v, z, noise, c10::nullopt, block_p);
  const c10::cuda::CUDAGuard guard(v.device());
  check_launch(launch_gaussian_step(next_out.data_ptr(), next_out.stride(0), next_out.stride(1),
                                    logp_out.data_ptr<float>(), latent(v), latent(z),
                                    latent(noise), latent_dtype(v, "v"), latent_dtype(z, "z"),
                                    step_args(v, cs, co, std, block_p), /*sample_noise=*/true,
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "step");
}

void log_prob_cuda(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                   const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std,
                   at::Tensor& logp_out, int64_t block_p) {
  check_log_prob({v, z, x, cs, co, std}, logp_out, block_p);
  check_cuda_dtypes(v, z, x, c10::nullopt, block_p);
  const c10::cuda::CUDAGuard guard(v.device());
  check_launch(launch_gaussian_step(nullptr, 0, 0, logp_out.data_ptr<float>(), latent(v),
                                    latent(z), latent(x), latent_dtype(v, "v"),
                                    latent_dtype(z, "z"), step_args(v, cs, co, std, block_p),
                                    /*sample_noise=*/false,
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "log_prob");
}

void loss_position_cuda(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                        const at::Tensor& old, const at::Tensor& adv, const at::Tensor& weights,
                        const c10::optional<at::Tensor>& amap, const at::Tensor& cs,
                        const at::Tensor& co, const at::Tensor& std,
                        const c10::optional<at::Tensor>& ref,
                        const c10::optional<at::Tensor>& grad, at::Tensor& partials_out,
                        double clip_range, double adv_clip, double kl_coef, int64_t block_p) {
  check_loss_position({v, z, x, cs, co, std}, old, adv, weights, amap, ref, grad, partials_out,
                      block_p);
  check_cuda_dtypes(v, z, x, ref, block_p);
  const c10::cuda::CUDAGuard guard(v.device());
  const CudaAdvantages advantages{adv.data_ptr<float>(), weights.data_ptr<float>(), adv.size(1),
                                  static_cast<float>(adv_clip)};
  check_launch(
      launch_loss_position(partials_out.data_ptr<float>(),
                           grad.has_value() ? grad->data_ptr() : nullptr, latent(v), latent(z),
                           latent(x), optional_latent(ref), old.data_ptr<float>(),
                           amap.has_value() ? amap->data_ptr<float>() : nullptr, advantages,
                           latent_dtype(v, "v"), latent_dtype(z, "z"),
                           step_args(v, cs, co, std, block_p), clip_range,
                           static_cast<float>(kl_coef), c10::cuda::getCurrentCUDAStream().stream()),
      "loss_position");
}

void grad_sample_cuda(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                      const at::Tensor& dlogp, const at::Tensor& cs, const at::Tensor& co,
                      const at::Tensor& std, const c10::optional<at::Tensor>& ref,
                      const c10::optional<at::Tensor>& grad, at::Tensor& kl_out,
                      double kl_coef, int64_t block_p) {
  check_grad_sample({v, z, x, cs, co, std}, dlogp, ref, grad, kl_out, block_p);
  check_cuda_dtypes(v, z, x, ref, block_p);
  const c10::cuda::CUDAGuard guard(v.device());
  check_launch(launch_grad_sample(kl_out.data_ptr<float>(),
                                  grad.has_value() ? grad->data_ptr() : nullptr, latent(v),
                                  latent(z), latent(x), optional_latent(ref),
                                  dlogp.data_ptr<float>(), latent_dtype(v, "v"),
                                  latent_dtype(z, "z"), step_args(v, cs, co, std, block_p),
                                  static_cast<float>(kl_coef),
                                  c10::cuda::getCurrentCUDAStream().stream()),
               "grad_sample");
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& dloss) {
  check_scale_grad(grad, dloss);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_launch(launch_scale_grad(grad.data_ptr(), latent_dtype(grad, "grad"), grad.numel(),
                                 dloss.data_ptr<float>(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "scale_grad");
}

}  // namespace

TORCH_LIBRARY_IMPL(vipo, CUDA, m) {
  m.impl("step", &step_cuda);
  m.impl("log_prob", &log_prob_cuda);
  m.impl("loss_position", &loss_position_cuda);
  m.impl("grad_sample", &grad_sample_cuda);
  m.impl("scale_grad", &scale_grad_cuda);
}

}  // namespace vipo
