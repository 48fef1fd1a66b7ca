// CPU kernels of the vipo:: ops (schemas in ops.cpp): checks, then the OpenMP loops of
// csrc/cpu/ on raw pointers. The thread count is torch's (torch.set_num_threads), passed
// explicitly because OpenMP's setting is per calling thread.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops_common.h"

namespace vipo {
namespace {

Latent latent(const at::Tensor& t) {
  return {t.data_ptr(), latent_dtype(t, "latent"), t.stride(0), t.stride(1)};
}

Latent optional_latent(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? latent(*t) : Latent{nullptr, DType::kFloat32, 0, 0};
}

StepCoefficients coefficients(const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std) {
  return {cs.data_ptr<float>(), co.data_ptr<float>(), std.data_ptr<float>()};
}

Sizes sizes(const at::Tensor& v, int64_t block_p) {
  return {v.size(0), v.size(1), v.size(2), block_p};
}

void step_cpu(const at::Tensor& v, const at::Tensor& z, const at::Tensor& noise,
              const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std,
              at::Tensor& next_out, at::Tensor& logp_out, int64_t block_p) {
  check_step({v, z, noise, cs, co, std}, next_out, logp_out, block_p);
  gaussian_step_cpu(next_out.data_ptr(), latent_dtype(next_out, "next_out"), next_out.stride(0),
                    next_out.stride(1), logp_out.data_ptr<float>(), latent(v), latent(z),
                    latent(noise), coefficients(cs, co, std), sizes(v, block_p),
                    /*sample_noise=*/true, at::get_num_threads());
}

void log_prob_cpu(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                  const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std,
                  at::Tensor& logp_out, int64_t block_p) {
  check_log_prob({v, z, x, cs, co, std}, logp_out, block_p);
  gaussian_step_cpu(nullptr, DType::kFloat32, 0, 0, logp_out.data_ptr<float>(), latent(v),
                    latent(z), latent(x), coefficients(cs, co, std), sizes(v, block_p),
                    /*sample_noise=*/false, at::get_num_threads());
}

Advantages advantages(const at::Tensor& adv, const at::Tensor& weights, double adv_clip) {
  return {adv.data_ptr<float>(), weights.data_ptr<float>(), adv.size(1),
          static_cast<float>(adv_clip)};
}

void loss_position_cpu_op(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                          const at::Tensor& old, const at::Tensor& adv, const at::Tensor& weights,
                          const c10::optional<at::Tensor>& amap, const at::Tensor& cs,
                          const at::Tensor& co, const at::Tensor& std,
                          const c10::optional<at::Tensor>& ref,
                          const c10::optional<at::Tensor>& grad, at::Tensor& partials_out,
                          double clip_range, double adv_clip, double kl_coef, int64_t block_p) {
  check_loss_position({v, z, x, cs, co, std}, old, adv, weights, amap, ref, grad, partials_out,
                      block_p);
  loss_position_cpu(partials_out.data_ptr<float>(), grad.has_value() ? grad->data_ptr() : nullptr,
                    latent_dtype(v, "v"), latent(v), latent(z), latent(x), optional_latent(ref),
                    old.data_ptr<float>(), amap.has_value() ? amap->data_ptr<float>() : nullptr,
                    advantages(adv, weights, adv_clip), coefficients(cs, co, std),
                    sizes(v, block_p), clip_range, static_cast<float>(kl_coef),
                    at::get_num_threads());
}

void reduce_partials_cpu_op(const at::Tensor& partials, const at::Tensor& adv,
                            const at::Tensor& weights, const at::Tensor& std,
                            at::Tensor& stats_out, int64_t positions, double adv_clip,
                            double kl_coef) {
  check_reduce_partials(partials, adv, weights, std, stats_out, positions);
  const char* bad = reduce_partials_cpu(partials.data_ptr<float>(), partials.size(0),
                                        partials.size(1), positions,
                                        advantages(adv, weights, adv_clip), std.data_ptr<float>(),
                                        kl_coef, stats_out.data_ptr<float>());
  TORCH_CHECK_VALUE(bad == nullptr, bad);
}

void grad_sample_cpu_op(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                        const at::Tensor& dlogp, const at::Tensor& cs, const at::Tensor& co,
                        const at::Tensor& std, const c10::optional<at::Tensor>& ref,
                        const c10::optional<at::Tensor>& grad, at::Tensor& kl_out,
                        double kl_coef, int64_t block_p) {
  check_grad_sample({v, z, x, cs, co, std}, dlogp, ref, grad, kl_out, block_p);
  grad_sample_cpu(kl_out.data_ptr<float>(), grad.has_value() ? grad->data_ptr() : nullptr,
                  latent_dtype(v, "v"), latent(v), latent(z), latent(x), optional_latent(ref),
                  dlogp.data_ptr<float>(), coefficients(cs, co, std), sizes(v, block_p),
                  static_cast<float>(kl_coef), at::get_num_threads());
}

// On the CPU the upstream gradient is read directly: that is no device sync.
void scale_grad_cpu(at::Tensor& grad, const at::Tensor& dloss) {
  check_scale_grad(grad, dloss);
  if (dloss.item<float>() != 1.0f) grad.mul_(dloss);
}

// The position-level loss with its autograd in C++: forward runs the kernel pass and the
// reduction, and keeps dL/dv (written into grad); backward scales it by the upstream
// gradient. vipo_kernels/autograd.py's _FusedLoss does the same in Python for the other
// backends; on the CPU the Python wrapper and its backward cost about 0.1 ms a call, a third
// of the kernel itself at the Flux size (measured, benchmarks/RESULTS.md).
class FusedLossCpu : public torch::autograd::Function<FusedLossCpu> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& v,
                            const at::Tensor& z, const at::Tensor& x, const at::Tensor& old,
                            const at::Tensor& adv, const at::Tensor& weights,
                            const c10::optional<at::Tensor>& amap, const at::Tensor& cs,
                            const at::Tensor& co, const at::Tensor& std,
                            const c10::optional<at::Tensor>& ref, at::Tensor grad,
                            at::Tensor partials, at::Tensor stats, double clip_range,
                            double adv_clip, double kl_coef, int64_t block_p) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    loss_position_cpu_op(v, z, x, old, adv, weights, amap, cs, co, std, ref, grad, partials,
                         clip_range, adv_clip, kl_coef, block_p);
    reduce_partials_cpu_op(partials, adv, weights, std, stats, v.size(2), adv_clip, kl_coef);
    ctx->saved_data["grad"] = grad;
    return stats.select(0, stat::kLoss).clone();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_loss) {
    auto saved = ctx->saved_data.find("grad");
    TORCH_CHECK(saved != ctx->saved_data.end(),
                "vipo_loss: this loss was already backpropagated once and its gradient buffer "
                "handed on; call vipo_loss again for another backward pass");
    // Handed on, not kept: autograd then takes it as a leaf's gradient without a copy.
    at::Tensor grad = saved->second.toTensor();
    ctx->saved_data.erase(saved);
    scale_grad_cpu(grad, grad_loss[0].to(at::kFloat));
    torch::autograd::variable_list out(18);  // one per forward argument; only v has one
    out[0] = grad;
    return out;
  }
};

at::Tensor fused_loss_autograd(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                               const at::Tensor& old, const at::Tensor& adv,
                               const at::Tensor& weights, const c10::optional<at::Tensor>& amap,
                               const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std,
                               const c10::optional<at::Tensor>& ref, at::Tensor& grad,
                               at::Tensor& partials, at::Tensor& stats, double clip_range,
                               double adv_clip, double kl_coef, int64_t block_p) {
  return FusedLossCpu::apply(v, z, x, old, adv, weights, amap, cs, co, std, ref, grad, partials,
                             stats, clip_range, adv_clip, kl_coef, block_p);
}

}  // namespace

TORCH_LIBRARY_IMPL(vipo, Autograd, m) { m.impl("fused_loss", &fused_loss_autograd); }

TORCH_LIBRARY_IMPL(vipo, CPU, m) {
  m.impl("step", &step_cpu);
  m.impl("log_prob", &log_prob_cpu);
  m.impl("loss_position", &loss_position_cpu_op);
  m.impl("reduce_partials", &reduce_partials_cpu_op);
  m.impl("grad_sample", &grad_sample_cpu_op);
  m.impl("scale_grad", &scale_grad_cpu);
}

}  // namespace vipo
