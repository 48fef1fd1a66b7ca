"""The CUDA backend (csrc/cuda/): what test_kernels_cuda.py's shared parity suite does not
reach. Every test is gpu-marked, so a CPU-only run skips them (conftest.py); they also
skip where the extension was built without CUDA.

Covered here: every launch width (block_p), the scalar fallback for misaligned pointers
and strides, mixed input dtypes, in-place 16-bit gradients, outputs handed in poisoned,
the ops' own argument errors, and agreement with the C++ CPU kernels.
"""

from __future__ import annotations

import pytest
import torch

from vipo_kernels import backends, sde_step, vipo_loss
from vipo_kernels.partials import N_COLUMNS

from .test_kernels import VIDEO, _step_inputs, check_loss_case, run_loss
from .utils import LossCase, make_loss_case, rel_err

pytestmark = pytest.mark.gpu
IMAGE = (3, 5, 7, 9)


@pytest.fixture
def cuda_backend():
    if not backends.available("cuda"):
        pytest.skip("the extension was built without CUDA")
    from vipo_kernels import compiled_backend

    return compiled_backend.load("cuda")


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """The same values in storage offset by one element, so no 4-position pack is
    aligned and the kernels take their element-by-element path."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = flat[1:].view(x.shape)
    out.copy_(x)
    return out


@pytest.mark.parametrize("block_p", [128, 256, 512, 1024])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
def test_every_launch_width(cuda_backend, monkeypatch, block_p, ratio_level):
    """32 to 256 threads per block: the block reduction over 1 to 8 warps."""
    monkeypatch.setattr(cuda_backend, "block_positions", lambda B, C, P, device: block_p)
    case = make_loss_case((3, 5, 37, 41), ratio_level=ratio_level, kl_coef=0.5, device="cuda",
                          rewards=2)
    check_loss_case(case, "cuda", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_inputs(cuda_backend, dtype):
    case = make_loss_case(VIDEO, dtype, kl_coef=0.5, device="cuda")
    case.model_output = _misaligned(case.model_output)
    case.sample = _misaligned(case.sample)
    case.kwargs["ref_model_output"] = _misaligned(case.kwargs["ref_model_output"])
    check_loss_case(case, "cuda", dtype)
    (v, z, noise), coefs = _step_inputs(VIDEO, dtype)
    v, z, noise = (_misaligned(t.cuda()) for t in (v, z, noise))
    coefs = {k: c.cuda() for k, c in coefs.items()}
    nxt, logp = sde_step(v, z, noise, **coefs, backend="cuda")
    same_next, same_logp = sde_step(v, z, noise, **coefs, backend="torch")
    assert torch.equal(nxt, same_next)
    assert rel_err(logp, same_logp) < 1e-5


def test_mixed_input_dtypes(cuda_backend):
    """bf16 model output with fp32 latents (one kernel instantiation), and an fp16
    reference (converted to v's dtype by cuda_backend)."""
    case = make_loss_case(IMAGE, kl_coef=0.5, device="cuda")
    case.model_output = case.model_output.to(torch.bfloat16)
    case.kwargs["ref_model_output"] = case.kwargs["ref_model_output"].to(torch.float16)
    check_loss_case(case, "cuda", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
def test_inplace_backward(cuda_backend, dtype, ratio_level):
    case = make_loss_case(IMAGE, dtype, ratio_level=ratio_level, kl_coef=0.5, device="cuda")
    _, _, expected = run_loss(case, "cuda", torch.tensor(1.0, device="cuda"))
    leaf = case.model_output.detach().clone().requires_grad_(True)
    v = leaf * 1.0
    loss, _ = vipo_loss(v, *case.args()[1:], **case.kwargs, backend="cuda",
                        inplace_backward=True)
    loss.backward()
    assert torch.equal(leaf.grad, expected) and torch.equal(v.detach(), expected)


def test_outputs_poisoned_by_caller(cuda_backend):
    case = make_loss_case((3, 5, 7, 9), kl_coef=0.5, device="cuda")
    v, z, x = (t.reshape(3, 5, -1) for t in case.args()[:3])
    ref = case.kwargs["ref_model_output"].reshape(3, 5, -1)
    B, C, P = v.shape
    cs, co, sd = (case.kwargs[k] for k in ("coef_sample", "coef_output", "std"))
    old, amap = case.old_log_prob.reshape(B, P), case.allocation_map.reshape(B, P).float()
    adv = case.advantages.float().reshape(B, 1)
    bp = cuda_backend.block_positions(B, C, P, v.device)
    k = -(-P // bp)
    nan = float("nan")
    grad = torch.full_like(v, nan)
    partials = torch.full((B, k, N_COLUMNS), nan, device="cuda")
    _, stats = cuda_backend.loss_position(v, z, x, old, adv, torch.ones(1, device="cuda"), amap,
                                          cs, co, sd, ref, grad, clip_range=1e-2, adv_clip=5.0,
                                          kl_coef=0.5, partials_out=partials)
    assert torch.isfinite(grad).all() and torch.isfinite(partials).all()
    assert torch.isfinite(stats).all()
    kl = torch.full((B, k), nan, device="cuda")
    cuda_backend.grad_sample(v, z, x, adv[:, 0], cs, co, sd, ref, grad.fill_(nan), kl_coef=0.5,
                             kl_out=kl)
    assert torch.isfinite(grad).all() and torch.isfinite(kl).all()
    nxt, logp = torch.full_like(z, nan), torch.full((B, P), nan, device="cuda")
    cuda_backend.step(v, z, x, cs, co, sd, next_out=nxt, logp_out=logp)
    assert torch.isfinite(nxt).all() and torch.isfinite(logp).all()


def test_op_argument_errors(cuda_backend):
    v, z, x = (torch.randn(2, 3, 20, device="cuda") for _ in range(3))
    cs = co = sd = torch.ones(2, device="cuda")
    logp = torch.empty(2, 20, device="cuda")
    with pytest.raises(ValueError, match="block_p must be a multiple of 128"):
        torch.ops.vipo.log_prob(v, z, x, cs, co, sd, logp, 100)
    with pytest.raises(ValueError, match="x \\(or noise\\) must have z's dtype"):
        torch.ops.vipo.log_prob(v, z, x.half(), cs, co, sd, logp, 128)
    with pytest.raises(ValueError, match="cs is on cpu"):
        torch.ops.vipo.log_prob(v, z, x, cs.cpu(), co, sd, logp, 128)
    with pytest.raises(ValueError, match="dloss is on cpu"):
        torch.ops.vipo.scale_grad(v, torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_agrees_with_cpp(cuda_backend, dtype):
    """The two compiled backends implement one algorithm: same loss, stats, gradient."""
    if not backends.available("cpp"):
        pytest.skip("the C++ backend is not built")
    case = make_loss_case(VIDEO, dtype, kl_coef=0.5, device="cuda", rewards=3)
    cpu_case = LossCase(*(t.cpu() if t is not None else None for t in case.args()),
                        {k: a.cpu() if torch.is_tensor(a) else a for k, a in case.kwargs.items()})
    upstream = torch.tensor(1.7)
    loss, stats, grad = run_loss(case, "cuda", upstream.cuda())
    cpu_loss, cpu_stats, cpu_grad = run_loss(cpu_case, "cpp", upstream)
    assert rel_err(loss.cpu(), cpu_loss) < 1e-5
    # fp32: rounding only; bf16: the stored gradient may differ by one bf16 ulp (2^-8).
    assert rel_err(grad.cpu(), cpu_grad) < (1e-5 if dtype == torch.float32 else 1e-2)
    for name in stats:
        assert rel_err(stats[name].cpu(), cpu_stats[name]) < 1e-4, name
