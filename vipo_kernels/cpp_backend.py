"""``backend="cpp"``: the C++ (OpenMP) kernels of csrc/cpu/ for CPU tensors.

Same four primitives, signatures and semantics as ``triton_backend``. Threads follow
``torch.set_num_threads``; the result does not depend on their number, since every
block of positions is summed by one thread in a fixed order.
"""

from __future__ import annotations

from . import _compiled

N_STATS = _compiled.N_STATS


def block_positions(C: int, P: int) -> int:
    """Positions per task: about 16k elements (C * block_p), so the block's per-channel
    diff rows (kept for the gradient sweep, 64 KB) stay in L2, while each channel row is
    long enough (4 KB at C = 16) for the prefetcher to stream it; a multiple of 16 for the
    vector loops; at most P, so small inputs are one task per sample. Measured on the
    development machine at the Wan size: 1024 positions ran 1.5x faster than 256."""
    block_p = min(2048, max(16, (16384 // max(C, 1)) // 16 * 16))
    return max(1, min(block_p, P))


def step(v, z, noise, cs, co, std, *, next_out=None, logp_out=None):
    return _compiled.step(block_positions(*z.shape[1:]), v, z, noise, cs, co, std,
                          next_out=next_out, logp_out=logp_out)


def log_prob(v, z, x, cs, co, std, *, logp_out=None):
    return _compiled.log_prob(block_positions(*z.shape[1:]), v, z, x, cs, co, std,
                              logp_out=logp_out)


def loss_position(v, z, x, old, adv, amap, cs, co, std, ref, grad, *, clip_range, kl_coef,
                  grad_scale, partials_out=None):
    """(B, K, 8) per-block sums, see ``triton_backend.loss_position``; dL/dv into ``grad``."""
    return _compiled.loss_position(block_positions(*z.shape[1:]), v, z, x, old, adv, amap, cs,
                                   co, std, ref, grad, clip_range=clip_range, kl_coef=kl_coef,
                                   grad_scale=grad_scale, partials_out=partials_out)


def grad_sample(v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef, grad_scale, kl_out=None):
    """(B, K) KL sums, see ``triton_backend.grad_sample``; dlogp[b] * dl/dv into ``grad``."""
    return _compiled.grad_sample(block_positions(*z.shape[1:]), v, z, x, dlogp, cs, co, std,
                                 ref, grad, kl_coef=kl_coef, grad_scale=grad_scale,
                                 kl_out=kl_out)
