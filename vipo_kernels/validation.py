"""Argument checks shared by every backend.

Every message names the argument. Checks on tensor *values* (std > 0, map in
[0, 1], finite advantages) are batched into one device-to-host copy, so a CUDA
call pays a single synchronisation for all of them.
"""

from __future__ import annotations

import math

import torch

RATIO_LEVELS = ("position", "sample")


def check_float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 "
                        f"or float64), got {x.dtype}")
    return x


def check_latents(**named) -> tuple[int, int, tuple[int, ...]]:
    """Checks (B, C, *S) latents: same shape and device, S of rank 2 or 3."""
    first_name, first = next(iter(named.items()))
    for name, x in named.items():
        check_float_tensor(name, x)
        if x.dim() not in (4, 5):
            raise ValueError(f"{name} must have shape (B, C, H, W) or (B, C, T, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {first_name} has "
                             f"{tuple(first.shape)}")
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")
    if first.numel() == 0:
        raise ValueError(f"{first_name} is empty: shape {tuple(first.shape)}")
    return first.shape[0], first.shape[1], tuple(first.shape[2:])


def check_ratio_level(ratio_level) -> None:
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")


def as_per_sample(name: str, x, batch: int, device) -> torch.Tensor:
    """Python float or (B,) / (1,) / scalar tensor -> contiguous (B,) float32 on ``device``."""
    if isinstance(x, bool) or x is None:
        raise TypeError(f"{name} must be a float or a (B,) tensor, got {x!r}")
    if isinstance(x, (int, float)):
        return torch.full((batch,), float(x), dtype=torch.float32, device=device)
    check_float_tensor(name, x)
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the latents are on {device}")
    if x.numel() not in (1, batch) or x.dim() > 1:
        raise ValueError(f"{name} must be a float or have shape ({batch},), got {tuple(x.shape)}")
    if x.dtype == torch.float32 and x.shape == (batch,) and x.is_contiguous():
        return x.detach()  # the common case, without four no-op dispatches
    return x.detach().reshape(-1).expand(batch).to(torch.float32).contiguous()


def check_per_position(name: str, x, batch: int, spatial: tuple[int, ...], device) -> torch.Tensor:
    check_float_tensor(name, x)
    if tuple(x.shape) != (batch, *spatial):
        raise ValueError(f"{name} must have shape {(batch, *spatial)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the latents are on {device}")
    return x


def check_hyperparameters(clip_range, adv_clip, kl_coef) -> None:
    for name, value, lower in (("clip_range", clip_range, 0.0), ("adv_clip", adv_clip, 0.0),
                               ("kl_coef", kl_coef, None)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite Python float, got {value!r}")
        if lower is not None and value <= lower:
            raise ValueError(f"{name} must be > {lower}, got {value}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")


def check_values(std: torch.Tensor, advantages: torch.Tensor | None = None,
                 allocation_map: torch.Tensor | None = None,
                 old_log_prob: torch.Tensor | None = None, *,
                 coef_sample: torch.Tensor | None = None,
                 coef_output: torch.Tensor | None = None) -> None:
    """One host sync for every value check; raises naming the first bad argument.

    Each tensor is reduced once or twice: NaN and inf propagate through ``sum``, ``amin``
    and ``amax``, so a non-finite sum or an extremum outside the range flags the tensor
    (a sum of finite values too large to represent is flagged as well)."""
    reductions = [std.amin(), std.sum()]
    coefficients = [(n, c) for n, c in (("coef_sample", coef_sample),
                                        ("coef_output", coef_output)) if c is not None]
    reductions.extend(c.sum() for _, c in coefficients)
    if advantages is not None:
        reductions.append(advantages.sum())
    if allocation_map is not None:
        reductions.extend(torch.aminmax(allocation_map))
    if old_log_prob is not None:
        reductions.append(old_log_prob.sum())
    values = iter(torch.stack(reductions).tolist())  # stack promotes mixed dtypes
    std_min, std_sum = next(values), next(values)
    if not (std_min > 0 and math.isfinite(std_sum)):
        raise ValueError("std must be finite and > 0")
    for name, _ in coefficients:
        if not math.isfinite(next(values)):
            raise ValueError(f"{name} contains NaN or inf")
    if advantages is not None and not math.isfinite(next(values)):
        raise ValueError("advantages contains NaN or inf")
    if allocation_map is not None:
        low, high = next(values), next(values)
        if not (low >= 0 and high <= 1):  # False for NaN too
            raise ValueError("allocation_map must lie in [0, 1] (and not be NaN)")
    if old_log_prob is not None and not math.isfinite(next(values)):
        raise ValueError("old_log_prob contains NaN or inf")
