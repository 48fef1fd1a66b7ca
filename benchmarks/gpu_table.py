"""Bandwidth table of the fused loss and step on a CUDA device.

    python benchmarks/gpu_table.py [--out FILE] [--smoke]

For each preset shape and dtype: the median time of every implementation, the GB/s
(minimum traffic over time), the fraction of the device's copy bandwidth measured in
the same run, the ratio against eager and compiled torch, and the loss's peak memory
beyond its inputs (``torch.cuda.max_memory_allocated``) in units of the latent's size. Each implementation is
checked against eager torch before it is timed. ``--smoke`` runs tiny shapes on the CPU
(Triton interpreter) so the script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.inputs import loss_bytes, loss_inputs, step_bytes  # noqa: E402
from benchmarks.memory import peak_extra_bytes  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
from vipo_kernels import backends, sde_step, vipo_loss  # noqa: E402
from vipo_kernels.reference import sde_step_reference, vipo_loss_reference  # noqa: E402

SMOKE_SHAPES = {"smoke-video": (2, 4, 3, 4, 5)}


def median_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str) -> float:
    """GB/s of a plain device-to-device copy of 1 GiB (read + write counted)."""
    n = (1 << 28) if device == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _reference_loss_only(*args, **kwargs):
    return vipo_loss_reference(*args, **kwargs)[0]


def loss_impls(kernels):
    compiled = torch.compile(_reference_loss_only)
    impls = {"torch-eager": lambda *a, **k: vipo_loss(*a, **k, backend="torch")[0],
             "torch-compile": compiled}
    for name in kernels:
        impls[name] = (lambda backend: lambda *a, **k: vipo_loss(*a, **k, backend=backend)[0])(name)
    return impls


def step_impls(kernels):
    impls = {"torch-eager": lambda *a, **k: sde_step(*a, **k, backend="torch"),
             "torch-compile": torch.compile(sde_step_reference)}
    for name in kernels:
        impls[name] = (lambda backend: lambda *a, **k: sde_step(*a, **k, backend=backend))(name)
    return impls


def _close(a, b, dtype) -> bool:
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return bool((a.float() - b.float()).abs().max() <= tol * b.float().abs().max().clamp_min(1e-12))


def time_loss(shape, dtype, device, impls):
    (v, *rest), kwargs = loss_inputs(shape, dtype, device)
    rows, expected = {}, None
    for name, fn in impls.items():
        def fwd_bwd(fn=fn):
            x = v.detach().requires_grad_(True)
            fn(x, *rest, **kwargs).backward()
            return x.grad
        grad = fwd_bwd()
        if expected is None:
            expected = grad
        elif not _close(grad, expected, dtype):
            raise AssertionError(f"loss gradient of {name} disagrees with eager torch at {shape}")
        # Peak beyond the inputs of one forward + backward (the gradient included), in
        # latents: the fused loss's goal is about 1, the gradient itself.
        peak = peak_extra_bytes(fwd_bwd, device) / (v.numel() * v.element_size())
        rows[name] = (median_ms(fwd_bwd, device), peak)
    return rows, loss_bytes(shape, dtype)


def time_step(shape, dtype, device, impls):
    (v, z, *_), kwargs = loss_inputs(shape, dtype, device)
    noise = torch.randn_like(z)
    rows, expected = {}, None
    for name, fn in impls.items():
        nxt, _ = fn(v, z, noise, **kwargs)
        if expected is None:
            expected = nxt
        elif not _close(nxt, expected, dtype):
            raise AssertionError(f"sde_step of {name} disagrees with eager torch at {shape}")
        rows[name] = (median_ms(lambda fn=fn: fn(v, z, noise, **kwargs), device), float("nan"))
    return rows, step_bytes(shape, dtype)


def table(device: str, shapes: dict, dtypes) -> str:
    kernels = [b for b in ("triton", "cuda") if backends.available(b)
               and (device == "cuda" or b == "triton")]
    copy_gbps = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    lines = [f"Device: {name}; torch {torch.__version__}; copy bandwidth {copy_gbps:.0f} GB/s",
             "", "| op | shape | dtype | impl | median ms | GB/s | % of copy | vs eager | "
             "vs compile | peak / latent |", "|---|---|---|---|---|---|---|---|---|---|"]
    for preset, shape in shapes.items():
        for dtype in dtypes:
            for op, timer, impls in (("loss fwd+bwd", time_loss, loss_impls(kernels)),
                                     ("sde_step", time_step, step_impls(kernels))):
                rows, nbytes = timer(shape, dtype, device, impls)
                eager, compiled = rows["torch-eager"][0], rows["torch-compile"][0]
                for impl, (ms, peak) in rows.items():
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    lines.append(
                        f"| {op} | {preset} | {str(dtype)[6:]} | {impl} | {ms:.3f} | {gbps:.0f} | "
                        f"{100 * gbps / copy_gbps:.0f}% | {eager / ms:.2f}x | {compiled / ms:.2f}x "
                        f"| {peak:.2f} |")
                print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        text = table("cpu", SMOKE_SHAPES, [torch.float32])
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (use --smoke to exercise the script on a CPU)")
        text = table("cuda", SHAPES, [torch.bfloat16, torch.float32])
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
