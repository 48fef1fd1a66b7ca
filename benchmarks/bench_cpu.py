"""CPU benchmark of the C++ backend: the fused loss (forward + backward) and the SDE step,
against the eager float32 reference and torch.compile of the reference, at the Flux
(B=12, C=16, 64x64) and Wan (B=8, C=16, 14x30x52) latent sizes; and the peak memory of the
fused loss against the eager reference.

    pytest benchmarks/bench_cpu.py --benchmark-only --benchmark-json out.json
    python benchmarks/bench_cpu.py out.json     # markdown tables with the ratios

Each case first checks its implementation against the float64 reference (the loss)
or the eager one (the step; llm.c: assert, then time), then times it. Threads are torch's (torch.set_num_threads), for every
implementation alike. GB/s is the minimum traffic over the median time.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from vipo_kernels import backends, sde_step, vipo_loss
from vipo_kernels.reference import sde_step_reference, vipo_loss_reference

from benchmarks.inputs import loss_inputs, step_inputs  # noqa: E402  (a package import: also a script)
from benchmarks.memory import peak_extra_bytes  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
IMPLS = ["cpp", "torch-eager", "torch-compile"]
_compiled: dict[str, object] = {}

pytestmark = pytest.mark.skipif(not backends.available("cpp"),
                                reason="the C++ extension is not built")


def _inputs(shape):
    """A rollout step with ratios below, inside and above [1 - eps, 1 + eps] (each at least
    eps/2 from an edge, benchmarks/inputs.py), a map, fp32; and the step's noise."""
    args, kwargs = loss_inputs(shape)
    (_, _, noise), _ = step_inputs(shape)
    return args, kwargs, noise


def _elements(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _loss_bytes(shape):
    """Read v, z, z' and write dL/dv (fp32), read the old log-prob and the map."""
    return 4 * 4 * _elements(shape) + 2 * 4 * _elements(shape) // shape[1]


def _step_bytes(shape):
    """Read v, z, noise and write z' (fp32), write the log-prob."""
    return 4 * 4 * _elements(shape) + 4 * _elements(shape) // shape[1]


def _reference_loss(*args, **kwargs):
    return vipo_loss_reference(*args, **kwargs)[0]


def _loss_fn(impl):
    if impl == "cpp":
        return lambda *a, **k: vipo_loss(*a, **k, backend="cpp")[0]
    if impl == "torch-compile":
        return _compiled.setdefault("loss", torch.compile(_reference_loss))
    return _reference_loss


def _step_fn(impl):
    if impl == "cpp":
        return lambda *a, **k: sde_step(*a, **k, backend="cpp")
    if impl == "torch-compile":
        return _compiled.setdefault("step", torch.compile(sde_step_reference))
    return sde_step_reference


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _record(benchmark, impl, shape, nbytes):
    benchmark.extra_info.update(impl=impl, shape=list(shape), dtype="float32", bytes=nbytes,
                                threads=torch.get_num_threads())
    if benchmark.stats is not None:  # None under --benchmark-disable (a plain test run)
        benchmark.extra_info["gbps"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", list(SHAPES))
def test_loss_fwd_bwd(benchmark, preset, impl):
    shape = SHAPES[preset]
    (v, *rest), kwargs, _ = _inputs(shape)
    fn = _loss_fn(impl)

    def fwd_bwd():
        x = v.detach().requires_grad_(True)
        loss = fn(x, *rest, **kwargs)
        loss.backward()
        return loss, x.grad

    loss, grad = fwd_bwd()
    ref_v = v.detach().double().requires_grad_(True)  # the float64 oracle
    ref_loss = _reference_loss(ref_v, *(r.double() for r in rest),
                               **{k: a.double() if isinstance(a, torch.Tensor) else a
                                  for k, a in kwargs.items()})
    ref_loss.backward()
    assert _rel(loss, ref_loss) < 1e-5 and _rel(grad, ref_v.grad) < 1e-5
    benchmark.pedantic(fwd_bwd, rounds=100, iterations=1, warmup_rounds=5)
    _record(benchmark, impl, shape, _loss_bytes(shape))


@pytest.mark.parametrize("preset", list(SHAPES))
def test_loss_kernel_only(benchmark, preset):
    """The C++ op alone (loss partials and dL/dv in one pass, its outputs allocated), without
    the public API's argument checks, the autograd wrapper, the reduction of the partials and
    the backward pass: the floor the ``cpp`` row above is held to (at most 1.4x)."""
    from vipo_kernels import compiled_backend
    from vipo_kernels.partials import N_COLUMNS

    shape = SHAPES[preset]
    (v, z, x, old, adv, amap), kwargs, _ = _inputs(shape)
    B, C = shape[:2]
    v3, z3, x3 = (t.reshape(B, C, -1) for t in (v, z, x))
    P = v3.shape[2]
    old2, map2, adv2, weights = old.reshape(B, -1), amap.reshape(B, -1), adv[:, None], torch.ones(1)
    cs, co, std = kwargs["coef_sample"], kwargs["coef_output"], kwargs["std"]
    block_p = compiled_backend.load("cpu").block_positions(B, C, P)

    def kernel():
        grad = torch.empty_like(v3)
        partials = torch.empty(B, -(-P // block_p), N_COLUMNS)
        torch.ops.vipo.loss_position(v3, z3, x3, old2, adv2, weights, map2, cs, co, std, None,
                                     grad, partials, kwargs["clip_range"], 5.0, 0.0, block_p)
        return partials, grad

    partials, grad = kernel()
    x_ref = v.detach().double().requires_grad_(True)
    ref = _reference_loss(x_ref, *(t.double() for t in (z, x, old, adv, amap)),
                          **{k: a.double() if isinstance(a, torch.Tensor) else a
                             for k, a in kwargs.items()})
    ref.backward()
    upper, lower = partials[..., 0].double().sum(1), partials[..., 1].double().sum(1)
    clip_loss = (-adv.double() * torch.where(adv > 0, upper, lower)).sum() / (B * P)
    assert _rel(clip_loss, ref.detach()) < 1e-5 and _rel(grad.reshape(v.shape), x_ref.grad) < 1e-5
    benchmark.pedantic(kernel, rounds=100, iterations=1, warmup_rounds=5)
    _record(benchmark, "cpp-kernel", shape, _loss_bytes(shape))


@pytest.mark.parametrize("impl", ["cpp", "torch-eager"])
@pytest.mark.parametrize("preset", list(SHAPES))
def test_loss_peak_memory(benchmark, preset, impl):
    """The most memory a forward plus backward holds at once beyond its inputs (the gradient,
    which the caller keeps, included), in units of the latent's size. The goal for the fused
    loss: nothing the size of the latent beyond the gradient, i.e. about 1."""
    shape = SHAPES[preset]
    (v, *rest), kwargs, _ = _inputs(shape)
    fn = _loss_fn(impl)
    grads = []

    def fwd_bwd():
        x = v.detach().requires_grad_(True)
        fn(x, *rest, **kwargs).backward()
        grads.append(x.grad)

    fwd_bwd()
    grads.clear()
    peak = peak_extra_bytes(fwd_bwd)
    latent = v.numel() * v.element_size()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # a row in the JSON, not a timing
    benchmark.extra_info.update(impl=impl, shape=list(shape), peak_bytes=peak,
                                latent_bytes=latent, peak_latents=round(peak / latent, 3))
    if impl == "cpp":
        assert peak < 1.1 * latent, f"fused loss held {peak / latent:.2f} latents"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", list(SHAPES))
def test_step(benchmark, preset, impl):
    shape = SHAPES[preset]
    (v, z, *_), kwargs, noise = _inputs(shape)
    kwargs.pop("clip_range")
    fn = _step_fn(impl)
    nxt, logp = fn(v, z, noise, **kwargs)
    ref_next, ref_logp = sde_step_reference(v, z, noise, **kwargs)
    assert _rel(nxt, ref_next) < 1e-6 and _rel(logp, ref_logp) < 1e-5
    benchmark.pedantic(lambda: fn(v, z, noise, **kwargs), rounds=100, iterations=1,
                       warmup_rounds=3)
    _record(benchmark, impl, shape, _step_bytes(shape))


def summarize(path):
    """Markdown tables of a --benchmark-json file: medians, mins, GB/s and the ratios; the
    API's time over the kernel's; the peak memory."""
    runs = json.load(open(path))["benchmarks"]
    memory = [run for run in runs if run["name"].startswith("test_loss_peak_memory")]
    runs = [run for run in runs if run not in memory]
    rows = {}
    for run in runs:
        op = run["name"].split("[")[0].removeprefix("test_").replace("loss_kernel_only", "loss_fwd_bwd")
        preset = run["params"]["preset"]
        rows.setdefault((op, preset), {})[run["extra_info"]["impl"]] = run
    print("| op | shape | impl | median ms | min ms | GB/s | eager / impl | compile / impl |")
    print("|---|---|---|---|---|---|---|---|")
    for (op, preset), impls in rows.items():
        eager = impls["torch-eager"]["stats"]["median"]
        compiled = impls["torch-compile"]["stats"]["median"]
        for impl in [i for i in ("cpp-kernel", *IMPLS) if i in impls]:
            stats = impls[impl]["stats"]
            print(f"| {op} | {preset} {tuple(SHAPES[preset])} | {impl} | "
                  f"{stats['median'] * 1e3:.2f} | {stats['min'] * 1e3:.2f} | "
                  f"{impls[impl]['extra_info']['gbps']} | {eager / stats['median']:.1f}x | "
                  f"{compiled / stats['median']:.1f}x |")
    print()
    print("| shape | cpp (API) / cpp-kernel | torch-compile / cpp (API) |")
    print("|---|---|---|")
    for (op, preset), impls in rows.items():
        if "cpp-kernel" in impls:
            api = impls["cpp"]["stats"]["median"]
            print(f"| {preset} | {api / impls['cpp-kernel']['stats']['median']:.2f}x | "
                  f"{impls['torch-compile']['stats']['median'] / api:.2f}x |")
    print()
    print("| shape | impl | peak beyond the inputs, MiB | in latents |")
    print("|---|---|---|---|")
    for run in memory:
        info = run["extra_info"]
        print(f"| {run['params']['preset']} {tuple(info['shape'])} | {info['impl']} | "
              f"{info['peak_bytes'] / 2**20:.1f} | {info['peak_latents']:.2f} |")


if __name__ == "__main__":
    summarize(sys.argv[1])
