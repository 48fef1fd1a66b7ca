"""The CPU parity suite repeated on a CUDA device (skipped without one). Run on a GPU
machine by benchmarks/gpu_check.sh with VIPO_TEST_CUDA=1, so Triton compiles for real."""

from __future__ import annotations

import pytest
import torch

from vipo_kernels import backends, log_prob, sde_coefficients, sde_step, vipo_loss
from vipo_kernels.reference import log_prob_reference

from .test_kernels import IMAGE, ODD, VIDEO, check_loss_case
from .utils import assert_matches, make_loss_case, natural_scales, oracle, rel_err

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["triton", "cuda"]
FLUX = (12, 16, 64, 64)
LARGE = (2, 16, 1, 70_000)  # over 65k positions in one sample (FlashAttention's large-vocab case)


def _backend_or_skip(backend):
    if not backends.available(backend):
        pytest.skip(f"backend {backend!r} not built here")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [IMAGE, VIDEO, ODD, FLUX, LARGE],
                         ids=["image", "video", "odd", "flux", "large"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rewards", [None, 3], ids=["1-reward", "3-rewards"])
def test_loss_cuda(backend, shape, ratio_level, dtype, rewards):
    _backend_or_skip(backend)
    case = make_loss_case(shape, dtype, ratio_level=ratio_level, kl_coef=0.5, device="cuda",
                          rewards=rewards)
    check_loss_case(case, backend, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["batch", "position"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_cuda_noncontiguous(backend, layout, ratio_level, dtype):
    """Latents (and the KL reference) in a non-contiguous layout made on the device."""
    _backend_or_skip(backend)
    case = make_loss_case(VIDEO, dtype, ratio_level=ratio_level, kl_coef=0.5,
                          noncontiguous=layout, device="cuda")
    for t in (case.model_output, case.sample, case.next_sample,
              case.kwargs["ref_model_output"]):
        assert t.is_cuda and not t.is_contiguous()
    check_loss_case(case, backend, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_loss_cuda_many_samples(backend):
    """More samples than a CUDA grid's second dimension allows (65535)."""
    _backend_or_skip(backend)
    case = make_loss_case((70_000, 2, 1, 3), kl_coef=0.5, device="cuda")
    check_loss_case(case, backend, torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_cuda(backend, dtype):
    _backend_or_skip(backend)
    B = FLUX[0]
    cs, co, std = sde_coefficients(torch.rand(B) * 0.8 + 0.15, torch.full((B,), 0.1))
    v, z, noise = (torch.randn(FLUX, device="cuda").to(dtype) for _ in range(3))
    coefs = dict(coef_sample=cs.cuda(), coef_output=co.cuda(), std=std.cuda())
    nxt, logp = sde_step(v, z, noise, **coefs, backend=backend)
    same_next, _ = sde_step(v, z, noise, **coefs, backend="torch")
    assert rel_err(nxt, same_next) < (1e-6 if dtype == torch.float32 else 1e-2)
    ref = log_prob_reference(v.double(), z.double(), nxt.double(),
                             **{k: c.double() for k, c in coefs.items()})
    assert rel_err(logp, ref) < 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_cuda(backend):
    """The fused loss inside a torch.compile'd training step."""
    _backend_or_skip(backend)
    case = make_loss_case(IMAGE, kl_coef=0.5, device="cuda")

    def step(v):
        loss, _ = vipo_loss(v, *case.args()[1:], **case.kwargs, backend=backend)
        return loss

    v = case.model_output.clone().requires_grad_(True)
    loss = torch.compile(step)(v)
    loss.backward()
    v_eager = case.model_output.clone().requires_grad_(True)
    step(v_eager).backward()
    assert rel_err(loss, step(v_eager.detach())) < 1e-6
    assert rel_err(v.grad, v_eager.grad) < 1e-6


@pytest.mark.parametrize("backend", ["torch", *GPU_BACKENDS])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
def test_no_host_sync(backend, ratio_level):
    """A full loss forward and backward (two rewards, KL, a map, a random upstream gradient),
    sde_step and log_prob under torch.cuda.set_sync_debug_mode("error"): any device-to-host
    synchronisation raises. The results are then checked against the float64 reference."""
    if backend != "torch":
        _backend_or_skip(backend)
    case = make_loss_case(FLUX, ratio_level=ratio_level, kl_coef=0.5, device="cuda", rewards=2)
    # Built before the check: a tensor from host values is a copy the debug mode reports.
    kwargs = dict(case.kwargs, reward_weights=torch.tensor(case.kwargs["reward_weights"],
                                                           device="cuda"))
    upstream = torch.randn((), device="cuda") * 3
    coefs = {k: kwargs[k] for k in ("coef_sample", "coef_output", "std")}
    z, noise = case.sample, torch.randn_like(case.sample)

    def run():
        v = case.model_output.detach().clone().requires_grad_(True)
        loss, stats = vipo_loss(v, *case.args()[1:], **kwargs, backend=backend)
        (loss * upstream).backward()
        nxt, logp = sde_step(v.detach(), z, noise, **coefs, backend=backend)
        logp_sample = log_prob(v.detach(), z, nxt, **coefs, ratio_level="sample",
                               backend=backend)
        return loss, stats, v.grad, logp, logp_sample

    run()  # compiles the Triton kernels and fills the caches outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats, grad, logp, logp_sample = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref_loss, ref_stats, ref_grad = oracle(case)
    scales = natural_scales(case, ref_stats)
    assert_matches("loss", loss, loss, ref_loss, torch.float32, scale=scales["loss"])
    assert_matches("grad", grad, grad, ref_grad * upstream.cpu(), torch.float32)
    assert torch.isfinite(logp).all() and torch.isfinite(logp_sample).all()
