"""Public API: ``sde_coefficients``, ``sde_step``, ``log_prob`` and ``vipo_loss``.

Each call checks its arguments (messages name the argument), picks a backend and
either runs the float64-capable reference (``backend="torch"``) or a kernel backend's
primitives (``backends.KernelBackend``). The position-level loss is one primitive call,
which returns the loss already differentiable in the model output: the kernel pass, the
reduction of its partials (``partials``) into the statistics and the autograd wrapper; the
sample-level loss is built here from the reference's helpers.
"""

from __future__ import annotations

import torch

from . import backends, partials, reference
from .autograd import with_gradient
from .buffers import new_buffer
from .reference import STAT_NAMES
from .validation import (as_per_sample, check_advantages, check_float_tensor,
                         check_hyperparameters, check_latents, check_per_position,
                         check_coefficients, check_ratio_level, check_values,
                         reward_weights_tensor)

SDE_KINDS = ("dance", "flow")


def sde_coefficients(sigma, sigma_next, *, kind="dance", eta=0.3, noise_level=0.7):
    """Step coefficients of docs/method.md section 1: ``mu = coef_sample * z + coef_output * v``.

    Args:
        sigma, sigma_next: (B,) tensors or floats with 0 <= sigma_next < sigma <= 1.
        kind: ``"dance"`` (DanceGRPO, noise scale ``eta``) or ``"flow"`` (Flow-GRPO,
            noise level ``noise_level``).
    Returns:
        ``(coef_sample, coef_output, std)``, each (B,), float32 (float64 for float64 input).
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"kind must be one of {SDE_KINDS}, got {kind!r}")
    noise = eta if kind == "dance" else noise_level
    noise_name = "eta" if kind == "dance" else "noise_level"
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise > 0:
        raise ValueError(f"{noise_name} must be a float > 0, got {noise!r}")
    for name, value in (("sigma", sigma), ("sigma_next", sigma_next)):
        if isinstance(value, torch.Tensor):
            check_float_tensor(name, value)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    if not bool(((s > 0) & (s <= 1)).all()):
        raise ValueError(f"sigma must lie in (0, 1], got {sigma}")
    if not bool(((s_next >= 0) & (s_next < s)).all()):
        raise ValueError(f"sigma_next must satisfy 0 <= sigma_next < sigma, got {sigma_next}")
    if kind == "flow" and bool(((s == 1) & (s_next == 0)).any()):
        raise ValueError("kind='flow' needs sigma_next > 0 where sigma = 1 (it divides by "
                         "1 - sigma_next there)")
    return reference.sde_coefficients_reference(sigma, sigma_next, kind=kind, eta=eta,
                                                noise_level=noise_level)


def _bcp(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, C, P) view whose positions have stride 1 (copying if needed)."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    return x3 if x3.stride(2) == 1 or x3.shape[2] == 1 else x3.contiguous()


def _bp(x: torch.Tensor) -> torch.Tensor:
    """(B, *S) -> contiguous (B, P) float32 (a view when it already is)."""
    return x.reshape(x.shape[0], -1).to(torch.float32).contiguous()


def _step_coefficients(coef_sample, coef_output, std, batch, device):
    cs = as_per_sample("coef_sample", coef_sample, batch, device)
    co = as_per_sample("coef_output", coef_output, batch, device)
    sd = as_per_sample("std", std, batch, device)
    return cs, co, sd


def sde_step(model_output, sample, noise, *, coef_sample, coef_output, std, backend="auto"):
    """One SDE step ``z' = coef_sample * z + coef_output * v + std * noise`` with its log-prob.

    Args:
        model_output, sample, noise: (B, C, *S) with *S = (H, W) or (T, H, W).
        coef_sample, coef_output, std: (B,) tensors or floats (see ``sde_coefficients``).
    Returns:
        ``(next_sample, logp)``: next_sample in ``sample.dtype``; logp (B, *S) float32, the
        channel-summed log-density of next_sample *as stored*, so a recompute from the
        stored tensor gives the same value. Neither carries a gradient.
    """
    batch, _, spatial = check_latents(model_output=model_output, sample=sample, noise=noise)
    cs, co, sd = _step_coefficients(coef_sample, coef_output, std, batch, sample.device)
    check_values(sd, coef_sample=cs, coef_output=co)
    impl = backends.resolve(backend, sample.device)
    with torch.no_grad():
        if impl is None:
            next_sample, logp = reference.sde_step_reference(
                model_output, sample, noise, coef_sample=cs, coef_output=co, std=sd)
            return next_sample, logp.to(torch.float32)
    next3, logp = _kernel_step(impl, model_output, sample, noise, cs, co, sd)
    return next3.reshape(sample.shape), logp.reshape(batch, *spatial)


def log_prob(model_output, sample, next_sample, *, coef_sample, coef_output, std,
             ratio_level="position", backend="auto"):
    """Log-density of ``next_sample`` under N(mu, std^2), docs/method.md section 2.

    Returns (B, *S) float32 summed over channels for ``ratio_level="position"``, or (B,)
    the mean over all C*|P| elements for ``"sample"``. Only ``backend="torch"`` is
    differentiable; use ``vipo_loss`` for gradients.
    """
    batch, channels, spatial = check_latents(model_output=model_output, sample=sample,
                                             next_sample=next_sample)
    check_ratio_level(ratio_level)
    cs, co, sd = _step_coefficients(coef_sample, coef_output, std, batch, sample.device)
    check_values(sd, coef_sample=cs, coef_output=co)
    impl = backends.resolve(backend, sample.device)
    if impl is None:
        return reference.log_prob_reference(model_output, sample, next_sample, coef_sample=cs,
                                            coef_output=co, std=sd,
                                            ratio_level=ratio_level).to(torch.float32)
    logp = _kernel_log_prob(impl, model_output, sample, next_sample, cs, co, sd)
    if ratio_level == "sample":
        return _sample_mean_log_prob(logp, channels).to(torch.float32)
    return logp.reshape(batch, *spatial)


def _sample_mean_log_prob(logp: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, P) channel-summed log-probs -> (B,) float64 mean over all C*|P| elements: the
    sample-level log-prob, one definition for rollout (log_prob) and loss alike."""
    return logp.to(torch.float64).sum(dim=1) / (channels * logp.shape[1])


def _grad_buffer(v: torch.Tensor, v3: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Where dL/dv goes: model_output's own memory if the caller opted in and it is
    contiguous, else a new buffer (the one backward would allocate anyway)."""
    if inplace and v.is_contiguous() and v3.data_ptr() == v.data_ptr():
        torch.autograd.graph.increment_version(v)  # a saved copy of v now fails loudly
        return v3
    return new_buffer(v3.shape, v.dtype, v.device)


def _sample_level(impl, v3, z3, x3, old, adv, weights, amap, cs, co, sd, ref3, grad, *,
                  clip_range, adv_clip, kl_coef):
    """The sample-level loss: one ratio per sample from the mean log-density (docs/method.md 3).
    Its surrogate and statistics are the reference's own helpers on (B,) ratios, their
    gradient dL/d(log ratio) autograd's; then one kernel pass writes dlogp * dl/dv. Two
    passes, because every gradient element depends on its sample's whole mean."""
    batch, channels, positions = z3.shape
    check_values(sd, adv, amap, old)
    logp = impl.log_prob(v3, z3, x3, cs, co, sd)
    with torch.enable_grad():
        log_ratio = (_sample_mean_log_prob(logp, channels) - old.to(torch.float64))
        log_ratio.requires_grad_(True)  # (B,)
        # M >= 0 factors out of the max (docs/method.md 3): the map enters through its mean.
        allocation = (amap.to(torch.float64).mean(dim=1) if amap is not None
                      else torch.ones_like(log_ratio))
        per_reward = reference.per_reward_clip_losses(
            adv.to(torch.float64).clamp(-adv_clip, adv_clip), allocation, torch.exp(log_ratio),
            clip_range)
        loss_clip = (weights.to(torch.float64) * per_reward).sum()
        (dlog_ratio,) = torch.autograd.grad(loss_clip, log_ratio)
    loss_kl = torch.zeros((), dtype=torch.float64, device=z3.device)
    if grad is not None or ref3 is not None:
        # dL/dl(c, p) = dL/d(log ratio_b) / (C|P|), the same for every element of sample b.
        kl_sums = impl.grad_sample(v3, z3, x3, (dlog_ratio / (channels * positions)).float(),
                                   cs, co, sd, ref3, grad, kl_coef=kl_coef)
        loss_kl = kl_sums.sum(dtype=torch.float64) * (kl_coef / (batch * positions))
    values = reference.ratio_statistics(log_ratio.detach(), clip_range)
    values.update(loss=loss_clip.detach() + loss_kl, loss_clip=loss_clip.detach(),
                  loss_kl=loss_kl)
    return torch.cat([torch.stack([values[name] for name in partials.STATS]),
                      per_reward.detach()]).to(torch.float32)


def vipo_loss(model_output, sample, next_sample, old_log_prob, advantages, allocation_map=None,
              *, coef_sample, coef_output, std, reward_weights=None, clip_range=1e-4,
              adv_clip=5.0, ratio_level="position", kl_coef=0.0, ref_model_output=None,
              backend="auto", inplace_backward=False):
    """ViPO / GRPO PPO-clipped loss with a per-position likelihood ratio (docs/method.md 1-5).

    Args:
        model_output: (B, C, *S) predicted velocity v; the only input that gets a gradient.
        sample, next_sample: (B, C, *S) latents z_k and z_{k+1} of the rollout.
        old_log_prob: (B, *S) for ``ratio_level="position"``, (B,) for ``"sample"``, as
            returned by ``sde_step`` / ``log_prob`` at rollout time.
        advantages: (B,) group advantages, or (B, K) for K rewards (docs/method.md 5,
            ``per_reward``), each clipped here to [-adv_clip, adv_clip].
        allocation_map: (B, *S), finite and >= 0 (any ``map_norm`` of docs/method.md 6), or
            None for plain GRPO (M = 1).
        coef_sample, coef_output, std: (B,) tensors or floats from ``sde_coefficients``.
        reward_weights: w (K,): a tensor or K floats, default ones. The loss is
            sum_k w_k L_clip(A_k) + L_KL, in one pass: the ratio is shared, each reward has
            its own clip branch (it depends on the sign of A_k).
        clip_range: PPO epsilon (default 1e-4). adv_clip: advantage bound (default 5).
        kl_coef: weight of the exact Gaussian KL to ``ref_model_output`` (needed if > 0).
        backend: ``"auto"``, ``"torch"`` (reference), ``"triton"``, ``"cpp"`` or ``"cuda"``.
        inplace_backward: kernel backends only. Write dL/dv into ``model_output``'s memory
            instead of a new buffer; ``model_output`` is destroyed, and autograd raises if
            anything saved it for backward.
    Returns:
        ``(loss, stats)``: loss a float32 scalar; stats a dict of detached float32 scalars,
        clip_frac_low, clip_frac_high, approx_kl, ratio_mean, ratio_min, ratio_max,
        loss_clip (sum_k w_k L_clip(A_k)), loss_kl, and loss_clip_per_reward, the (K,)
        unweighted L_clip(A_k). No device-to-host synchronisation on CUDA: a bad value
        (NaN advantages, a negative map, ...) raises ValueError at once on the CPU and is a
        device-side assert on CUDA.
    """
    batch, _, spatial = check_latents(model_output=model_output, sample=sample,
                                      next_sample=next_sample)
    device = sample.device
    check_ratio_level(ratio_level)
    check_hyperparameters(clip_range, adv_clip, kl_coef)
    if ratio_level == "position":
        check_per_position("old_log_prob", old_log_prob, batch, spatial, device)
    else:
        as_per_sample("old_log_prob", old_log_prob, batch, device)
        if tuple(old_log_prob.shape) != (batch,):
            raise ValueError(f"old_log_prob must have shape ({batch},) for ratio_level='sample', "
                             f"got {tuple(old_log_prob.shape)}")
    adv = check_advantages(advantages, batch, device)  # (B, K)
    weights = reward_weights_tensor(reward_weights, adv.shape[1], device)
    if allocation_map is not None:
        check_per_position("allocation_map", allocation_map, batch, spatial, device)
    if kl_coef > 0:
        if ref_model_output is None:
            raise ValueError("ref_model_output is required when kl_coef > 0")
        check_latents(model_output=model_output, ref_model_output=ref_model_output)
    ref = ref_model_output if kl_coef > 0 else None
    cs, co, sd = _step_coefficients(coef_sample, coef_output, std, batch, device)
    options = dict(clip_range=float(clip_range), adv_clip=float(adv_clip),
                   kl_coef=float(kl_coef))
    check_coefficients(cs, co)

    impl = backends.resolve(backend, device)
    if impl is None:
        check_values(sd, adv, allocation_map, old_log_prob)
        # Under torch.compile the reference runs eagerly: with kl_coef = 0, Inductor (torch
        # 2.13) returned this loss without a grad_fn (aot_eager did not); see
        # tests/test_kernels.py::test_under_torch_compile.
        run_reference = (torch.compiler.disable(_reference_loss)
                         if torch.compiler.is_compiling() else _reference_loss)
        return _flag_nonfinite(*run_reference(
            model_output, sample, next_sample, old_log_prob, adv, allocation_map, cs, co, sd,
            weights, ref, ratio_level, options))
    run = _kernel_loss if torch.compiler.is_compiling() else _kernel_loss_eager
    loss, stats = run(impl, model_output, sample, next_sample, old_log_prob, adv, weights,
                      allocation_map, cs, co, sd, ref, ratio_level, bool(inplace_backward),
                      options)
    return _flag_nonfinite(loss, _stats_dict(stats))


def _flag_nonfinite(loss, stats):
    """NaN or inf in model_output, sample or next_sample makes some log-ratio non-finite,
    hence approx_kl (a mean of squared log-ratios). The clipped loss alone can stay finite
    (an inf residual gives ratio 0) while the gradient is NaN, and the backends' min/max
    treat NaN differently; so every backend returns a NaN loss and NaN ratio statistics
    then, for the trainer's guard to catch. No host sync: 0 * approx_kl is 0 when finite."""
    kl = stats["approx_kl"]
    poisoned = ~torch.isfinite(kl)
    nan = torch.full_like(kl, float("nan"))
    for name in ("ratio_mean", "ratio_min", "ratio_max", "loss_clip"):
        stats[name] = torch.where(poisoned, nan, stats[name])
    return loss + torch.where(poisoned, nan, torch.zeros_like(kl)).to(loss.dtype), stats


def _stats_dict(stats: torch.Tensor) -> dict:
    """The (N_STATS + K,) statistics vector as the public dict."""
    values = stats[:partials.N_STATS].unbind()
    out = {name: values[partials.STAT[name]] for name in STAT_NAMES[:-1]}
    out["loss_clip_per_reward"] = stats[partials.N_STATS:]
    return out


def _reference_loss(model_output, sample, next_sample, old_log_prob, adv, allocation_map,
                    cs, co, sd, weights, ref, ratio_level, options):
    loss, stats = reference.vipo_loss_reference(
        model_output, sample, next_sample, old_log_prob, adv, allocation_map,
        coef_sample=cs, coef_output=co, std=sd, ratio_level=ratio_level, ref_model_output=ref,
        reward_weights=weights, **options)
    return loss.to(torch.float32), {k: s.to(torch.float32) for k, s in stats.items()}


# Kernel launches stay opaque to torch.compile: Dynamo would otherwise trace into the
# launcher (and, under TRITON_INTERPRET, into the interpreter) and fail. The loss is one
# fused memory-bound pass, so a graph break around it costs nothing worth compiling.
def _kernel_loss_eager(impl, model_output, sample, next_sample, old_log_prob, adv, weights,
                       allocation_map, cs, co, sd, ref, ratio_level, inplace, options):
    v3 = _bcp(model_output)
    grad = (_grad_buffer(model_output, v3, inplace)
            if model_output.requires_grad and torch.is_grad_enabled() else None)
    # Only v3 gets a gradient (the kernels read the others' memory; the autograd wrappers
    # return no gradient for them), so nothing here needs detaching.
    args = (v3, _bcp(sample), _bcp(next_sample),
            _bp(old_log_prob) if ratio_level == "position" else old_log_prob.float(),
            adv.float().contiguous(), weights,
            _bp(allocation_map) if allocation_map is not None else None, cs, co, sd,
            _bcp(ref) if ref is not None else None, grad)
    if ratio_level == "position":
        return impl.loss_position(*args, **options)  # differentiable in v3
    with torch.no_grad():
        stats = _sample_level(impl, *args, **options)
    return with_gradient(v3, stats, grad, impl.scale_grad)


_kernel_loss = torch.compiler.disable(_kernel_loss_eager)


@torch.compiler.disable
def _kernel_step(impl, model_output, sample, noise, cs, co, sd):
    with torch.no_grad():
        return impl.step(_bcp(model_output), _bcp(sample), _bcp(noise), cs, co, sd)


@torch.compiler.disable
def _kernel_log_prob(impl, model_output, sample, next_sample, cs, co, sd):
    with torch.no_grad():
        return impl.log_prob(_bcp(model_output), _bcp(sample), _bcp(next_sample), cs, co, sd)


class ViPOLoss(torch.nn.Module):
    """``vipo_loss`` with its hyperparameters fixed at construction, for trainers that
    hold the loss as a module. ``forward`` takes the tensors and step coefficients."""

    def __init__(self, *, clip_range=1e-4, adv_clip=5.0, ratio_level="position", kl_coef=0.0,
                 backend="auto", inplace_backward=False):
        super().__init__()
        check_hyperparameters(clip_range, adv_clip, kl_coef)
        check_ratio_level(ratio_level)
        self.options = dict(clip_range=clip_range, adv_clip=adv_clip, ratio_level=ratio_level,
                            kl_coef=kl_coef, backend=backend, inplace_backward=inplace_backward)

    def forward(self, model_output, sample, next_sample, old_log_prob, advantages,
                allocation_map=None, *, coef_sample, coef_output, std, reward_weights=None,
                ref_model_output=None):
        return vipo_loss(model_output, sample, next_sample, old_log_prob, advantages,
                         allocation_map, coef_sample=coef_sample, coef_output=coef_output, std=std,
                         reward_weights=reward_weights, ref_model_output=ref_model_output,
                         **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
