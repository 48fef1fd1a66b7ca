"""The fused loss's autograd wrapper for the backends whose kernels run from Python (Triton,
CUDA) and for the sample-level loss: the kernel pass wrote dL/dv next to the statistics, so
backward only scales it. (The CPU position-level loss has the same in C++: csrc/ops_cpu.cpp's
FusedLossCpu.)"""

from __future__ import annotations

import torch

from .partials import STAT


class _FusedLoss(torch.autograd.Function):
    """loss = stats["loss"], with dL/dv = grad; backward scales grad by the upstream gradient
    on the device (``scale_grad``), with no host read."""

    @staticmethod
    def forward(ctx, v, stats, grad, scale_grad):
        ctx.grad, ctx.scale_grad, ctx.shape = grad, scale_grad, v.shape
        ctx.mark_non_differentiable(stats)
        return stats[STAT["loss"]], stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.grad is None:
            raise RuntimeError("vipo_loss: this loss was already backpropagated once and its "
                               "gradient buffer handed on; call vipo_loss again for another "
                               "backward pass")
        # Handing the buffer on (not keeping a reference) lets autograd take it as the
        # gradient of a leaf without copying it.
        grad, ctx.grad = ctx.grad, None
        return ctx.scale_grad(grad, grad_loss).reshape(ctx.shape), None, None, None


def with_gradient(v, stats, grad, scale_grad):
    """(loss, stats): the loss differentiable in ``v`` with gradient ``grad`` when ``grad``
    is given, else a plain view of the statistics."""
    if grad is None:
        return stats[STAT["loss"]], stats
    return _FusedLoss.apply(v, stats, grad, scale_grad)
