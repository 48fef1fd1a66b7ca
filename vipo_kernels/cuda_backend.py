"""``backend="cuda"``: the CUDA kernels of csrc/cuda/ for CUDA tensors.

Same four primitives, signatures and semantics as ``triton_backend``. Available where
the extension was built with CUDA (torch with CUDA and nvcc at build time); otherwise
importing this module raises ImportError, which ``backends`` reports with how to build.

The kernels are compiled for two dtypes each launch: the model's (v and ref) and the
latents' (z and x / noise), so 9 instantiations cover every realistic mix. A rarer mix
(x or noise not in z's dtype, ref not in v's) is converted here first, at the cost of one
copy of that tensor.
"""

from __future__ import annotations

import torch

from . import _compiled

if not torch._C._dispatch_has_kernel_for_dispatch_key("vipo::step", "CUDA"):
    raise ImportError("vipo_kernels._C was built without CUDA kernels (torch "
                      f"{torch.__version__} without CUDA, or no nvcc at build time)")

N_STATS = _compiled.N_STATS
VEC = 4  # positions per thread (csrc/cuda/common.cuh kVec)
_SMS: dict[int, int] = {}


def block_positions(B: int, P: int, device: torch.device) -> int:
    """Positions per thread block: VEC per thread, 32 to 256 threads. The largest block
    that still gives about 4 blocks per SM, so small latents fill the GPU. A heuristic,
    not tuned on hardware (benchmarks/gpu_table.py times it)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    for threads in (256, 128, 64):
        if B * -(-P // (threads * VEC)) >= 4 * _SMS[index]:
            return threads * VEC
    return 32 * VEC


def _like(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def step(v, z, noise, cs, co, std, *, next_out=None, logp_out=None):
    return _compiled.step(block_positions(z.shape[0], z.shape[2], z.device), v, z,
                          _like(noise, z.dtype), cs, co, std, next_out=next_out,
                          logp_out=logp_out)


def log_prob(v, z, x, cs, co, std, *, logp_out=None):
    return _compiled.log_prob(block_positions(z.shape[0], z.shape[2], z.device), v, z,
                              _like(x, z.dtype), cs, co, std, logp_out=logp_out)


def loss_position(v, z, x, old, adv, amap, cs, co, std, ref, grad, *, clip_range, kl_coef,
                  grad_scale, partials_out=None):
    """(B, K, 8) per-block sums, see ``triton_backend.loss_position``; dL/dv into ``grad``."""
    return _compiled.loss_position(block_positions(z.shape[0], z.shape[2], z.device), v, z,
                                   _like(x, z.dtype), old, adv, amap, cs, co, std,
                                   _like(ref, v.dtype), grad, clip_range=clip_range,
                                   kl_coef=kl_coef, grad_scale=grad_scale,
                                   partials_out=partials_out)


def grad_sample(v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef, grad_scale, kl_out=None):
    """(B, K) KL sums, see ``triton_backend.grad_sample``; dlogp[b] * dl/dv into ``grad``."""
    return _compiled.grad_sample(block_positions(z.shape[0], z.shape[2], z.device), v, z,
                                 _like(x, z.dtype), dlogp, cs, co, std, _like(ref, v.dtype),
                                 grad, kl_coef=kl_coef, grad_scale=grad_scale, kl_out=kl_out)
