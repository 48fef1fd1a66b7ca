"""Every kernel backend against the float64 reference, through the public API.

Runs each available CPU kernel backend (Triton under the interpreter, the C++ extension
when built); ``test_kernels_cuda.py`` repeats the parity checks on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from vipo_kernels import backends, log_prob, sde_coefficients, sde_step, vipo_loss
from vipo_kernels.reference import log_prob_reference, sde_step_reference

from .utils import assert_matches, make_loss_case, natural_scales, oracle, rel_err

CPU_BACKENDS = [b for b in ("triton", "cpp") if backends.available(b)]
IMAGE, VIDEO, ODD, TINY = (3, 5, 7, 9), (2, 4, 3, 5, 6), (5, 3, 1, 13), (1, 1, 1, 1)
WIDE = (3, 64, 5, 7)  # many channels: a log-ratio is a difference of two O(C) log-densities
LOW_PRECISION = (torch.bfloat16, torch.float16)


def run_loss(case, backend, upstream, **extra):
    v = case.model_output.detach().clone().requires_grad_(True)
    loss, stats = vipo_loss(v, *case.args()[1:], **case.kwargs, backend=backend, **extra)
    (grad,) = torch.autograd.grad(loss * upstream, v)
    return loss.detach(), stats, grad


def check_loss_case(case, backend, dtype, **extra):
    upstream = torch.randn(()) * 3  # a random upstream gradient, not 1
    loss, stats, grad = run_loss(case, backend, upstream, **extra)
    ref_loss, ref_stats, ref_grad = oracle(case)
    same_loss, same_stats, same_grad = run_loss(case, "torch", upstream)
    assert loss.dtype == torch.float32 and grad.dtype == case.model_output.dtype
    assert torch.isfinite(grad).all(), "NaN/inf in the gradient (an unwritten element?)"
    scales = natural_scales(case, ref_stats)
    assert_matches("loss", loss, same_loss, ref_loss, dtype, scale=scales["loss"])
    assert_matches("grad", grad, same_grad, ref_grad * upstream, dtype)
    for name, ref_value in ref_stats.items():
        assert stats[name].dtype == torch.float32
        assert_matches(name, stats[name], same_stats[name], ref_value, dtype, scale=scales[name])
    return ref_stats


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [IMAGE, VIDEO, ODD, TINY, WIDE],
                         ids=["image", "video", "odd", "tiny", "wide"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("with_map,kl_coef", [(True, 0.0), (False, 0.0), (True, 0.5)],
                         ids=["map", "nomap", "map-kl"])
def test_loss_fp32(backend, shape, ratio_level, with_map, kl_coef):
    case = make_loss_case(shape, ratio_level=ratio_level, with_map=with_map, kl_coef=kl_coef)
    ref_stats = check_loss_case(case, backend, torch.float32)
    if shape == IMAGE and ratio_level == "position":
        # The case really spans all three regimes of the clip.
        assert 0 < ref_stats["clip_frac_low"] < 1 and 0 < ref_stats["clip_frac_high"] < 1
        assert ref_stats["clip_frac_low"] + ref_stats["clip_frac_high"] < 1


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
@pytest.mark.parametrize("rewards", [1, 2, 3])
@pytest.mark.parametrize("shape", [IMAGE, VIDEO], ids=["image", "video"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("with_map,kl_coef", [(True, 0.0), (False, 0.5)], ids=["map", "nomap-kl"])
def test_loss_rewards(backend, rewards, shape, ratio_level, with_map, kl_coef):
    """(B, K) advantages with weights of both signs: sum_k w_k L_clip(A_k) + L_KL in one call
    against the sum of K single-reward float64 reference losses (tests/utils.py oracle),
    with the per-reward losses; the reference itself (backend="torch") too."""
    case = make_loss_case(shape, ratio_level=ratio_level, with_map=with_map, kl_coef=kl_coef,
                          rewards=rewards)
    check_loss_case(case, backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_reward_column_is_the_vector_case(backend):
    """(B, 1) advantages and reward_weights=[1] give exactly the (B,) call."""
    case = make_loss_case(IMAGE, kl_coef=0.5)
    vector_loss, vector_stats, vector_grad = run_loss(case, backend, torch.tensor(1.0))
    case.advantages = case.advantages[:, None]
    case.kwargs["reward_weights"] = [1.0]
    column_loss, column_stats, column_grad = run_loss(case, backend, torch.tensor(1.0))
    assert torch.equal(vector_loss, column_loss) and torch.equal(vector_grad, column_grad)
    assert vector_stats["loss_clip_per_reward"].shape == (1,)
    for name, value in vector_stats.items():
        assert torch.equal(value, column_stats[name]), name


@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_triton_many_blocks(monkeypatch, ratio_level, kl_coef):
    """Small tiles: many position blocks per sample and a masked tail, so the partial sums,
    minima and maxima really are reduced across programs."""
    from vipo_kernels import triton_backend

    monkeypatch.setitem(triton_backend.TILE_BUDGET, "cpu", 64)
    case = make_loss_case((3, 5, 7, 9), ratio_level=ratio_level, kl_coef=kl_coef, rewards=2)
    check_loss_case(case, "triton", torch.float32)
    (v, z, noise), coefs = _step_inputs(VIDEO, torch.float32)
    nxt, logp = sde_step(v, z, noise, **coefs, backend="triton")
    same_next, same_logp = sde_step(v, z, noise, **coefs, backend="torch")
    assert rel_err(nxt, same_next) < 1e-6 and rel_err(logp, same_logp) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("rewards", [None, 2], ids=["1-reward", "2-rewards"])
def test_loss_low_precision(backend, dtype, ratio_level, rewards):
    case = make_loss_case(IMAGE, dtype, ratio_level=ratio_level, kl_coef=0.5, rewards=rewards)
    check_loss_case(case, backend, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["batch", "position"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
def test_loss_noncontiguous(backend, layout, ratio_level):
    case = make_loss_case(VIDEO, ratio_level=ratio_level, kl_coef=0.5, noncontiguous=layout)
    assert not case.model_output.is_contiguous()
    check_loss_case(case, backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_default_clip_range(backend):
    case = make_loss_case(IMAGE, clip_range=1e-4)
    check_loss_case(case, backend, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
def test_inplace_backward(backend, ratio_level):
    """The opt-in in-place gradient equals the default and lands in model_output's memory."""
    case = make_loss_case(IMAGE, ratio_level=ratio_level, kl_coef=0.5)
    _, _, expected = run_loss(case, backend, torch.tensor(1.0))
    leaf = case.model_output.detach().clone().requires_grad_(True)
    v = leaf * 1.0  # a non-leaf whose memory the loss may overwrite, as a model output is
    loss, _ = vipo_loss(v, *case.args()[1:], **case.kwargs, backend=backend,
                        inplace_backward=True)
    loss.backward()
    assert rel_err(leaf.grad, expected) < 1e-6
    assert rel_err(v.detach(), expected) < 1e-6, "gradient was not written in place"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_refuses_saved_output(backend):
    """If autograd saved model_output, the in-place write must fail loudly, not corrupt."""
    case = make_loss_case(IMAGE, kl_coef=0.0)
    leaf = case.model_output.detach().clone().requires_grad_(True)
    v = leaf.exp()  # exp saves its output for backward
    loss, _ = vipo_loss(v, *case.args()[1:], **case.kwargs, backend=backend,
                        inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_without_grad(backend):
    """Forward only (no grad wanted) gives the same loss and stats."""
    case = make_loss_case(IMAGE, kl_coef=0.5)
    with torch.no_grad():
        loss, stats = vipo_loss(*case.args(), **case.kwargs, backend=backend)
    ref_loss, ref_stats, _ = oracle(case)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(stats["approx_kl"], ref_stats["approx_kl"]) < 1e-5


def _step_inputs(shape, dtype, noncontiguous=False):
    batch = shape[0]
    sigma = torch.rand(batch) * 0.8 + 0.15
    cs, co, std = sde_coefficients(sigma, sigma * 0.7, kind="flow", noise_level=0.7)
    tensors = [torch.randn(shape).to(dtype) for _ in range(3)]
    if noncontiguous:
        tensors = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in tensors]
    return tensors, dict(coef_sample=cs, coef_output=co, std=std)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [IMAGE, VIDEO, ODD], ids=["image", "video", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=["fp32", "bf16", "fp16"])
def test_sde_step(backend, shape, dtype):
    (v, z, noise), coefs = _step_inputs(shape, dtype, noncontiguous=shape == VIDEO)
    nxt, logp = sde_step(v, z, noise, **coefs, backend=backend)
    assert nxt.dtype == dtype and logp.dtype == torch.float32
    assert logp.shape == (shape[0], *shape[2:])
    ref_next, _ = sde_step_reference(v.double(), z.double(), noise.double(),
                                     **{k: c.double() for k, c in coefs.items()})
    same_next, same_logp = sde_step(v, z, noise, **coefs, backend="torch")
    # Rounding to a low-precision dtype can land one ulp apart; the log-prob is then
    # compared on the sample the kernel actually stored.
    assert_matches("next_sample", nxt, same_next, ref_next, dtype)
    ref_logp = log_prob_reference(v.double(), z.double(), nxt.double(),
                                  **{k: c.double() for k, c in coefs.items()})
    assert rel_err(logp, ref_logp) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_log_prob(backend, ratio_level, dtype):
    (v, z, x), coefs = _step_inputs(VIDEO, dtype)
    logp = log_prob(v, z, x, **coefs, ratio_level=ratio_level, backend=backend)
    ref = log_prob_reference(v.double(), z.double(), x.double(), ratio_level=ratio_level,
                             **{k: c.double() for k, c in coefs.items()})
    assert logp.dtype == torch.float32 and logp.shape == ref.shape
    assert rel_err(logp, ref) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_then_loss_is_on_policy(backend):
    """Rollout log-probs recomputed from the stored bf16 sample give ratio 1 exactly
    enough that nothing clips at the default eps (docs/method.md 7's on-policy check)."""
    (v, z, noise), coefs = _step_inputs(IMAGE, torch.bfloat16)
    nxt, logp = sde_step(v, z, noise, **coefs, backend=backend)
    adv = torch.tensor([1.0, -1.0, 0.5])
    _, stats = vipo_loss(v, z, nxt, logp, adv, **coefs, backend=backend)
    assert stats["clip_frac_low"] == 0 and stats["clip_frac_high"] == 0
    assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
@pytest.mark.parametrize("wrapped", [False, True], ids=["direct", "inside-ops"])
def test_under_torch_compile(backend, wrapped):
    """The loss inside a torch.compile'd function, called on the leaf itself or between
    other ops: same loss and gradient as eager (for "torch" too, where Inductor once
    returned the directly called loss without a grad_fn)."""
    case = make_loss_case(IMAGE)

    def loss_of(v):
        loss, _ = vipo_loss(v * 1.0 if wrapped else v, *case.args()[1:], **case.kwargs,
                            backend=backend)
        return 2.0 * loss if wrapped else loss

    torch._dynamo.reset()
    compiled_v = case.model_output.clone().requires_grad_(True)
    compiled_loss = torch.compile(loss_of)(compiled_v)
    compiled_loss.backward()
    eager_v = case.model_output.clone().requires_grad_(True)
    eager_loss = loss_of(eager_v)
    eager_loss.backward()
    assert rel_err(compiled_loss, eager_loss) < 1e-6
    assert rel_err(compiled_v.grad, eager_v.grad) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_backward_is_refused(backend):
    """The gradient buffer is handed to autograd on the first backward: a second one
    through the same loss must raise, not return a stale or missing gradient."""
    case = make_loss_case(IMAGE)
    v = case.model_output.clone().requires_grad_(True)
    loss, _ = vipo_loss(v, *case.args()[1:], **case.kwargs, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_implement_the_protocol(backend):
    """Every kernel backend is one object with the five primitives of KernelBackend."""
    impl = backends.resolve(backend, torch.device("cpu"))
    assert isinstance(impl, backends.KernelBackend)


def test_triton_launcher_names_a_bad_argument():
    """The Triton launchers check their arguments as the compiled ops do."""
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton is not installed")
    from vipo_kernels import triton_backend

    v = torch.randn(2, 3, 5)
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="x must be"):
        triton_backend.log_prob(v, v, v[:, :2], ones, ones, ones)
    with pytest.raises(ValueError, match="std must be a contiguous float32"):
        triton_backend.log_prob(v, v, v, ones, ones, ones.double())
    with pytest.raises(ValueError, match="weights must have shape"):
        triton_backend.loss_position(v, v, v, torch.zeros(2, 5), torch.ones(2, 2),
                                     torch.ones(3), None, ones, ones, ones, None, None,
                                     clip_range=0.1,
                                     adv_clip=5.0, kl_coef=0.0)
