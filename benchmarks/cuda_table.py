"""CUDA against Triton on a GPU: GB/s of the fused loss (forward + backward) and the step.

    python benchmarks/cuda_table.py [--out FILE] [--rounds N]

For the Flux (B=12, C=16, 64x64) and Wan (B=8, C=16, 14x30x52) latents in fp32 and bf16:
each backend is first checked against the float64 reference (loss, gradient; the step
against eager torch), then timed with CUDA events (median of --rounds). GB/s is the
minimum traffic over the median time; the copy bandwidth of the same device, measured in
the same run, gives the fraction each kernel reaches. Prints a markdown table (and writes
it to --out). Called by benchmarks/gpu_check.sh; needs a CUDA device and the extension
built with CUDA (``pip install --no-build-isolation -e .`` on that machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vipo_kernels import backends, sde_coefficients, sde_step, vipo_loss  # noqa: E402
from vipo_kernels.reference import log_prob_reference, vipo_loss_reference  # noqa: E402

SHAPES = {"flux": (12, 16, 64, 64), "wan": (8, 16, 14, 30, 52)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ("triton", "cuda")
CLIP = 1e-4


def _inputs(shape, dtype):
    """Ratios below, inside and above the clip range, none within rounding of a bound."""
    gen = torch.Generator().manual_seed(0)
    batch, _, *spatial = shape
    sigma = torch.rand(batch, generator=gen) * 0.8 + 0.15
    cs, co, std = (c.cuda() for c in sde_coefficients(sigma, sigma * 0.8))
    v, z, noise = (torch.randn(shape, generator=gen).cuda().to(dtype) for _ in range(3))
    nxt, _ = sde_step(v, z, noise, coef_sample=cs, coef_output=co, std=std, backend="torch")
    logp64 = log_prob_reference(v.double(), z.double(), nxt.double(), coef_sample=cs.double(),
                                coef_output=co.double(), std=std.double())
    offsets = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64, device="cuda")
    pick = torch.randint(0, 5, logp64.shape, generator=gen).cuda()
    old = (logp64 - offsets[pick] * CLIP).float()
    adv = torch.randn(batch, generator=gen).cuda()
    amap = torch.rand((batch, *spatial), generator=gen).cuda()
    kwargs = dict(coef_sample=cs, coef_output=co, std=std, clip_range=CLIP)
    return (v, z, nxt, old, adv, amap), kwargs, noise


def _time_ms(fn, rounds):
    for _ in range(3):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(start, end))[rounds // 2]


def _copy_gbps(rounds):
    """Device copy bandwidth: read + write of 1 GiB."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), rounds)
    return 2 * src.numel() * 4 / ms / 1e6


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _check_loss(backend, args, kwargs, dtype):
    v, *rest = args
    x = v.detach().requires_grad_(True)
    loss, _ = vipo_loss(x, *rest, **kwargs, backend=backend)
    loss.backward()
    v64 = v.detach().double().requires_grad_(True)
    ref, _ = vipo_loss_reference(v64, *(r.double() for r in rest),
                                 **{k: a.double() if torch.is_tensor(a) else a
                                    for k, a in kwargs.items()})
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the gradient is stored in bf16
    errors = _rel(loss, ref), _rel(x.grad, v64.grad)
    assert max(errors) < tol, f"{backend} {dtype}: loss/grad rel err {errors} >= {tol}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=50)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_table.py needs a CUDA device")
    missing = [b for b in BACKENDS if not backends.available(b)]
    if missing:
        sys.exit(f"cuda_table.py: backend(s) {missing} unavailable here; build the extension "
                 "with CUDA: pip install --no-build-isolation -e .")
    copy = _copy_gbps(opts.rounds)
    lines = [f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA "
             f"{torch.version.cuda}; copy bandwidth {copy:.0f} GB/s (same run).", "",
             "| op | shape | dtype | backend | median us | GB/s | of copy | cuda vs triton |",
             "|---|---|---|---|---|---|---|---|"]
    for preset, shape in SHAPES.items():
        for dname, dtype in DTYPES.items():
            args, kwargs, noise = _inputs(shape, dtype)
            v, z, *_ = args
            elem = torch.empty((), dtype=dtype).element_size()
            positions = v.numel() // shape[1]
            traffic = {"loss fwd+bwd": 4 * v.numel() * elem + 2 * positions * 4,
                       "step": 4 * v.numel() * elem + positions * 4}
            step_kw = {k: a for k, a in kwargs.items() if k != "clip_range"}
            times = {}
            for backend in BACKENDS:
                _check_loss(backend, args, kwargs, dtype)
                nxt, _ = sde_step(v, z, noise, **step_kw, backend=backend)
                same, _ = sde_step(v, z, noise, **step_kw, backend="torch")
                assert _rel(nxt, same) < (1e-6 if dtype == torch.float32 else 1e-2)

                def loss_fn(backend=backend):
                    x = v.detach().requires_grad_(True)
                    loss, _ = vipo_loss(x, *args[1:], **kwargs, backend=backend)
                    loss.backward()

                def step_fn(backend=backend):
                    sde_step(v, z, noise, **step_kw, backend=backend)

                times[("loss fwd+bwd", backend)] = _time_ms(loss_fn, opts.rounds)
                times[("step", backend)] = _time_ms(step_fn, opts.rounds)
            for op in traffic:
                for backend in BACKENDS:
                    ms = times[(op, backend)]
                    gbps = traffic[op] / ms / 1e6
                    ratio = times[(op, "triton")] / ms
                    lines.append(f"| {op} | {preset} {shape} | {dname} | {backend} | "
                                 f"{ms * 1e3:.1f} | {gbps:.0f} | {gbps / copy:.0%} | "
                                 f"{ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if opts.out:
        opts.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
