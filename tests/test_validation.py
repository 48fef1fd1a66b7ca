"""Bad input gets a clear error that names the argument, on every backend."""

from __future__ import annotations

import pytest
import torch

from vipo_kernels import backends, log_prob, sde_coefficients, sde_step, vipo_loss

from .utils import make_loss_case

BACKENDS = ["torch"] + [b for b in ("triton", "cpp") if backends.available(b)]


def _loss_call(which_backend, **changes):
    case = make_loss_case((2, 3, 4, 5), kl_coef=0.0)
    args = dict(model_output=case.model_output, sample=case.sample, next_sample=case.next_sample,
                old_log_prob=case.old_log_prob, advantages=case.advantages,
                allocation_map=case.allocation_map)
    kwargs = dict(case.kwargs, backend=which_backend)
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value(args, kwargs) if callable(value) else value
    return vipo_loss(*args.values(), **kwargs)


BAD_LOSS_INPUTS = {
    "sample shape": (ValueError, "sample", dict(sample=lambda a, k: a["sample"][:, :2])),
    "next_sample rank": (ValueError, "next_sample", dict(next_sample=lambda a, k: a["next_sample"][0])),
    "integer model_output": (TypeError, "model_output",
                             dict(model_output=lambda a, k: a["model_output"].long())),
    "integer advantages": (TypeError, "advantages", dict(advantages=torch.tensor([1, -1]))),
    "old_log_prob shape": (ValueError, "old_log_prob",
                           dict(old_log_prob=lambda a, k: a["old_log_prob"][:, :2])),
    "advantages shape": (ValueError, "advantages", dict(advantages=torch.zeros(3))),
    "advantages rank": (ValueError, "advantages", dict(advantages=torch.zeros(2, 2, 1))),
    "advantages 2-d nan": (ValueError, "advantages",
                           dict(advantages=torch.tensor([[1.0, float("nan")], [0.5, 1.0]]))),
    "reward_weights count": (ValueError, "reward_weights",
                             dict(advantages=torch.ones(2, 2), reward_weights=[1.0])),
    "reward_weights nan": (ValueError, "reward_weights", dict(reward_weights=[float("nan")])),
    "reward_weights tensor shape": (ValueError, "reward_weights",
                                    dict(advantages=torch.ones(2, 2),
                                         reward_weights=torch.ones(3))),
    "advantages nan": (ValueError, "advantages", dict(advantages=torch.tensor([float("nan"), 1.0]))),
    "advantages inf": (ValueError, "advantages", dict(advantages=torch.tensor([float("inf"), 1.0]))),
    "map inf": (ValueError, "allocation_map must be finite and >= 0",
                dict(allocation_map=lambda a, k: a["allocation_map"] / 0.0)),
    "map negative": (ValueError, "allocation_map",
                     dict(allocation_map=lambda a, k: a["allocation_map"] - 1.5)),
    "map nan": (ValueError, "allocation_map",
                dict(allocation_map=lambda a, k: a["allocation_map"] * float("nan"))),
    "map shape": (ValueError, "allocation_map",
                  dict(allocation_map=lambda a, k: a["allocation_map"][:, :1])),
    "std zero": (ValueError, "std", dict(std=lambda a, k: k["std"] * 0)),
    "std negative": (ValueError, "std", dict(std=-0.1)),
    "std shape": (ValueError, "std", dict(std=torch.ones(5))),
    "old nan": (ValueError, "old_log_prob",
                dict(old_log_prob=lambda a, k: a["old_log_prob"] * float("nan"))),
    "ratio_level": (ValueError, "ratio_level", dict(ratio_level="token")),
    "backend": (ValueError, "backend", dict(backend="jax")),
    "clip_range": (ValueError, "clip_range", dict(clip_range=0.0)),
    "kl without ref": (ValueError, "ref_model_output", dict(kl_coef=0.1)),
    "kl ref shape": (ValueError, "ref_model_output",
                     dict(kl_coef=0.1, ref_model_output=torch.zeros(2, 3, 4, 4))),
    "device": (ValueError, "sample", dict(sample=lambda a, k: a["sample"].to("meta"))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_LOSS_INPUTS), ids=list(BAD_LOSS_INPUTS))
def test_bad_loss_input(backend, case):
    error, name, changes = BAD_LOSS_INPUTS[case]
    with pytest.raises(error, match=name):
        _loss_call(backend, **changes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_above_one_is_accepted(backend):
    """The contract is M finite and >= 0 (map_norm=mean_one exceeds 1): such a map is the
    reference's loss, with A x M as given."""
    case = make_loss_case((2, 3, 4, 5), kl_coef=0.0)
    amap = case.allocation_map * 3.0 + 0.5
    loss, _ = vipo_loss(*case.args()[:5], amap, **case.kwargs, backend=backend)
    expected, _ = vipo_loss(*case.args()[:5], amap.double(), **case.kwargs, backend="torch")
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_sample_level_old_log_prob_shape():
    with pytest.raises(ValueError, match="old_log_prob"):
        _loss_call("torch", ratio_level="sample")  # a (B, H, W) old log-prob


@pytest.mark.parametrize("kwargs,name", [
    (dict(kind="ddim"), "kind"),
    (dict(kind="dance", eta=0.0), "eta"),
    (dict(kind="flow", noise_level=-1.0), "noise_level"),
])
def test_bad_coefficients(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sde_coefficients(torch.tensor([0.8]), torch.tensor([0.6]), **kwargs)


@pytest.mark.parametrize("sigma,sigma_next,name", [
    (1.5, 0.5, "sigma"), (0.0, 0.0, "sigma"), (0.5, 0.6, "sigma_next"), (0.5, -0.1, "sigma_next"),
])
def test_bad_sigmas(sigma, sigma_next, name):
    with pytest.raises(ValueError, match=name):
        sde_coefficients(sigma, sigma_next)


def test_flow_first_step_to_zero_is_refused():
    with pytest.raises(ValueError, match="sigma_next"):
        sde_coefficients(1.0, 0.0, kind="flow")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_step_inputs(backend):
    z = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="noise"):
        sde_step(z, z, z[:, :, :2], coef_sample=1.0, coef_output=-0.1, std=0.1, backend=backend)
    with pytest.raises(ValueError, match="std"):
        sde_step(z, z, z, coef_sample=1.0, coef_output=-0.1, std=0.0, backend=backend)
    with pytest.raises(TypeError, match="coef_output"):
        sde_step(z, z, z, coef_sample=1.0, coef_output=None, std=0.1, backend=backend)
    with pytest.raises(ValueError, match="ratio_level"):
        log_prob(z, z, z, coef_sample=1.0, coef_output=-0.1, std=0.1, ratio_level="x",
                 backend=backend)


def test_unavailable_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "cuda", ("vipo_kernels._no_such_module", "cuda"))
    monkeypatch.setattr(backends, "_resolved", {})
    z = torch.randn(1, 1, 2, 2)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        sde_step(z, z, z, coef_sample=1.0, coef_output=-0.1, std=0.1, backend="cuda")
    with pytest.raises(RuntimeError, match="pip install"):
        backends._import("cuda")


def test_inputs_are_not_modified():
    """No data is lost: the default path leaves every input untouched."""
    case = make_loss_case((2, 3, 4, 5), kl_coef=0.5)
    before = [a.clone() for a in case.args() if a is not None]
    v = case.model_output.clone().requires_grad_(True)
    loss, _ = vipo_loss(v, *case.args()[1:], **case.kwargs, backend="triton")
    loss.backward()
    after = [a for a in case.args() if a is not None]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
