"""Bandwidth table of the fused loss (forward + backward) and the SDE step.

    python benchmarks/gpu_table.py [--md FILE] [--json FILE]        # CUDA: Flux and Wan sizes
    python benchmarks/gpu_table.py --device cpu --backends cpp      # the same table on a CPU
    python benchmarks/gpu_table.py --smoke                          # tiny shapes, CPU

Implementations: eager and compiled torch (the reference), each kernel backend through
the public API (``vipo_loss`` then ``.backward()``, or ``sde_step``), and, for the loss,
each backend's primitive alone (``<backend>-kernel``: the fused pass and its reduction,
arguments prepared beforehand; no public-API checks, no autograd, no backward).

Before it is timed, every implementation is checked against the float64 oracle on the
same (rounded) inputs, whose ratios sit at least eps/2 from the clip edges
(``benchmarks/inputs.py``); a row that disagrees, or fails, is recorded as an error and
the table goes on. Columns:

- wall ms: the time per call of back-to-back calls (what a Python training loop pays, the
  host's work included);
- device ms (CUDA): the time the device spends in the call's kernels, summed from torch's
  profiler; on a CPU the host is the device and this is the wall time;
- largest kernel ms (CUDA): the call's longest kernel, named in the JSON (for the fused
  backends, the fused pass);
- GB/s and % of copy: the minimum traffic over the device time, against a device-to-device
  copy measured in the same run; "% of copy (kernel)" uses the largest kernel's time;
- peak / latent: the most memory held beyond the inputs during one call, in latents.

Everything goes to the markdown and JSON files after each row, so a timeout or a failing
row keeps what was measured. Exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors, set before import

import torch  # noqa: E402

from benchmarks.inputs import (loss_bytes, loss_inputs, loss_oracle, loss_scale,  # noqa: E402
                               step_bytes, step_inputs)
from benchmarks.memory import peak_extra_bytes  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402
from vipo_kernels import backends, sde_step, vipo_loss  # noqa: E402
from vipo_kernels.reference import (log_prob_reference, sde_step_reference,  # noqa: E402
                                    vipo_loss_reference)

SMOKE_SHAPES = {"smoke-image": (3, 4, 6, 10), "smoke-video": (2, 4, 3, 4, 5)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest error against the float64 oracle, relative to the quantity's natural size:
# fp32 arithmetic (the loss, fp32 gradients), and one rounding of the gradient to the
# latent dtype (a relative 2^-9 per element for bf16, 2^-12 for fp16) with room to spare.
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOSS_TOL = 1e-4


# ---------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device: str, calls: int = 20, blocks: int = 5) -> float:
    """Median over ``blocks`` of the wall time per call of ``calls`` back-to-back calls."""
    fn()
    sync(device)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def device_kernels(fn, calls: int = 10) -> dict:
    """Device time per call from torch's profiler (CUDA): the sum over the call's kernels,
    memcpys and memsets, the largest of them, and every name with its time per call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, float] = {}
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == DeviceType.CUDA:
            per_name[event.name()] = per_name.get(event.name(), 0.0) + event.duration_ns()
    per_name = {name: ns / calls / 1e6 for name, ns in per_name.items()}  # ms per call
    if not per_name:
        raise RuntimeError("the profiler recorded no device activity")
    largest = max(per_name, key=per_name.get)
    return {"device_ms": sum(per_name.values()), "largest_kernel": largest,
            "largest_kernel_ms": per_name[largest], "kernels_ms": per_name}


def copy_bandwidth(device: str) -> float:
    """GB/s of a plain copy (bytes read + written): 1 GiB on CUDA (device time), 64 MiB on
    a CPU (wall time)."""
    n = (1 << 28) if device == "cuda" else (1 << 24)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100,
                                     return_mode="median")
    else:
        ms = wall_ms(lambda: dst.copy_(src), device, calls=5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------- implementations
def _reference_loss_only(*args, **kwargs):
    return vipo_loss_reference(*args, **kwargs)[0]


def loss_impls(kernels: list[str], compile_: bool) -> dict:
    """name -> fn(v, *rest, **kwargs) returning the loss, differentiable in v."""
    impls = {"torch-eager": lambda *a, **k: vipo_loss(*a, **k, backend="torch")[0]}
    if compile_:
        impls["torch-compile"] = torch.compile(_reference_loss_only)
    for name in kernels:
        impls[name] = (lambda b: lambda *a, **k: vipo_loss(*a, **k, backend=b)[0])(name)
    return impls


def step_impls(kernels: list[str], compile_: bool) -> dict:
    impls = {"torch-eager": lambda *a, **k: sde_step(*a, **k, backend="torch")}
    if compile_:
        impls["torch-compile"] = torch.compile(sde_step_reference)
    for name in kernels:
        impls[name] = (lambda b: lambda *a, **k: sde_step(*a, **k, backend=b))(name)
    return impls


def primitive_call(backend: str, args, kwargs):
    """The backend's ``loss_position`` primitive on prepared (B, C, P) arguments, writing
    dL/dv into a buffer allocated once; returns (call, how to read its loss and grad)."""
    v, z, x, old, adv, amap = args
    B, C = v.shape[:2]
    impl = backends.resolve(backend, v.device)
    v3, z3, x3 = (t.reshape(B, C, -1) for t in (v, z, x))
    old2, amap2 = old.reshape(B, -1), amap.reshape(B, -1)
    adv2, weights = adv.reshape(B, 1).float(), torch.ones(1, device=v.device)
    grad = torch.empty_like(v3)
    cs, co, std = kwargs["coef_sample"], kwargs["coef_output"], kwargs["std"]

    def call():
        return impl.loss_position(v3, z3, x3, old2, adv2, weights, amap2, cs, co, std, None,
                                  grad, clip_range=kwargs["clip_range"], adv_clip=5.0,
                                  kl_coef=0.0)

    return call, lambda: (call()[0].detach(), grad.reshape(v.shape))


# ---------------------------------------------------------------------------- checks
def _rel(actual, expected, scale=None) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    scale = scale if scale is not None else float(expected.abs().max().clamp_min(1e-30))
    return float((actual - expected).abs().max()) / scale


def check_loss(name, loss, grad, oracle, scale, dtype) -> None:
    ref_loss, ref_grad, _ = oracle
    loss_err, grad_err = _rel(loss, ref_loss, scale), _rel(grad, ref_grad)
    if not (loss_err <= LOSS_TOL and grad_err <= GRAD_TOL[dtype]):
        raise AssertionError(f"{name} disagrees with the float64 oracle: loss error "
                             f"{loss_err:.2e} of mean |A M| (limit {LOSS_TOL:.0e}), gradient "
                             f"error {grad_err:.2e} of max |grad| (limit {GRAD_TOL[dtype]:.1e})")


def check_step(name, nxt, logp, same_next, v, z, kwargs, dtype) -> None:
    """z' against eager torch in the same dtype (one rounding of the latent apart), the
    log-prob of the returned z' against float64."""
    next_err = _rel(nxt, same_next)
    ref_logp = log_prob_reference(v.double(), z.double(), nxt.double(),
                                  **{k: c.double() for k, c in kwargs.items()})
    logp_err = _rel(logp, ref_logp)
    next_tol = 1e-6 if dtype == torch.float32 else 1e-2
    if not (next_err <= next_tol and logp_err <= 1e-5):
        raise AssertionError(f"{name}: sde_step's sample error {next_err:.2e} (limit "
                             f"{next_tol:.0e}) or log-prob error {logp_err:.2e} (limit 1e-05)")


# ---------------------------------------------------------------------------- rows
def _measure(fn, device: str, calls: int) -> dict:
    row = {"wall_ms": wall_ms(fn, device, calls=calls)}
    if device == "cuda":
        try:
            row.update(device_kernels(fn))
        except Exception as err:  # noqa: BLE001 - the wall time still stands
            row["device_error"] = f"{type(err).__name__}: {err}"
    else:
        row["device_ms"] = row["wall_ms"]
    return row


def loss_rows(shape, dtype, device, kernels, compile_, calls):
    args, kwargs = loss_inputs(shape, dtype, device)
    oracle = loss_oracle(args, kwargs)
    stats = oracle[2]
    if not (0 < float(stats["clip_frac_low"]) < 1 and 0 < float(stats["clip_frac_high"]) < 1):
        raise AssertionError(f"the inputs do not span the clip's regimes: {stats}")
    scale = loss_scale(args)
    v, *rest = args
    latent = v.numel() * v.element_size()
    for name, fn in loss_impls(kernels, compile_).items():
        def fwd_bwd(fn=fn):
            x = v.detach().requires_grad_(True)
            loss = fn(x, *rest, **kwargs)
            loss.backward()
            return loss, x.grad

        yield name, lambda fwd_bwd=fwd_bwd, name=name: _loss_row(
            name, fwd_bwd, oracle, scale, dtype, device, calls, latent)
    for backend in kernels:
        yield f"{backend}-kernel", lambda backend=backend: _kernel_row(
            backend, args, kwargs, oracle, scale, dtype, device, calls)


def _loss_row(name, fwd_bwd, oracle, scale, dtype, device, calls, latent):
    loss, grad = fwd_bwd()
    check_loss(name, loss, grad, oracle, scale, dtype)
    row = _measure(fwd_bwd, device, calls)
    # Peak beyond the inputs of one forward + backward (the gradient included), in
    # latents: the fused loss's goal is about 1, the gradient itself.
    row["peak_latents"] = peak_extra_bytes(fwd_bwd, device) / latent
    return row


def _kernel_row(backend, args, kwargs, oracle, scale, dtype, device, calls):
    call, result = primitive_call(backend, args, kwargs)
    loss, grad = result()
    check_loss(f"{backend}-kernel", loss, grad, oracle, scale, dtype)
    return _measure(call, device, calls)


def step_rows(shape, dtype, device, kernels, compile_, calls):
    (v, z, noise), kwargs = step_inputs(shape, dtype, device)
    same_next, _ = sde_step_reference(v, z, noise, **kwargs)
    for name, fn in step_impls(kernels, compile_).items():
        def row(name=name, fn=fn):
            nxt, logp = fn(v, z, noise, **kwargs)
            check_step(name, nxt, logp, same_next, v, z, kwargs, dtype)
            return _measure(lambda: fn(v, z, noise, **kwargs), device, calls)

        yield name, row


# ---------------------------------------------------------------------------- the table
def environment(device: str) -> dict:
    import triton

    env = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(name=props.name, sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["name"] = f"cpu ({os.cpu_count()} cores)"
    return env


def _fmt(value, spec) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Device: {env['name']}; torch {env['torch']}, CUDA {env['cuda']}, triton "
             f"{env['triton']}; copy bandwidth {report['copy_gbps']:.0f} GB/s "
             f"({'device time' if env['device'] == 'cuda' else 'wall time, the CPU is the device'})",
             "", "| op | shape | dtype | impl | wall ms | device ms | largest kernel ms | GB/s | "
             "% of copy | % of copy (kernel) | eager / impl | compile / impl | peak / latent |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['op']} | {row['shape']} | {row['dtype']} | {row['impl']} | "
                         f"FAILED: {row['error'].splitlines()[0][:160]} |")
            continue
        lines.append(
            f"| {row['op']} | {row['shape']} | {row['dtype']} | {row['impl']} | "
            f"{row['wall_ms']:.3f} | {_fmt(row.get('device_ms'), '.3f')} | "
            f"{_fmt(row.get('largest_kernel_ms'), '.3f')} | {_fmt(row.get('gbps'), '.0f')} | "
            f"{_fmt(row.get('copy_pct'), '.0f')} | {_fmt(row.get('kernel_copy_pct'), '.0f')} | "
            f"{_fmt(row.get('vs_eager'), '.2f')} | {_fmt(row.get('vs_compile'), '.2f')} | "
            f"{_fmt(row.get('peak_latents'), '.2f')} |")
    return "\n".join(lines) + "\n"


def _derive(group: list[dict], nbytes: int, copy_gbps: float) -> None:
    """GB/s, fractions of the copy bandwidth and the ratios against eager and compiled
    torch, within one (op, shape, dtype) group, from the device times."""
    base = {r["impl"]: r.get("device_ms") for r in group if "error" not in r}
    for row in group:
        ms = row.get("device_ms")
        if "error" in row or not ms:
            continue
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
        row["copy_pct"] = 100 * row["gbps"] / copy_gbps
        if row.get("largest_kernel_ms"):
            row["kernel_copy_pct"] = 100 * nbytes / (row["largest_kernel_ms"] * 1e-3) / 1e9 \
                / copy_gbps
        for key, impl in (("vs_eager", "torch-eager"), ("vs_compile", "torch-compile")):
            if base.get(impl):
                row[key] = base[impl] / ms


def run_table(device, shapes, dtypes, kernels, *, compile_=True, calls=20, write=None) -> dict:
    report = {"environment": environment(device), "copy_gbps": copy_bandwidth(device),
              "kernels": kernels, "rows": []}
    for preset, shape in shapes.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for op, rows_of, nbytes in (("loss fwd+bwd", loss_rows, loss_bytes(shape, dtype)),
                                        ("sde_step", step_rows, step_bytes(shape, dtype))):
                group = []
                head = {"op": op, "shape": f"{preset} {tuple(shape)}", "dtype": dtype_name,
                        "bytes": nbytes}
                try:
                    for impl, measure in rows_of(shape, dtype, device, kernels, compile_, calls):
                        row = dict(head, impl=impl)
                        try:
                            row.update(measure())
                        except Exception as err:  # noqa: BLE001 - recorded, the table goes on
                            row["error"] = f"{type(err).__name__}: {err}"
                            traceback.print_exc()
                        group.append(row)
                        report["rows"].append(row)
                except Exception as err:  # noqa: BLE001 - the inputs or the oracle failed
                    row = dict(head, impl="(inputs)", error=f"{type(err).__name__}: {err}")
                    traceback.print_exc()
                    report["rows"].append(row)
                _derive(group, nbytes, report["copy_gbps"])
                for row in group:
                    print(json.dumps({k: v for k, v in row.items() if k != "kernels_ms"},
                                     default=str), flush=True)
                if write:
                    write(report)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else None)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (Triton under its interpreter)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated presets of benchmarks/shapes.py ({', '.join(SHAPES)})")
    parser.add_argument("--dtypes", default=None, help="e.g. bf16,fp32 (CUDA default) or fp32")
    parser.add_argument("--backends", default=None,
                        help="kernel backends to time (default: every available one)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed block")
    parser.add_argument("--md", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else args.device
    if device is None:
        parser.error("no CUDA device: use --device cpu (C++ backend) or --smoke")
    if args.smoke:
        shapes = SMOKE_SHAPES
    else:
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            parser.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    dtypes = (args.dtypes or ("bf16,fp32" if device == "cuda" else "fp32")).split(",")
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes: each of {', '.join(DTYPES)}")
    on_device = [b for b, devices in (("triton", ("cpu", "cuda")), ("cpp", ("cpu",)),
                                      ("cuda", ("cuda",))) if device in devices]
    kernels = args.backends.split(",") if args.backends else \
        [b for b in on_device if backends.available(b) and (device == "cuda" or args.smoke
                                                             or b != "triton")]
    missing = [b for b in kernels if b not in on_device or not backends.available(b)]
    if missing:
        parser.error(f"--backends: {missing} not available on {device} here")

    def write(report):
        if args.md:
            args.md.write_text(to_markdown(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))

    calls = args.calls or (3 if args.smoke else 20)
    report = run_table(device, shapes, dtypes, kernels, compile_=not args.no_compile,
                       calls=calls, write=write)
    write(report)
    print(to_markdown(report))
    failed = [r for r in report["rows"] if "error" in r]
    if failed:
        print(f"gpu_table: {len(failed)} of {len(report['rows'])} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
