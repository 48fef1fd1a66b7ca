"""The GPU check's driver (run it through ``bash benchmarks/gpu_check.sh [--dry-run]``).

Runs the steps in order, each in its own process with its own time limit inside one
overall budget, and keeps going past a failing step: every step's status, time, output
and parsed results are written to one markdown and one JSON results file after each step,
named by device and date, so a table measured late is never lost to an early failure. The
exit status is 1 if any step failed or timed out.

``--dry-run`` runs every step that can run on a CPU, at tiny size; the steps that need CUDA
are listed as not run. Standard library only: it must start before the wheels are in.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import tempfile
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS_CUDA = "needs a CUDA device"
NO_TIME = "no time left in the budget"


def failed(record: dict) -> bool:
    """A step that failed, timed out or found no time left; a dry run's CUDA-only steps,
    listed as not run, are not failures."""
    return record["status"] in ("failed", "timed out") or \
        (record["status"] == "not run" and record.get("why") != NEEDS_CUDA)


@dataclass
class Step:
    name: str
    title: str
    cap_s: int       # the most this step may take
    reserve_s: int   # kept back for it while earlier steps run
    gpu_only: bool = False


STEPS = [
    Step("wheels", "wheels for what the device image lacks", 90, 10),
    Step("versions", "versions: GPU, driver, torch, CUDA, triton, nvcc", 60, 5),
    Step("build", "build of the compiled extension, errors fatal", 240, 60),
    Step("backends", "backends available (triton, cuda, cpp)", 60, 5),
    Step("tests", "gpu-marked tests, skip reasons shown", 200, 30),
    Step("table", "bandwidth table", 150, 30),
    Step("no_sync", "no host sync (torch.cuda.set_sync_debug_mode)", 60, 15, gpu_only=True),
    Step("device_errors", "bad values on the device: where reported, what survives", 90, 15),
    Step("onpolicy", "bf16 on-policy probe", 120, 45),
    # Kept back while the others run: about two warm-up and two measured iterations of
    # FLUX.1-dev, then Wan's, on one H200 (results are written after each algorithm).
    Step("profile", "real-size iteration, ViPO and GRPO by phase", 400, 200),
]


@dataclass
class Check:
    dry: bool
    out_dir: Path    # the results: <stem>.md, .json and .log
    work_dir: Path   # the steps' own files (junit XML, tables, the wheels' site folder)
    stem: str
    deadline: float
    python: str = sys.executable
    env: dict = field(default_factory=dict)
    results: list = field(default_factory=list)
    started: str = ""
    log: Path | None = None

    def artifact(self, step: str, suffix: str) -> Path:
        return self.work_dir / f"{step}{suffix}"


# ---------------------------------------------------------------------------- steps' commands
def command(check: Check, step: Step) -> list[str]:
    """The step's command line (run in the repository root)."""
    py, dry = check.python, check.dry
    if step.name == "wheels":
        return [py, str(ROOT / "benchmarks" / "gpu_check.py"), "--install-wheels",
                str(check.work_dir / "site")] + (["--dry-run"] if dry else [])
    if step.name == "versions":
        return [py, "-m", "benchmarks.check_steps", "versions", "--json",
                str(check.artifact(step.name, ".json"))]
    if step.name == "build":
        return [py, "setup.py", "build_ext", "--inplace", "--build-temp",
                str(ROOT / "build" / ("gpu_check-dry" if dry else "gpu_check"))]
    if step.name == "backends":
        need = "cpp,triton" if dry else "triton,cuda,cpp"
        return [py, "-m", "benchmarks.check_steps", "backends", "--need", need, "--json",
                str(check.artifact(step.name, ".json"))]
    if step.name in ("tests", "no_sync"):
        argv = [py, "-m", "pytest", "tests/test_kernels_cuda.py", "-m", "gpu", "-rs", "-q",
                "-p", "no:cacheprovider", "--junitxml", str(check.artifact(step.name, ".xml"))]
        if step.name == "tests":
            argv[3:3] = ["tests/test_cuda_backend.py"]
            argv += ["-k", "not no_host_sync"]
            if not dry and importlib.util.find_spec("xdist") is not None:
                argv += ["-n", "4"]
        else:
            argv += ["-k", "no_host_sync"]
        return argv
    if step.name == "table":
        size = ["--smoke"] if dry else []
        return [py, "benchmarks/gpu_table.py", *size, "--json",
                str(check.artifact(step.name, ".json")), "--md",
                str(check.artifact(step.name, ".md"))]
    if step.name == "device_errors":
        device, names = ("cpu", "torch,cpp,triton") if dry else ("cuda", "torch,triton,cuda")
        return [py, "-m", "benchmarks.check_steps", "device_errors", "--device", device,
                "--backends", names, "--json", str(check.artifact(step.name, ".json")),
                "--md", str(check.artifact(step.name, ".md"))]
    if step.name in ("onpolicy", "profile"):
        size = ["--size", "tiny"] if dry else []
        # The probe's preset: Flux rolls out 4 samples per pass and trains 1 (Wan, 1 and 1).
        what = ["--probe", "flux_vipo"] if step.name == "onpolicy" else ["flux_vipo", "wan_vipo"]
        return [py, "-m", "vipo.profile", *what, *size, "--json",
                str(check.artifact(step.name, ".json")), "--md",
                str(check.artifact(step.name, ".md"))]
    raise ValueError(f"unknown step {step.name!r}")


def step_env(check: Check, step: Step) -> dict:
    env = dict(os.environ, **check.env)
    if step.name == "build":
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
        env["VIPO_REQUIRE_EXT" if check.dry else "VIPO_REQUIRE_CUDA"] = "1"
        if not check.dry and "TORCH_CUDA_ARCH_LIST" not in env:
            env["TORCH_CUDA_ARCH_LIST"] = check.env.get("VIPO_DEVICE_ARCH", "9.0")
    return env


# ---------------------------------------------------------------------------- judging
def junit_counts(path: Path) -> dict:
    """tests, failures, errors, skipped and each skip's reason, from pytest's junit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        for skipped in case.findall("skipped"):
            reason = skipped.get("message", "").strip()
            reasons[reason] = reasons.get(reason, 0) + 1
    counts["skip_reasons"] = reasons
    return counts


def judge(check: Check, step: Step, rc: int, record: dict) -> str:
    """passed / failed, from the exit status and, for the tests, what ran."""
    xml = check.artifact(step.name, ".xml")
    if step.name in ("tests", "no_sync") and xml.exists():
        counts = junit_counts(xml)
        record["junit"] = counts
        if counts["tests"] == 0:
            record["why"] = "no test was collected"
            return "failed"
        if not check.dry and counts["skipped"]:
            record["why"] = f"{counts['skipped']} tests skipped on the GPU machine"
            return "failed"
    data = check.artifact(step.name, ".json")
    if data.exists():
        try:
            record["data"] = json.loads(data.read_text())
        except ValueError as err:
            record["why"] = f"unreadable {data.name}: {err}"
            return "failed"
    md = check.artifact(step.name, ".md")
    if md.exists():
        record["markdown"] = md.read_text()
    return "passed" if rc == 0 else "failed"


# ---------------------------------------------------------------------------- running
def run_step(check: Check, step: Step, later: list[Step]) -> dict:
    record = {"step": step.name, "title": step.title}
    argv = command(check, step)
    if check.dry and step.gpu_only:
        record.update(status="not run", why=NEEDS_CUDA, seconds=0.0)
        return record
    left = check.deadline - time.monotonic() - sum(s.reserve_s for s in later)
    limit = int(min(step.cap_s, left))
    if limit < 5:
        record.update(status="not run", why=NO_TIME, seconds=0.0)
        return record
    record.update(command=" ".join(shlex.quote(a) for a in argv), limit_s=limit)
    if step.name == "build":
        record["removed"] = remove_built_library()
    start = time.monotonic()
    output, rc = run_limited(argv, step_env(check, step), limit)
    with open(check.log, "a") as log:
        log.write(f"\n===== {step.name}: {record['command']} (limit {limit} s)\n{output}")
    record["seconds"] = round(time.monotonic() - start, 1)
    record["tail"] = _tail(output)
    if rc is None:
        record.update(status="timed out", why=f"killed after {limit} s")
        judge(check, step, 1, record)  # keep whatever the step wrote before the limit
        record["status"] = "timed out"
    else:
        record["rc"] = rc
        record["status"] = judge(check, step, rc, record)
    if step.name == "wheels" and record["status"] == "passed" and not check.dry:
        site = check.work_dir / "site"
        if site.is_dir() and any(site.iterdir()):
            check.env["PYTHONPATH"] = os.pathsep.join([str(site), check.env["PYTHONPATH"]])
    if step.name == "versions" and isinstance(record.get("data"), dict) and \
            record["data"].get("capability"):
        check.env["VIPO_DEVICE_ARCH"] = record["data"]["capability"]
    return record


def run_limited(argv: list[str], env: dict, limit: int) -> tuple[str, int | None]:
    """(output, exit status) of ``argv``, or (output so far, None) once ``limit`` seconds
    have passed: then the step's whole process group (its own, started here: compilers,
    test workers, sub-processes) is killed, so nothing of it outlives its limit."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        return output, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return output, None


def remove_built_library() -> list[str]:
    """The in-place compiled library goes before the build, so a stale one cannot stand
    in for a build that failed."""
    removed = []
    for path in (ROOT / "vipo_kernels").glob("_C*.so"):
        path.unlink()
        removed.append(path.name)
    return removed


def _tail(text: str, lines: int = 40) -> str:
    kept = [line for line in text.splitlines() if not line.startswith("USDT:")]
    return "\n".join(kept[-lines:])


def install_wheels(site: Path, dry: bool) -> int:
    """pip-installs every wheel of benchmarks/wheels (or /.whl) into ``site`` with no index
    and no dependencies. Without wheels, it passes only if diffusers already imports (the
    dry run's environment) and says how to prepare them otherwise."""
    folders = [p for p in (ROOT / "benchmarks" / "wheels", ROOT / ".whl") if p.is_dir()]
    wheels = sorted(w for folder in folders for w in folder.glob("*.whl"))
    wanted = [line.split("==")[0].strip().lower().replace("-", "_") for line in
              (ROOT / "benchmarks" / "device_wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    have = {w.name.split("-")[0].lower() for w in wheels}
    print(f"wheels: {len(wheels)} found in {[str(f) for f in folders]}; listed: {wanted}")
    if not wheels:
        if importlib.util.find_spec("diffusers") is not None:
            print("wheels: none carried; diffusers already imports in this environment")
            return 0
        print("wheels: diffusers is missing and no wheels were carried; prepare them with "
              "`bash benchmarks/fetch_wheels.sh` (benchmarks/README.md)")
        return 1
    missing = [w for w in wanted if w not in have]
    if missing:
        print(f"wheels: listed but not carried: {missing}")
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
            "--no-compile", "--upgrade", "--target", str(site), *map(str, wheels)]
    print("wheels:", " ".join(argv))
    code = subprocess.run(argv).returncode
    if dry:
        print(f"wheels: dry run: installed into {site} to prove they install; not used")
    return code or (1 if missing else 0)


# ---------------------------------------------------------------------------- the results file
def device_name(dry: bool) -> str:
    if dry:
        return "cpu-dry-run"
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        name = "unknown-gpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown-gpu"


def write_results(check: Check, finished: bool) -> None:
    bad = [r["step"] for r in check.results if failed(r)]
    summary = {"mode": "dry run (CPU)" if check.dry else "GPU", "started": check.started,
               "finished": finished, "ok": finished and not bad, "failed_steps": bad,
               "steps": check.results}
    (check.out_dir / f"{check.stem}.json").write_text(json.dumps(summary, indent=1,
                                                                 default=str))
    lines = [f"# GPU check {check.stem}", "",
             f"Mode: {summary['mode']}; started {check.started}; "
             f"{'finished' if finished else 'IN PROGRESS (or interrupted)'}; "
             f"result: **{'PASS' if summary['ok'] else 'FAIL' if finished else '...'}**", "",
             "| step | status | seconds | limit s | why |", "|---|---|---|---|---|"]
    for r in check.results:
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '-')} | "
                     f"{r.get('limit_s', '-')} | {r.get('why', '')} |")
    for r in check.results:
        lines += ["", f"## {r['step']}: {r['title']}", "", f"Status: **{r['status']}**"
                  + (f" ({r['why']})" if r.get("why") else "")]
        if r.get("command"):
            lines += ["", f"`{r['command']}`"]
        if r["step"] == "versions" and isinstance(r.get("data"), dict):
            lines += ["", "| | |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in r["data"].items()]
        if r.get("junit"):
            j = r["junit"]
            lines += ["", f"Tests: {j['tests']}, failures {j['failures']}, errors "
                      f"{j['errors']}, skipped {j['skipped']}"]
            lines += [f"- skipped {n}x: {reason}" for reason, n in j["skip_reasons"].items()]
        if r.get("markdown"):
            lines += ["", r["markdown"].rstrip()]
        if r.get("tail") and (failed(r) or not r.get("markdown")):
            lines += ["", "<details><summary>output (last lines)</summary>", "", "```",
                      r["tail"], "```", "</details>"]
    (check.out_dir / f"{check.stem}.md").write_text("\n".join(lines) + "\n")
    if os.environ.get("OUT"):  # the device tool brings back what is in $OUT
        for suffix in (".md", ".json", ".log"):
            shutil.copy(check.out_dir / f"{check.stem}{suffix}", os.environ["OUT"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU steps, tiny sizes")
    parser.add_argument("--only", default="", help="comma-separated steps to run (default all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results, or "
                             "benchmarks/results/dry-run for --dry-run)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="overall limit (default 570 s on a GPU, 900 s for --dry-run)")
    parser.add_argument("--install-wheels", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.install_wheels:
        return install_wheels(args.install_wheels, args.dry_run)
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in {step.name for step in STEPS}]
    if unknown:
        parser.error(f"--only: unknown steps {unknown}; steps: "
                     f"{', '.join(s.name for s in STEPS)}")
    steps = [s for s in STEPS if not only or s.name in only]
    out = args.out or ROOT / "benchmarks" / "results" / ("dry-run" if args.dry_run else "")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    stem = f"gpu-check-{device_name(args.dry_run)}-{now:%Y%m%d-%H%M}"
    budget = args.budget_s or (900.0 if args.dry_run else 570.0)
    work = Path(tempfile.mkdtemp(prefix=f"{stem}-"))
    check = Check(dry=args.dry_run, out_dir=out.resolve(), work_dir=work, stem=stem,
                  deadline=time.monotonic() + budget, started=now.isoformat(timespec="seconds"))
    check.log = check.out_dir / f"{stem}.log"
    check.log.write_text("")
    check.env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")])),
                 "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false"}
    check.env.update({"TRITON_INTERPRET": "1"} if args.dry_run else {"VIPO_TEST_CUDA": "1"})
    print(f"gpu_check: {len(steps)} steps, budget {budget:.0f} s; results in "
          f"{check.out_dir}/{stem}.md and .json", flush=True)
    for i, step in enumerate(steps):
        record = run_step(check, step, steps[i + 1:])
        check.results.append(record)
        print(f"gpu_check: {step.name}: {record['status']}"
              f"{' (' + record['why'] + ')' if record.get('why') else ''} "
              f"in {record.get('seconds', 0)} s", flush=True)
        write_results(check, finished=False)
    write_results(check, finished=True)
    bad = [r["step"] for r in check.results if failed(r)]
    print(f"gpu_check: {'FAIL: ' + ', '.join(bad) if bad else 'PASS'}; "
          f"{check.out_dir}/{stem}.md", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
