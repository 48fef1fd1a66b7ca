"""The reference itself: float64 gradcheck, the step formulas written out independently,
and the equivalences docs/method.md states (Flow-GRPO's scalar loss, the map factoring out
at the sample level)."""

from __future__ import annotations

import math

import pytest
import torch

from vipo_kernels import log_prob, sde_coefficients, sde_step, vipo_loss
from vipo_kernels.reference import log_prob_reference, vipo_loss_reference

from .utils import make_loss_case, rel_err


def _double(case):
    args = [a.double() if a is not None else None for a in case.args()]
    kwargs = {k: a.double() if isinstance(a, torch.Tensor) else a for k, a in case.kwargs.items()}
    return args, kwargs


@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_gradcheck(ratio_level, kl_coef):
    case = make_loss_case((2, 3, 3, 4), ratio_level=ratio_level, kl_coef=kl_coef)
    (v, *rest), kwargs = _double(case)
    v.requires_grad_(True)

    def loss_of(model_output):
        return vipo_loss_reference(model_output, *rest, **kwargs)[0]

    assert torch.autograd.gradcheck(loss_of, (v,), eps=1e-7, atol=1e-8)


def test_dance_coefficients_match_the_sde():
    """mu = z + D[v + eta^2/(2 sigma) (z + (1 - sigma) v)], std = eta sqrt(sigma - sigma')."""
    sigma = torch.tensor([1.0, 0.7, 0.3], dtype=torch.float64)
    sigma_next = torch.tensor([0.8, 0.5, 0.0], dtype=torch.float64)
    eta, z, v = 0.3, torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    cs, co, std = sde_coefficients(sigma, sigma_next, kind="dance", eta=eta)
    delta = sigma_next - sigma
    score = -(z + (1 - sigma) * v) / sigma  # score of N((1 - sigma) x0_hat, sigma^2)
    expected_mean = z + delta * v - 0.5 * eta**2 * score * delta
    assert torch.allclose(cs * z + co * v, expected_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(std, eta * torch.sqrt(sigma - sigma_next), rtol=1e-12)


def test_flow_coefficients_match_flow_grpo_form():
    """Flow-GRPO: sigma_t = a sqrt(sigma / (1 - sigma~)), with sigma~ = sigma_1 at sigma = 1."""
    sigma = torch.tensor([1.0, 0.6], dtype=torch.float64)
    sigma_next = torch.tensor([0.9, 0.2], dtype=torch.float64)
    a, z, v = 0.7, torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    cs, co, std = sde_coefficients(sigma, sigma_next, kind="flow", noise_level=a)
    sigma_tilde = torch.tensor([0.9, 0.6], dtype=torch.float64)
    sigma_t = a * torch.sqrt(sigma / (1 - sigma_tilde))
    dt = sigma_next - sigma
    expected_mean = (z * (1 + sigma_t**2 / (2 * sigma) * dt)
                     + v * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    assert torch.allclose(cs * z + co * v, expected_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(std, sigma_t * torch.sqrt(-dt), rtol=1e-12)


def _flow_grpo_loss(v, z, x, old_mean_logp, adv, sigma, sigma_next, a, eps, adv_clip):
    """The Flow-GRPO objective, written from its paper and code's formulas: per-element
    Gaussian log-prob averaged over all but the batch dimension, one ratio per sample."""
    shape = (-1,) + (1,) * (z.dim() - 1)
    sigma_max = sigma_next  # the schedule's second level; used only where sigma = 1
    std_dev_t = a * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
    dt = (sigma_next - sigma).view(shape)
    s, sd = sigma.view(shape), std_dev_t.view(shape)
    mean = z * (1 + sd**2 / (2 * s) * dt) + v * (1 + sd**2 * (1 - s) / (2 * s)) * dt
    scale = sd * torch.sqrt(-dt)
    logp = -((x - mean) ** 2) / (2 * scale**2) - torch.log(scale) - math.log(math.sqrt(2 * math.pi))
    ratio = torch.exp(logp.mean(dim=tuple(range(1, z.dim()))) - old_mean_logp)
    adv = adv.clamp(-adv_clip, adv_clip)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sample_level_without_map_is_flow_grpo(backend):
    B, C, H, W = 5, 4, 6, 7
    sigma = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3], dtype=torch.float64)
    sigma_next = sigma - 0.1
    a, eps = 0.7, 1e-2
    cs, co, std = sde_coefficients(sigma, sigma_next, kind="flow", noise_level=a)
    z, v = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    x, _ = sde_step(v + 0.02 * torch.randn_like(v), z, torch.randn_like(z), coef_sample=cs,
                    coef_output=co, std=std, backend="torch")
    old = log_prob(v, z, x, coef_sample=cs, coef_output=co, std=std, ratio_level="sample",
                   backend="torch").double()
    old = old - torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64) * eps
    adv = torch.tensor([7.0, -1.0, 0.3, -0.2, 1.0], dtype=torch.float64)

    v32 = v.float().requires_grad_(True)
    loss, _ = vipo_loss(v32, z.float(), x.float(), old.float(), adv.float(), coef_sample=cs.float(),
                        coef_output=co.float(), std=std.float(), clip_range=eps, adv_clip=5.0,
                        ratio_level="sample", backend=backend)
    loss.backward()
    v64 = v.float().double().requires_grad_(True)
    expected = _flow_grpo_loss(v64, z.float().double(), x.float().double(), old.float().double(),
                               adv, sigma, sigma_next, a, eps, 5.0)
    expected.backward()
    assert rel_err(loss, expected) < 1e-5
    assert rel_err(v32.grad, v64.grad) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sample_level_map_factors_out(backend):
    """docs/method.md 3: with ratio_level='sample' the map only scales by its mean."""
    case = make_loss_case((4, 3, 5, 6), ratio_level="sample")
    with_map, _ = vipo_loss(*case.args(), **case.kwargs, backend=backend)
    case_args = list(case.args())
    scaled_adv = case.advantages.clamp(-5, 5) * case.allocation_map.mean(dim=(1, 2))
    case_args[4], case_args[5] = scaled_adv, None
    without_map, _ = vipo_loss(*case_args, **case.kwargs, backend=backend)
    assert rel_err(with_map, without_map) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ones_map_is_no_map(backend):
    case = make_loss_case((2, 3, 4, 5))
    args = list(case.args())
    args[5] = torch.ones_like(case.allocation_map)
    with_ones, _ = vipo_loss(*args, **case.kwargs, backend=backend)
    args[5] = None
    without, _ = vipo_loss(*args, **case.kwargs, backend=backend)
    assert rel_err(with_ones, without) < 1e-7


def test_torch_backend_is_the_reference():
    case = make_loss_case((3, 5, 7, 9))
    loss, _ = vipo_loss(*case.args(), **case.kwargs, backend="torch")
    ref, _ = vipo_loss_reference(*case.args(), **case.kwargs)
    assert loss.item() == ref.float().item()


def test_log_prob_constants():
    """A zero residual gives -C (log std + log(2 pi)/2) per position."""
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    v = torch.randn_like(z)
    cs, co, std = 0.9, -0.2, 0.25
    x = cs * z + co * v
    logp = log_prob_reference(v, z, x, coef_sample=cs, coef_output=co, std=std)
    expected = -3 * (math.log(0.25) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(logp, torch.full_like(logp, expected), rtol=1e-12)


def test_module_matches_functional():
    from vipo_kernels import ViPOLoss

    case = make_loss_case((2, 3, 4, 5), kl_coef=0.5)
    kwargs = dict(case.kwargs)
    options = {k: kwargs.pop(k) for k in ("clip_range", "adv_clip", "ratio_level", "kl_coef")}
    module = ViPOLoss(**options, backend="triton")
    assert "clip_range" in repr(module)
    loss, stats = module(*case.args(), **kwargs)
    expected, expected_stats = vipo_loss(*case.args(), **case.kwargs, backend="triton")
    assert loss.item() == expected.item() and stats.keys() == expected_stats.keys()
    with pytest.raises(ValueError, match="ratio_level"):
        ViPOLoss(ratio_level="pixel")
