"""Argument checks shared by every backend.

Every message names the argument. Checks on tensor *values* (std > 0, a map finite and
>= 0, finite advantages and old log-probs) run on the tensors' device and make no
device-to-host synchronisation on CUDA (``require``); the kernel paths make them inside the
kernel pass that reads the values (see ``partials``), the reference path here.
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


# The value checks' messages, one per argument; csrc/partials.h repeats them for the C++
# reduction, and the tests match both.
MESSAGES = {
    "std": "std must be finite and > 0",
    "advantages": "advantages contains NaN or inf",
    "allocation_map": "allocation_map must be finite and >= 0",
    "old_log_prob": "old_log_prob contains NaN or inf",
}


def require(ok: torch.Tensor, message: str) -> None:
    """Raises ValueError(message) unless the bool tensor ``ok`` is true. On the CPU at
    once; on CUDA asynchronously (``torch._assert_async``, a device-side assert at a later
    launch), because reading the flag would stall the pipeline on every call."""
    if ok.device.type == "cuda":
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def check_std(std: torch.Tensor) -> None:
    require(torch.isfinite(std).all() & (std > 0).all(), MESSAGES["std"])


def check_coefficients(coef_sample: torch.Tensor | None,
                       coef_output: torch.Tensor | None) -> None:
    """Non-finite step coefficients would give a finite-looking loss with a NaN gradient
    (issue 10), so they are an error naming the coefficient."""
    for name, value in (("coef_sample", coef_sample), ("coef_output", coef_output)):
        if value is not None:
            require(torch.isfinite(value).all(), f"{name} contains NaN or inf")


def check_values(std: torch.Tensor, advantages: torch.Tensor | None = None,
                 allocation_map: torch.Tensor | None = None,
                 old_log_prob: torch.Tensor | None = None, *,
                 coef_sample: torch.Tensor | None = None,
                 coef_output: torch.Tensor | None = None) -> None:
    """The value checks of the reference path, on the tensors' device."""
    check_std(std)
    check_coefficients(coef_sample, coef_output)
    if advantages is not None:
        require(torch.isfinite(advantages).all(), MESSAGES["advantages"])
    if allocation_map is not None:
        require((torch.isfinite(allocation_map) & (allocation_map >= 0)).all(),
                MESSAGES["allocation_map"])
    if old_log_prob is not None:
        require(torch.isfinite(old_log_prob).all(), MESSAGES["old_log_prob"])


def check_advantages(advantages, batch: int, device) -> torch.Tensor:
    """(B,) or (B, K) advantages -> a (B, K) view."""
    check_float_tensor("advantages", advantages)
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device} but the latents are on {device}")
    if advantages.dim() not in (1, 2) or advantages.shape[0] != batch or advantages.numel() == 0:
        raise ValueError(f"advantages must have shape ({batch},) or ({batch}, K), got "
                         f"{tuple(advantages.shape)}")
    return advantages.reshape(batch, -1)


_weights_cache: dict[tuple, torch.Tensor] = {}


def reward_weights_tensor(reward_weights, rewards: int, device) -> torch.Tensor:
    """None (all ones), a (K,) tensor or a sequence of K floats -> (K,) float32 on
    ``device``. Sequences and the default are cached per device, because building a tensor
    from host values is a host-to-device copy (which CUDA's sync debug mode reports)."""
    if isinstance(reward_weights, torch.Tensor):
        check_float_tensor("reward_weights", reward_weights)
        if tuple(reward_weights.shape) != (rewards,) or reward_weights.device != device:
            raise ValueError(f"reward_weights must have shape ({rewards},) on {device}, got "
                             f"{tuple(reward_weights.shape)} on {reward_weights.device}")
        require(torch.isfinite(reward_weights).all(), "reward_weights contains NaN or inf")
        return reward_weights.detach().to(torch.float32).contiguous()
    values = (1.0,) * rewards if reward_weights is None else tuple(reward_weights)
    if len(values) != rewards or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                         and math.isfinite(w) for w in values):
        raise ValueError(f"reward_weights must be {rewards} finite floats (one per advantage "
                         f"column), got {reward_weights!r}")
    key = (values, device)
    if key not in _weights_cache:
        if len(_weights_cache) > 64:
            _weights_cache.clear()
        _weights_cache[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _weights_cache[key]
