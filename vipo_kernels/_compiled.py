"""The four kernel-backend primitives (see ``triton_backend``) on top of the compiled
``torch.ops.vipo`` ops of csrc/, shared by ``cpp_backend`` and ``cuda_backend``.

The ops write into outputs allocated here (``new_buffer``, so the test suite's NaN
poisoning reaches them) and take ``block_p``, the positions one task (CPU) or one thread
block (CUDA) owns; the loss partials have ``ceil(P / block_p)`` blocks. Importing this
module loads the extension, so an unbuilt extension is an ImportError, which
``backends`` turns into an error that says how to build it.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.vipo)
from .buffers import new_buffer

N_STATS = 8
ops = torch.ops.vipo


def _blocks(P: int, block_p: int) -> int:
    return -(-P // block_p)


def step(block_p, v, z, noise, cs, co, std, *, next_out=None, logp_out=None):
    B, C, P = z.shape
    if next_out is None:
        next_out = new_buffer((B, C, P), z.dtype, z.device)
    if logp_out is None:
        logp_out = new_buffer((B, P), torch.float32, z.device)
    ops.step(v, z, noise, cs, co, std, next_out, logp_out, block_p)
    return next_out, logp_out


def log_prob(block_p, v, z, x, cs, co, std, *, logp_out=None):
    B, _, P = z.shape
    if logp_out is None:
        logp_out = new_buffer((B, P), torch.float32, z.device)
    ops.log_prob(v, z, x, cs, co, std, logp_out, block_p)
    return logp_out


def loss_position(block_p, v, z, x, old, adv, amap, cs, co, std, ref, grad, *, clip_range,
                  kl_coef, grad_scale, partials_out=None):
    B, _, P = z.shape
    if partials_out is None:
        partials_out = new_buffer((B, _blocks(P, block_p), N_STATS), torch.float32, z.device)
    ops.loss_position(v, z, x, old, adv, amap, cs, co, std, ref, grad, partials_out,
                      float(clip_range), float(kl_coef), float(grad_scale), block_p)
    return partials_out


def grad_sample(block_p, v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef, grad_scale,
                kl_out=None):
    B, _, P = z.shape
    if kl_out is None:
        kl_out = new_buffer((B, _blocks(P, block_p)), torch.float32, z.device)
    ops.grad_sample(v, z, x, dlogp, cs, co, std, ref, grad, kl_out, float(kl_coef),
                    float(grad_scale), block_p)
    return kl_out
