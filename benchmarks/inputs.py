"""Benchmark inputs: realistic loss and step arguments at a preset latent shape."""

from __future__ import annotations

import torch

from vipo_kernels import sde_coefficients, sde_step


def loss_inputs(shape, dtype=torch.float32, device="cpu", *, with_map=True):
    """(args, kwargs) of vipo_loss, a rollout step of the current policy with ratios near 1."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch, _, *spatial = shape
    sigma = torch.rand(batch, generator=gen) * 0.8 + 0.15
    cs, co, std = (c.to(device) for c in sde_coefficients(sigma, sigma * 0.8))
    v, z, noise = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    next_sample, old = sde_step(v, z, noise, coef_sample=cs, coef_output=co, std=std,
                                backend="torch")
    old = old + 1e-4 * torch.randn(old.shape, generator=gen).to(device)
    adv = torch.randn(batch, generator=gen).to(device)
    amap = torch.rand((batch, *spatial), generator=gen).to(device) if with_map else None
    kwargs = dict(coef_sample=cs, coef_output=co, std=std)
    return (v, z, next_sample, old, adv, amap), kwargs


def loss_bytes(shape, dtype) -> int:
    """Minimum traffic of the fused loss fwd+bwd: read v, z, z' and write dL/dv (latent
    dtype), read the old log-prob and the map (fp32 per position)."""
    batch, channels, *spatial = shape
    positions = batch
    for s in spatial:
        positions *= s
    elem = torch.empty((), dtype=dtype).element_size()
    return 4 * positions * channels * elem + 2 * positions * 4


def step_bytes(shape, dtype) -> int:
    """Read v, z, noise; write z' (latent dtype) and the log-prob (fp32 per position)."""
    batch, channels, *spatial = shape
    positions = batch
    for s in spatial:
        positions *= s
    elem = torch.empty((), dtype=dtype).element_size()
    return 4 * positions * channels * elem + positions * 4
