"""Small steps of the GPU check (benchmarks/gpu_check.py runs each in its own process):

    python -m benchmarks.check_steps versions [--json FILE]
    python -m benchmarks.check_steps backends --need triton,cuda,cpp
    python -m benchmarks.check_steps device_errors --device cuda [--json FILE]

``device_errors`` gives the public loss a bad value (a NaN advantage, a negative map
entry, a NaN old log-prob, a zero std), one case per fresh process, and records where it
is reported (at the call, in backward, at a synchronisation or not at all), whether the
message names the argument, and whether the device still works afterwards.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {  # case -> the argument its message must name
    "nan_advantage": "advantages",
    "negative_map": "allocation_map",
    "nan_old_log_prob": "old_log_prob",
    "zero_std": "std",
}


def _run(argv: list[str]) -> str:
    """A command's output, or "unavailable (...)" (no such program, no git tree, ...)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable ({type(err).__name__})"
    if out.returncode != 0:
        return f"unavailable (exit {out.returncode}: {out.stderr.strip()[:100]})"
    return out.stdout.strip()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "executable": sys.executable,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "commit": os.environ.get("VIPO_COMMIT") or _run(["git", "rev-parse", "HEAD"])}
    for package in ("triton", "diffusers", "transformers", "accelerate", "peft",
                    "safetensors", "huggingface-hub", "numpy", "pytest"):
        out[package] = _version(package)
    try:
        out["cpu"] = next(line.split(":", 1)[1].strip() for line in
                          Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
    except (OSError, StopIteration):
        out["cpu"] = platform.processor()
    out["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1:] or ["unavailable"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   nvidia_smi=_run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader"]))
    else:
        out["gpu"] = None
    return out


def backends_available(need: list[str]) -> dict:
    """Every backend in ``need`` must load, and the compiled library must be the one built
    in this tree: an editable install elsewhere can supply its own ``vipo_kernels._C`` when
    this tree has none (its import finder comes after the path's)."""
    import vipo_kernels
    from vipo_kernels import backends

    status = {name: backends.available(name) for name in ("triton", "cpp", "cuda")}
    try:
        from vipo_kernels import _C

        status["library"] = _C.__file__
        status["library_in_tree"] = Path(_C.__file__).parent == Path(vipo_kernels.__file__).parent
    except ImportError as err:
        status.update(library=f"not importable: {err}", library_in_tree=False)
    status["missing"] = [name for name in need if not status.get(name)]
    compiled = [name for name in need if name in ("cpp", "cuda")]
    status["ok"] = not status["missing"] and (status["library_in_tree"] or not compiled)
    return status


# ---------------------------------------------------------------------------- device errors
def error_case(case: str, backend: str, device: str) -> dict:
    """One bad-value case in this process: where it is reported and what remains usable."""
    import torch

    from vipo_kernels import vipo_loss

    from benchmarks.inputs import loss_inputs

    (v, z, x, old, adv, amap), kwargs = loss_inputs((4, 16, 16, 16), torch.float32, device,
                                                    clip_range=1e-2)
    if case == "nan_advantage":
        adv[1] = float("nan")
    elif case == "negative_map":
        amap[2, 3, 4] = -1.0
    elif case == "nan_old_log_prob":
        old[0, 5, 6] = float("nan")
    elif case == "zero_std":
        kwargs["std"] = kwargs["std"].clone()
        kwargs["std"][3] = 0.0
    result = {"case": case, "backend": backend, "device": device, "raised": False}
    stage = "call"
    try:
        leaf = v.detach().requires_grad_(True)
        loss, _ = vipo_loss(leaf, z, x, old, adv, amap, **kwargs, backend=backend)
        stage = "backward"
        loss.backward()
        stage = "synchronize"
        if device == "cuda":
            torch.cuda.synchronize()
        stage = "reading the loss"
        result["loss"] = float(loss)
    except Exception as err:  # noqa: BLE001 - what is raised, and where, is the measurement
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result.update(raised=True, stage=stage, type=type(err).__name__, message=message[:300],
                      names_argument=CASES[case] in str(err))
    try:  # is the device still usable in this process?
        value = torch.ones(4, device=device).sum()
        if device == "cuda":
            torch.cuda.synchronize()
        result["device_usable_after"] = float(value) == 4.0
    except Exception as err:  # noqa: BLE001
        result.update(device_usable_after=False,
                      after_error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return result


def device_errors(device: str, backend_names: list[str]) -> list[dict]:
    """Every case for every backend: on CUDA each in a fresh process (a failed CUDA context
    cannot be reset), run side by side; on the CPU in this process, one after another."""
    jobs = [(case, backend) for backend in backend_names for case in CASES]
    if device == "cpu":
        return [error_case(case, backend, device) for case, backend in jobs]

    def one(job):
        case, backend = job
        argv = [sys.executable, "-m", "benchmarks.check_steps", "error_case", "--case", case,
                "--backend", backend, "--device", device]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                 cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            return {"case": case, "backend": backend, "device": device,
                    "harness_error": "timed out after 120 s"}
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not lines:
            return {"case": case, "backend": backend, "device": device,
                    "harness_error": f"exit {out.returncode}: {out.stderr.strip()[-400:]}"}
        # A process whose CUDA context failed may exit non-zero after its report.
        return dict(json.loads(lines[-1]), exit_code=out.returncode)

    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        return list(pool.map(one, jobs))


def judge_errors(results: list[dict], device: str) -> list[str]:
    """What makes the step fail: a harness failure or a bad value that passes silently
    anywhere; on the CPU also an error that is not at the call or does not name the
    argument (the contract there). On CUDA where and how it is reported is measured."""
    problems = []
    for r in results:
        name = f"{r['backend']}/{r['case']}"
        if "harness_error" in r:
            problems.append(f"{name}: {r['harness_error']}")
        elif not r["raised"]:
            problems.append(f"{name}: the bad value passed silently (loss {r.get('loss')})")
        elif device == "cpu" and not (r["stage"] == "call" and r["names_argument"]):
            problems.append(f"{name}: on the CPU expected an error at the call naming "
                            f"{CASES[r['case']]!r}, got {r['type']} in {r['stage']}: "
                            f"{r['message']}")
    return problems


def errors_markdown(results: list[dict]) -> str:
    lines = ["| backend | case | raised | where | type | names the argument | device usable "
             "after | message |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "harness_error" in r:
            lines.append(f"| {r['backend']} | {r['case']} | harness failed: "
                         f"{r['harness_error'][:120]} |")
            continue
        lines.append(f"| {r['backend']} | {r['case']} | {r['raised']} | {r.get('stage', '-')} | "
                     f"{r.get('type', '-')} | {r.get('names_argument', '-')} | "
                     f"{r.get('device_usable_after')} | {r.get('message', '')[:120]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("versions", "backends", "device_errors", "error_case"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--need", default="", help="backends: comma-separated, each required")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="", help="device_errors: backends to try")
    parser.add_argument("--case", choices=tuple(CASES))
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args(argv)
    code, md = 0, None
    if args.step == "versions":
        out = versions()
    elif args.step == "backends":
        out = backends_available([n for n in args.need.split(",") if n])
        code = 0 if out["ok"] else 1
    elif args.step == "error_case":
        print(json.dumps(error_case(args.case, args.backend, args.device)), flush=True)
        return 0
    else:
        names = [n for n in args.backends.split(",") if n]
        results = device_errors(args.device, names)
        problems = judge_errors(results, args.device)
        out = {"device": args.device, "results": results, "problems": problems}
        md = errors_markdown(results)
        code = 1 if problems else 0
        print(md)
        for problem in problems:
            print("problem:", problem, file=sys.stderr)
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    if args.md and md:
        args.md.write_text(md)
    return code


if __name__ == "__main__":
    sys.exit(main())
