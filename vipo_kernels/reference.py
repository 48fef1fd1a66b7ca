"""Executable spec of every op in ``vipo_kernels``: plain PyTorch, float64-capable.

This module is the test oracle, the benchmark baseline and the ``backend="torch"``
path. It follows docs/method.md sections 1 to 4 line by line and is kept
deliberately naive: autograd computes its gradient, nothing is fused.

Arithmetic runs in float64 when any input is float64 and in float32 otherwise
(docs/method.md section 1: all step arithmetic is fp32; flow_grpo upcasts its log-prob
for the same reason, since bf16 overflows there).
"""

from __future__ import annotations

import math

import torch

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

STAT_NAMES = (
    "clip_frac_low",
    "clip_frac_high",
    "approx_kl",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "loss_clip",
    "loss_kl",
    "loss_clip_per_reward",
)


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any tensor input is float64, else float32."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def per_sample(x, batch: int, ndim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A (B,) tensor or Python float, shaped (B, 1, ...) to broadcast over (B, C, *S)."""
    x = torch.as_tensor(x, dtype=dtype, device=device)
    return x.reshape(-1).expand(batch).reshape(batch, *([1] * (ndim - 1)))


def sde_coefficients_reference(sigma, sigma_next, *, kind="dance", eta=0.3, noise_level=0.7):
    """(coef_sample, coef_output, std) of one SDE step, docs/method.md section 1.

    ``kind="dance"``: DanceGRPO form with noise scale ``eta``.
    ``kind="flow"``: Flow-GRPO form with noise level ``noise_level``; at sigma = 1
    the Flow-GRPO code substitutes the next level for sigma in 1 - sigma.
    """
    dtype = compute_dtype(sigma, sigma_next)
    sigma = torch.atleast_1d(torch.as_tensor(sigma, dtype=torch.float64))
    sigma_next = torch.atleast_1d(torch.as_tensor(sigma_next, dtype=torch.float64))
    delta = sigma_next - sigma  # (B,) < 0
    if kind == "dance":
        half_eta2 = 0.5 * eta**2 / sigma
        coef_sample = 1.0 + half_eta2 * delta
        coef_output = delta * (1.0 + half_eta2 * (1.0 - sigma))
        std = eta * torch.sqrt(sigma - sigma_next)
    elif kind == "flow":
        sigma_tilde = torch.where(sigma == 1.0, sigma_next, sigma)
        half_a2 = 0.5 * noise_level**2 / (1.0 - sigma_tilde)
        coef_sample = 1.0 + half_a2 * delta
        coef_output = delta * (1.0 + half_a2 * (1.0 - sigma))
        std = noise_level * torch.sqrt(sigma / (1.0 - sigma_tilde)) * torch.sqrt(sigma - sigma_next)
    else:
        raise ValueError(f"kind must be 'dance' or 'flow', got {kind!r}")
    return coef_sample.to(dtype), coef_output.to(dtype), std.to(dtype)


def _step_terms(model_output, sample, coef_sample, coef_output, std, dtype):
    batch, ndim = sample.shape[0], sample.dim()
    cs = per_sample(coef_sample, batch, ndim, dtype, sample.device)
    co = per_sample(coef_output, batch, ndim, dtype, sample.device)
    sd = per_sample(std, batch, ndim, dtype, sample.device)
    mean = cs * sample.to(dtype) + co * model_output.to(dtype)  # (B, C, *S)
    return mean, sd


def elementwise_log_prob(model_output, sample, next_sample, coef_sample, coef_output, std):
    """l_{c,p} = -(z' - mu)^2 / (2 std^2) - log std - log(2 pi)/2, shape (B, C, *S)."""
    dtype = compute_dtype(model_output, sample, next_sample, coef_sample, coef_output, std)
    mean, sd = _step_terms(model_output, sample, coef_sample, coef_output, std, dtype)
    diff = next_sample.to(dtype) - mean
    return -(diff**2) / (2.0 * sd**2) - torch.log(sd) - HALF_LOG_2PI


def log_prob_reference(model_output, sample, next_sample, *, coef_sample, coef_output, std,
                       ratio_level="position"):
    """(B, *S) channel-summed log-density, or (B,) mean over all C*|P| elements."""
    elem = elementwise_log_prob(model_output, sample, next_sample, coef_sample, coef_output, std)
    if ratio_level == "position":
        return elem.sum(dim=1)
    if ratio_level == "sample":
        return elem.flatten(1).mean(dim=1)
    raise ValueError(f"ratio_level must be 'position' or 'sample', got {ratio_level!r}")


def sde_step_reference(model_output, sample, noise, *, coef_sample, coef_output, std):
    """z' = mu + std * noise, and the (B, *S) log-prob of the z' that is returned.

    z' is rounded to ``sample.dtype`` first and the log-prob is taken of the
    rounded value, so recomputing it later from the stored z' reproduces it.
    """
    dtype = compute_dtype(model_output, sample, noise, coef_sample, coef_output, std)
    mean, sd = _step_terms(model_output, sample, coef_sample, coef_output, std, dtype)
    next_sample = (mean + sd * noise.to(dtype)).to(sample.dtype)
    logp = log_prob_reference(model_output, sample, next_sample, coef_sample=coef_sample,
                              coef_output=coef_output, std=std)
    return next_sample, logp


def clipped_surrogate(dense_adv, ratio, clip_range):
    """max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), elementwise."""
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(-dense_adv * ratio, -dense_adv * clipped)


def per_reward_clip_losses(advantages, allocation, ratio, clip_range):
    """(K,) L_clip(A_k) = mean of max(-A_k M rho, -A_k M clip(rho)), one per reward column
    of the clipped (B, K) ``advantages``. ``allocation`` (the map M, or its per-sample mean
    at the sample level, where M factors out) and ``ratio`` share one shape (B, ...)."""
    view = (-1,) + (1,) * (ratio.dim() - 1)
    return torch.stack([clipped_surrogate(advantages[:, k].reshape(view) * allocation, ratio,
                                          clip_range).mean()
                        for k in range(advantages.shape[1])])


def ratio_statistics(log_ratio, clip_range) -> dict:
    """The ratio statistics of docs/method.md 4 over the ratios of the active level."""
    ratio = torch.exp(log_ratio)
    return {
        "clip_frac_low": (ratio < 1.0 - clip_range).to(log_ratio.dtype).mean(),
        "clip_frac_high": (ratio > 1.0 + clip_range).to(log_ratio.dtype).mean(),
        "approx_kl": 0.5 * (log_ratio**2).mean(),
        "ratio_mean": ratio.mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
    }


def vipo_loss_reference(model_output, sample, next_sample, old_log_prob, advantages,
                        allocation_map=None, *, coef_sample, coef_output, std, clip_range=1e-4,
                        adv_clip=5.0, ratio_level="position", kl_coef=0.0,
                        ref_model_output=None, reward_weights=None):
    """ViPO/GRPO clipped loss, docs/method.md sections 4-5. Returns (loss, stats).

    ``advantages`` (B,) or (B, K): L = sum_k w_k L_clip(A_k) + L_KL with ``reward_weights``
    w (K floats or a (K,) tensor, default ones): the ratio is shared, each reward has its
    own clip branch. The loss is differentiable in ``model_output`` only: every other
    input is detached here, as the spec treats it as a constant.
    """
    dtype = compute_dtype(model_output, sample, next_sample, old_log_prob, advantages,
                          allocation_map, coef_sample, coef_output, std, ref_model_output)
    sample, next_sample = sample.detach(), next_sample.detach()
    batch = sample.shape[0]
    spatial = sample.shape[2:]
    elem = elementwise_log_prob(model_output, sample, next_sample, coef_sample, coef_output, std)

    adv = torch.clamp(advantages.detach().to(dtype).reshape(batch, -1), -adv_clip, adv_clip)
    weights = torch.as_tensor([1.0] * adv.shape[1] if reward_weights is None else reward_weights,
                              dtype=dtype, device=sample.device)
    amap = (torch.ones(batch, *spatial, dtype=dtype, device=sample.device)
            if allocation_map is None else allocation_map.detach().to(dtype))  # (B, *S)
    old = old_log_prob.detach().to(dtype)

    if ratio_level == "position":
        log_ratio = elem.sum(dim=1) - old  # (B, *S)
        ratio_for_loss = torch.exp(log_ratio)
    elif ratio_level == "sample":
        log_ratio = elem.flatten(1).mean(dim=1) - old  # (B,)
        ratio_for_loss = torch.exp(log_ratio).reshape(batch, *([1] * len(spatial)))
    else:
        raise ValueError(f"ratio_level must be 'position' or 'sample', got {ratio_level!r}")

    per_reward = per_reward_clip_losses(adv, amap, ratio_for_loss.expand_as(amap), clip_range)
    loss_clip = (weights * per_reward).sum()

    loss_kl = torch.zeros((), dtype=dtype, device=sample.device)
    if kl_coef != 0.0:
        mean, sd = _step_terms(model_output, sample, coef_sample, coef_output, std, dtype)
        ref_mean, _ = _step_terms(ref_model_output.detach(), sample, coef_sample, coef_output,
                                  std, dtype)
        kl_elem = (mean - ref_mean) ** 2 / (2.0 * sd**2)  # (B, C, *S)
        loss_kl = kl_coef * kl_elem.sum(dim=1).mean()

    with torch.no_grad():
        stats = ratio_statistics(log_ratio, clip_range)
        stats.update(loss_clip=loss_clip.detach(), loss_kl=loss_kl.detach(),
                     loss_clip_per_reward=per_reward.detach())
    loss = loss_clip + loss_kl
    return loss, stats
