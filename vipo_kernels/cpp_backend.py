"""``backend="cpp"``: the C++ (OpenMP) kernels of csrc/cpu/ for CPU tensors.

Same four primitives, signatures and semantics as ``triton_backend``. Threads follow
``torch.set_num_threads``; the result does not depend on their number, since every
block of positions is summed by one thread in a fixed order.
"""

from __future__ import annotations

from . import _compiled

N_STATS = _compiled.N_STATS


def block_positions(B: int, C: int, P: int) -> int:
    """Positions per task. Long blocks: each task streams C rows of block_p contiguous
    values per tensor, and short rows (a few KB) starve the hardware prefetcher. Measured on
    the development machine (2 threads, fused loss and step, the block_p giving the lowest
    time): 4096 at the Flux size (P = 4096) and 8192 at the Wan size (P = 21840); 1024, the
    earlier choice, was 1.1x (Flux loss) to 2x (Wan step) slower. So about 128k elements
    per task, halved while there are fewer than 8 tasks to share out; a multiple of 16 for
    the vector loops; at most P. It never depends on the thread count, so neither does
    the result (the blocks' partial sums are what rounding depends on)."""
    block_p = max(16, (131072 // max(C, 1)) // 16 * 16)
    while block_p > 256 and B * -(-P // block_p) < 8:
        block_p //= 2
    return max(1, min(block_p, P))


def step(v, z, noise, cs, co, std, *, next_out=None, logp_out=None):
    return _compiled.step(block_positions(*z.shape), v, z, noise, cs, co, std,
                          next_out=next_out, logp_out=logp_out)


def log_prob(v, z, x, cs, co, std, *, logp_out=None):
    return _compiled.log_prob(block_positions(*z.shape), v, z, x, cs, co, std,
                              logp_out=logp_out)


def loss_position(v, z, x, old, adv, amap, cs, co, std, ref, grad, *, clip_range, kl_coef,
                  grad_scale, partials_out=None):
    """(B, K, 8) per-block sums, see ``triton_backend.loss_position``; dL/dv into ``grad``."""
    return _compiled.loss_position(block_positions(*z.shape), v, z, x, old, adv, amap, cs,
                                   co, std, ref, grad, clip_range=clip_range, kl_coef=kl_coef,
                                   grad_scale=grad_scale, partials_out=partials_out)


def grad_sample(v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef, grad_scale, kl_out=None):
    """(B, K) KL sums, see ``triton_backend.grad_sample``; dlogp[b] * dl/dv into ``grad``."""
    return _compiled.grad_sample(block_positions(*z.shape), v, z, x, dlogp, cs, co, std,
                                 ref, grad, kl_coef=kl_coef, grad_scale=grad_scale,
                                 kl_out=kl_out)
