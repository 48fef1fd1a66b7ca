// The vipo:: operator library: schemas, the Meta kernels that let torch.compile trace the
// ops (they check the arguments and compute nothing: every op writes into outputs the
// caller allocated, so there is no output shape to infer), and the Python module entry
// point, so `import vipo_kernels._C` loads the library and registers everything.
//
// Outputs are arguments marked (a!), in the style of torch's out= ops: the caller (the
// Python backends) allocates them, which keeps the test suite's NaN-poisoned buffers and
// the in-place backward (grad aliasing v) possible. Per-device kernels: ops_cpu.cpp and,
// in a CUDA build, ops_cuda.cpp.
#include <Python.h>
#include <torch/library.h>

#include "ops_common.h"

namespace vipo {
namespace {

void step_meta(const at::Tensor& v, const at::Tensor& z, const at::Tensor& noise,
               const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std,
               at::Tensor& next_out, at::Tensor& logp_out, int64_t block_p) {
  check_step({v, z, noise, cs, co, std}, next_out, logp_out, block_p);
}

void log_prob_meta(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                   const at::Tensor& cs, const at::Tensor& co, const at::Tensor& std,
                   at::Tensor& logp_out, int64_t block_p) {
  check_log_prob({v, z, x, cs, co, std}, logp_out, block_p);
}

void loss_position_meta(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                        const at::Tensor& old, const at::Tensor& adv, const at::Tensor& weights,
                        const c10::optional<at::Tensor>& amap, const at::Tensor& cs,
                        const at::Tensor& co, const at::Tensor& std,
                        const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& grad,
                        at::Tensor& partials_out, double, double, double, int64_t block_p) {
  check_loss_position({v, z, x, cs, co, std}, old, adv, weights, amap, ref, grad, partials_out,
                      block_p);
}

void reduce_partials_meta(const at::Tensor& partials, const at::Tensor& adv,
                          const at::Tensor& weights, const at::Tensor& std, at::Tensor& stats_out,
                          int64_t positions, double, double) {
  check_reduce_partials(partials, adv, weights, std, stats_out, positions);
}

void grad_sample_meta(const at::Tensor& v, const at::Tensor& z, const at::Tensor& x,
                      const at::Tensor& dlogp, const at::Tensor& cs, const at::Tensor& co,
                      const at::Tensor& std, const c10::optional<at::Tensor>& ref,
                      const c10::optional<at::Tensor>& grad, at::Tensor& kl_out, double,
                      int64_t block_p) {
  check_grad_sample({v, z, x, cs, co, std}, dlogp, ref, grad, kl_out, block_p);
}

void scale_grad_meta(at::Tensor& grad, const at::Tensor& dloss) { check_scale_grad(grad, dloss); }

}  // namespace

TORCH_LIBRARY(vipo, m) {
  // Latents v, z, x/noise, ref are (B, C, P) with positions at stride 1; cs, co, std, dlogp
  // are (B,) fp32; adv is (B, K) and weights (K,) fp32; old, amap are (B, P) fp32. block_p is
  // the positions per task (CPU) or per thread block (CUDA); partials have ceil(P / block_p)
  // blocks of the columns of partials.h. The loss's mean scale 1/(B P) comes from the shapes.
  m.def("step(Tensor v, Tensor z, Tensor noise, Tensor cs, Tensor co, Tensor std, "
        "Tensor(a!) next_out, Tensor(b!) logp_out, int block_p) -> ()");
  m.def("log_prob(Tensor v, Tensor z, Tensor x, Tensor cs, Tensor co, Tensor std, "
        "Tensor(a!) logp_out, int block_p) -> ()");
  m.def("loss_position(Tensor v, Tensor z, Tensor x, Tensor old, Tensor adv, Tensor weights, "
        "Tensor? amap, Tensor cs, Tensor co, Tensor std, Tensor? ref, Tensor(a!)? grad, "
        "Tensor(b!) partials_out, float clip_range, float adv_clip, float kl_coef, "
        "int block_p) -> ()");
  // The partials -> the statistics (partials.h), raising on a bad input value. CPU only: on
  // CUDA, vipo_kernels/partials.py reduces with torch ops, without a host sync.
  m.def("reduce_partials(Tensor partials, Tensor adv, Tensor weights, Tensor std, "
        "Tensor(a!) stats_out, int positions, float adv_clip, float kl_coef) -> ()");
  m.def("grad_sample(Tensor v, Tensor z, Tensor x, Tensor dlogp, Tensor cs, Tensor co, "
        "Tensor std, Tensor? ref, Tensor(a!)? grad, Tensor(b!) kl_out, float kl_coef, "
        "int block_p) -> ()");
  // loss_position then reduce_partials, returning the loss with its autograd in C++ (CPU):
  // backward scales the dL/dv written into grad (ops_cpu.cpp).
  m.def("fused_loss(Tensor v, Tensor z, Tensor x, Tensor old, Tensor adv, Tensor weights, "
        "Tensor? amap, Tensor cs, Tensor co, Tensor std, Tensor? ref, Tensor(a!) grad, "
        "Tensor(b!) partials_out, Tensor(c!) stats_out, float clip_range, float adv_clip, "
        "float kl_coef, int block_p) -> Tensor");
  // grad *= dloss, unless dloss is 1: read on the device, so backward needs no host sync.
  m.def("scale_grad(Tensor(a!) grad, Tensor dloss) -> ()");
}

TORCH_LIBRARY_IMPL(vipo, Meta, m) {
  m.impl("step", &step_meta);
  m.impl("log_prob", &log_prob_meta);
  m.impl("loss_position", &loss_position_meta);
  m.impl("reduce_partials", &reduce_partials_meta);
  m.impl("grad_sample", &grad_sample_meta);
  m.impl("scale_grad", &scale_grad_meta);
}

}  // namespace vipo

// An empty Python module: importing it runs the static registrations above. pybind11 stays
// a build dependency (requirements-dev.txt; the design names it) because torch's extension
// headers build on it: torch/extension.h, and the include paths BuildExtension adds, pull in
// torch/csrc/utils/pybind.h. This file needs no binding of its own (the ops are reached
// through TORCH_LIBRARY, i.e. torch.ops.vipo), so it includes only torch/library.h and a
// plain PyModuleDef, which keeps the build light (torch/extension.h alone takes minutes to
// compile here).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
