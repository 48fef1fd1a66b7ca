"""Shared test helpers: the tolerance table (one bound per dtype,
from what its arithmetic guarantees), the comparison criterion and a
builder of loss inputs that exercises every branch of the clipped surrogate."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vipo_kernels.reference import elementwise_log_prob, sde_coefficients_reference, vipo_loss_reference

# dtype -> (atol, rtol), Liger style.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (5e-2, 5e-2),
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; NaN anywhere gives inf."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return (actual - expected).abs().max().item()


def assert_matches(name: str, kernel, same_dtype_torch, oracle, dtype: torch.dtype, *,
                   scale: float | None = None) -> None:
    """Compares against the float64 oracle, errors measured relative to ``scale``, the
    natural size of the quantity (default: max |oracle|; see ``natural_scales``).

    fp32: error / scale under rtol. Low precision: FlashAttention's criterion, the kernel's
    error is at most twice the same-dtype torch reference's error plus atol x scale."""
    atol, rtol = TOLERANCES[dtype]
    if scale is None:
        scale = expected_scale = oracle.detach().double().abs().max().clamp_min(1e-30).item()
    else:
        expected_scale = scale
    if dtype == torch.float32:
        err = max_err(kernel, oracle) / expected_scale
        print(f"{name}: kernel error / scale {err:.3e}")
        assert err < rtol, f"{name}: error {err:.3e} x scale {expected_scale:.3e}, over {rtol:.0e}"
        return
    kernel_err, torch_err = max_err(kernel, oracle), max_err(same_dtype_torch, oracle)
    print(f"{name}: kernel err {kernel_err:.3e}, torch {dtype} err {torch_err:.3e}")
    assert kernel_err <= 2 * torch_err + atol * expected_scale, (
        f"{name}: kernel error {kernel_err:.3e} > 2 x torch error {torch_err:.3e} + "
        f"{atol} x {expected_scale:.3e}")


def natural_scales(case: "LossCase", ref_stats: dict) -> dict:
    """The size each loss output's rounding error is relative to.

    The loss is a mean of terms of both signs, so it can cancel to near zero while each
    term is O(|A|): its error scales with the mean absolute term, mean |A_i M_i(p)| (rho is
    about 1), not with the loss itself. approx_kl = mean(log^2 rho)/2 moves by
    log rho x (error of log rho), so its scale is the RMS log-ratio. Ratios and fractions
    are O(1); the KL term is a sum of squares, which cannot cancel."""
    adv = case.advantages.detach().double().cpu().reshape(case.sample.shape[0], -1)
    adv = adv.clamp(-5.0, 5.0).abs()  # (B, K)
    if case.allocation_map is not None:
        amap = case.allocation_map.detach().double().cpu()
        adv = adv * amap.flatten(1).mean(dim=1, keepdim=True)
    per_reward = adv.mean(dim=0)  # (K,) mean |A_k M|
    l1 = (per_reward * case.weights().abs()).sum().item()
    loss_kl = abs(ref_stats["loss_kl"].item())
    return {"loss": l1 + loss_kl, "loss_clip": l1, "loss_kl": max(loss_kl, 1e-30),
            "loss_clip_per_reward": per_reward.max().item(),
            "approx_kl": max((2 * ref_stats["approx_kl"].item()) ** 0.5, 1e-30),
            "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0,
            "clip_frac_low": 1.0, "clip_frac_high": 1.0}


@dataclass
class LossCase:
    """Inputs of ``vipo_loss`` plus the keyword arguments, ready to pass on."""

    model_output: torch.Tensor
    sample: torch.Tensor
    next_sample: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    allocation_map: torch.Tensor | None
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return (self.model_output, self.sample, self.next_sample, self.old_log_prob,
                self.advantages, self.allocation_map)

    def weights(self) -> torch.Tensor:
        """The (K,) float64 reward weights (ones by default)."""
        rewards = 1 if self.advantages.dim() == 1 else self.advantages.shape[1]
        weights = self.kwargs.get("reward_weights")
        return torch.ones(rewards, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).cpu()


def _noncontiguous(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in a non-contiguous layout: 'batch' permutes batch and channel
    storage (positions stay contiguous), 'position' strides the positions."""
    if how == "batch":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "position":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


# Reward weights of the multi-reward cases: of both signs and sizes, one of them 1.
REWARD_WEIGHTS = (1.0, 0.5, -0.25)


def make_loss_case(shape=(3, 5, 7, 9), dtype=torch.float32, *, ratio_level="position",
                   with_map=True, kl_coef=0.0, clip_range=1e-2, noncontiguous=None,
                   device="cpu", rewards=None) -> LossCase:
    """Random inputs whose ratios fall below, inside and above [1 - eps, 1 + eps], with
    advantages of both signs (one beyond adv_clip) and a map with zeros. ``rewards=K``
    gives (B, K) advantages, each column with both signs (for B > 1), and the first K
    ``REWARD_WEIGHTS``; the default, (B,) advantages.

    The old log-prob is the float64 log-density of the current policy minus a chosen
    offset, so each ratio is exp(offset) up to rounding; the offsets stay at least eps/2
    away from the clip boundaries, where fp32 and float64 could disagree on the branch.
    """
    batch, channels, *spatial = shape
    sigma = torch.rand(batch, dtype=torch.float64) * 0.8 + 0.15
    sigma_next = sigma * (torch.rand(batch, dtype=torch.float64) * 0.6 + 0.3)
    cs, co, std = sde_coefficients_reference(sigma, sigma_next, kind="dance", eta=0.7)
    v = torch.randn(shape, dtype=torch.float64).to(dtype)
    z = torch.randn(shape, dtype=torch.float64).to(dtype)
    v_old = v.double() + 0.05 * torch.randn(shape, dtype=torch.float64)
    mean_old = cs.view(-1, *[1] * (len(shape) - 1)) * z.double() + \
        co.view(-1, *[1] * (len(shape) - 1)) * v_old
    x = (mean_old + std.view(-1, *[1] * (len(shape) - 1)) *
         torch.randn(shape, dtype=torch.float64)).to(dtype)
    elem = elementwise_log_prob(v.double(), z.double(), x.double(), cs, co, std)

    offsets = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64) * clip_range
    if ratio_level == "position":
        pick = torch.randint(0, len(offsets), (batch, *spatial))
        old = elem.sum(dim=1) - offsets[pick]
    else:
        old = elem.flatten(1).mean(dim=1) - offsets[torch.arange(batch) % len(offsets)]

    advantages = torch.randn(batch, rewards or 1, dtype=torch.float64) * 2
    advantages[0, 0] = abs(advantages[0, 0]) + 6.0  # beyond adv_clip = 5
    if batch > 1:
        advantages[1] = -advantages[1].abs() - 0.1
        advantages[0, 1:] = advantages[0, 1:].abs() + 0.1
    if rewards is None:
        advantages = advantages[:, 0]
    amap = None
    if with_map:
        amap = torch.rand(batch, *spatial, dtype=torch.float64)
        amap[amap < 0.2] = 0.0
        amap = amap.to(dtype)
    kwargs = dict(coef_sample=cs.float(), coef_output=co.float(), std=std.float(),
                  clip_range=clip_range, adv_clip=5.0, ratio_level=ratio_level, kl_coef=kl_coef)
    if rewards is not None:
        kwargs["reward_weights"] = list(REWARD_WEIGHTS[:rewards])
    if kl_coef > 0:
        kwargs["ref_model_output"] = _noncontiguous(
            (v.double() + 0.1 * torch.randn(shape, dtype=torch.float64)).to(dtype).to(device),
            noncontiguous)
    # The layout is made on the device: .to() of a non-dense tensor makes a dense copy.
    v, z, x = (_noncontiguous(t.to(device), noncontiguous) for t in (v, z, x))
    to_dev = (lambda t: t.to(device) if t is not None else None)
    kwargs = {k: to_dev(a) if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()}
    return LossCase(v, z, x, old.float().to(device), advantages.to(dtype).to(device),
                    to_dev(amap), kwargs)


def _reference64(case: LossCase, advantages, kl_coef):
    """float64 reference loss, stats and dL/dv of ``case`` with one advantage column."""
    v = case.model_output.detach().double().cpu().requires_grad_(True)
    args = [a.detach().double().cpu() if a is not None else None for a in case.args()[1:]]
    args[3] = advantages
    kwargs = {k: a.detach().double().cpu() if isinstance(a, torch.Tensor) else a
              for k, a in case.kwargs.items() if k != "reward_weights"}
    loss, stats = vipo_loss_reference(v, *args, **dict(kwargs, kl_coef=kl_coef))
    (grad,) = torch.autograd.grad(loss, v)
    return loss.detach(), stats, grad


def oracle(case: LossCase):
    """float64 loss, stats and dL/dv of ``case`` from the reference: for (B, K) advantages,
    the sum of K single-reward reference losses w_k L(A_k) (kl_coef 0), plus the KL term
    alone (A = 0), so the reference's own handling of K is not what the kernels are held to."""
    adv = case.advantages.detach().double().cpu()
    if adv.dim() == 1:
        return _reference64(case, adv, case.kwargs["kl_coef"])
    weights = case.weights()
    loss, stats, grad = _reference64(case, torch.zeros_like(adv[:, 0]), case.kwargs["kl_coef"])
    per_reward = []
    for k in range(adv.shape[1]):
        loss_k, stats_k, grad_k = _reference64(case, adv[:, k], 0.0)
        loss, grad = loss + weights[k] * loss_k, grad + weights[k] * grad_k
        per_reward.append(stats_k["loss_clip"])
    stats = dict(stats, loss_clip_per_reward=torch.stack(per_reward),
                 loss_clip=(weights * torch.stack(per_reward)).sum())
    return loss, stats, grad
