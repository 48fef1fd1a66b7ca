"""GPU: fused loss (forward + backward) and SDE step of the Triton and CUDA backends
against eager and compiled torch (the CPU counterpart is bench_cpu.py).

    pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/<device>.json

Each case first checks the backend against the eager reference, then times it. GB/s is
the minimum traffic (inputs.py) over the median time, for every implementation alike.
"""

from __future__ import annotations

import pytest
import torch

from vipo_kernels import backends, sde_step, vipo_loss
from vipo_kernels.reference import sde_step_reference, vipo_loss_reference

from .inputs import loss_bytes, loss_inputs, step_bytes
from .shapes import SHAPES

DEVICE = "cuda"
KERNELS = [b for b in ("triton", "cuda") if backends.available(b)]
IMPLS = ["torch-eager", "torch-compile", *KERNELS]
DTYPES = [torch.bfloat16, torch.float32]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
_compiled = {}


def _sync():
    torch.cuda.synchronize()


def _reference_loss_only(*args, **kwargs):
    return vipo_loss_reference(*args, **kwargs)[0], None


def _loss_fn(impl):
    if impl == "torch-compile":
        # Compiles the loss alone: with the stats dict among its outputs, torch 2.13's
        # compiled graph returned a loss without grad_fn.
        return _compiled.setdefault("loss", torch.compile(_reference_loss_only))
    backend = "torch" if impl == "torch-eager" else impl

    def fn(*args, **kwargs):
        return vipo_loss(*args, **kwargs, backend=backend)
    return fn


def _step_fn(impl):
    if impl == "torch-compile":
        return _compiled.setdefault("step", torch.compile(sde_step_reference))
    backend = "torch" if impl == "torch-eager" else impl

    def fn(*args, **kwargs):
        return sde_step(*args, **kwargs, backend=backend)
    return fn


def _record(benchmark, shape, dtype, nbytes):
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                                bytes=nbytes, gbps=round(nbytes / median / 1e9, 2))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("preset", list(SHAPES))
def test_loss_fwd_bwd(benchmark, preset, dtype, impl):
    shape = SHAPES[preset]
    (v, *rest), kwargs = loss_inputs(shape, dtype, DEVICE)
    fn = _loss_fn(impl)

    def fwd_bwd():
        x = v.detach().requires_grad_(True)
        loss, _ = fn(x, *rest, **kwargs)
        loss.backward()
        _sync()
        return loss, x.grad

    loss, grad = fwd_bwd()
    reference = _loss_fn("torch-eager")  # check before timing (llm.c)
    x = v.detach().requires_grad_(True)
    ref_loss, _ = reference(x, *rest, **kwargs)
    ref_loss.backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(loss.float(), ref_loss.float(), rtol=tol, atol=1e-6)
    assert (grad.float() - x.grad.float()).abs().max() <= tol * x.grad.float().abs().max()
    benchmark.pedantic(fwd_bwd, rounds=10, iterations=1, warmup_rounds=2)
    _record(benchmark, shape, dtype, loss_bytes(shape, dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("preset", list(SHAPES))
def test_sde_step(benchmark, preset, dtype, impl):
    shape = SHAPES[preset]
    (v, z, _, _, _, _), kwargs = loss_inputs(shape, dtype, DEVICE)
    noise = torch.randn_like(z)
    fn = _step_fn(impl)

    def step():
        out = fn(v, z, noise, **kwargs)
        _sync()
        return out

    nxt, logp = step()
    ref_next, ref_logp = sde_step(v, z, noise, **kwargs, backend="torch")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (nxt.float() - ref_next.float()).abs().max() <= tol * ref_next.float().abs().max()
    assert (logp - ref_logp).abs().max() <= tol * ref_logp.abs().max()
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    _record(benchmark, shape, dtype, step_bytes(shape, dtype))
