"""Benchmark inputs: realistic loss and step arguments at a preset latent shape, and the
float64 oracle every benchmarked implementation is checked against before it is timed."""

from __future__ import annotations

import torch

from vipo_kernels import sde_coefficients, sde_step
from vipo_kernels.reference import log_prob_reference, vipo_loss_reference

# Where each position's ratio sits, in units of the clip range: below, inside and above
# [1 - eps, 1 + eps], each at least eps/2 from an edge. Nearer an edge, the rounding of an
# fp32 log-ratio (a difference of two sums of C terms) can pick the other clip branch than
# float64 does, and a check against the oracle would compare noise.
OFFSETS = (-3.0, -0.5, 0.0, 0.5, 3.0)


def loss_inputs(shape, dtype=torch.float32, device="cpu", *, clip_range=1e-4, with_map=True):
    """(args, kwargs) of ``vipo_loss``: a rollout step of the current policy in ``dtype``
    whose per-position ratios are exp(offset x clip_range), offsets from ``OFFSETS``.

    The old log-prob is the float64 log-density of exactly these (rounded) inputs minus the
    offset, stored in fp32 (an error of a few 1e-6, far inside the eps/2 margin)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch, _, *spatial = shape
    sigma = torch.rand(batch, generator=gen) * 0.8 + 0.15
    cs, co, std = sde_coefficients(sigma, sigma * 0.8)
    v, z, noise = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    next_sample, _ = sde_step(v, z, noise, coef_sample=cs, coef_output=co, std=std,
                              backend="torch")
    logp64 = log_prob_reference(v.double(), z.double(), next_sample.double(),
                                coef_sample=cs.double(), coef_output=co.double(),
                                std=std.double())
    pick = torch.randint(0, len(OFFSETS), logp64.shape, generator=gen)
    old = (logp64 - torch.tensor(OFFSETS, dtype=torch.float64)[pick] * clip_range).float()
    adv = torch.randn(batch, generator=gen)
    amap = torch.rand((batch, *spatial), generator=gen) if with_map else None
    to_dev = (lambda t: None if t is None else t.to(device))
    kwargs = dict(coef_sample=cs.to(device), coef_output=co.to(device), std=std.to(device),
                  clip_range=clip_range)
    args = tuple(to_dev(t) for t in (v, z, next_sample, old, adv, amap))
    return args, kwargs


def step_inputs(shape, dtype=torch.float32, device="cpu"):
    """(v, z, noise), kwargs of ``sde_step`` (the coefficients of ``loss_inputs``)."""
    (v, z, *_), kwargs = loss_inputs(shape, dtype, device, with_map=False)
    kwargs.pop("clip_range")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return (v, z, noise), kwargs


def loss_oracle(args, kwargs):
    """The float64 loss, dL/dv and statistics of ``vipo_loss(*args, **kwargs)``, computed on
    the inputs' device from the same (possibly bf16-rounded) values."""
    v, *rest = args
    v64 = v.detach().double().requires_grad_(True)
    rest64 = [None if t is None else t.double() for t in rest]
    kw64 = {k: a.double() if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
    loss, stats = vipo_loss_reference(v64, *rest64, **kw64)
    loss.backward()
    return loss.detach(), v64.grad, stats


def loss_scale(args) -> float:
    """The natural size of the loss's rounding error: mean |A M| (the ratio is about 1), as
    tests/utils.py's natural_scales, since the loss itself may cancel to near zero."""
    _, _, _, _, adv, amap = args
    adv = adv.double().clamp(-5.0, 5.0).abs()
    if amap is not None:
        adv = adv * amap.double().flatten(1).mean(dim=1)
    return float(adv.mean())


def _positions(shape) -> int:
    batch, _, *spatial = shape
    positions = batch
    for s in spatial:
        positions *= s
    return positions


def loss_bytes(shape, dtype) -> int:
    """Minimum traffic of the fused loss fwd+bwd: read v, z, z' and write dL/dv (latent
    dtype), read the old log-prob and the map (fp32 per position)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 4 * _positions(shape) * shape[1] * elem + 2 * _positions(shape) * 4


def step_bytes(shape, dtype) -> int:
    """Read v, z, noise; write z' (latent dtype) and the log-prob (fp32 per position)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 4 * _positions(shape) * shape[1] * elem + _positions(shape) * 4
