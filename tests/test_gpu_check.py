"""benchmarks/gpu_check.sh and its driver: a failed build fails the check, a failing or
overrunning step is recorded and the next one still runs, the results file holds every
step. The full dry run (every CPU step, about two minutes) runs in CI (.ci/run); these
tests run single steps in a copy of the sources, so a deliberately broken build cannot
touch the checkout's own compiled library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

from .utils import make_loss_case

ROOT = Path(__file__).resolve().parents[1]
TESTS_NEEDED = ("__init__.py", "conftest.py", "utils.py", "test_kernels.py",
                "test_kernels_cuda.py", "test_cuda_backend.py")


@pytest.fixture
def sources(tmp_path) -> Path:
    """What the build and kernel-test steps read, copied without any built library."""
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "results", "wheels", "build")
    for name in ("csrc", "vipo_kernels", "benchmarks"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, copy / name)
    (copy / "tests").mkdir()
    for name in TESTS_NEEDED:
        shutil.copy(ROOT / "tests" / name, copy / "tests" / name)
    return copy


def _check(repo: Path, *args, **env) -> tuple[int, dict, str]:
    """Runs the check script in ``repo``; (exit status, results JSON, results markdown)."""
    out = repo / "results"
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           "--out", str(out), *args],
                          env=dict(os.environ, PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=300)
    (js,) = out.glob("gpu-check-*.json")
    (md,) = out.glob("gpu-check-*.md")
    assert (out / js.name.replace(".json", ".log")).exists()
    return proc.returncode, json.loads(js.read_text()), md.read_text()


def _steps(results: dict) -> dict:
    return {r["step"]: r for r in results["steps"]}


def test_a_failed_build_fails_the_check_and_the_next_steps_still_run(sources):
    """A compiler that fails (CXX=false) makes the build step fail, so the check exits 1;
    the backends step then finds no C++ backend, and the tests step after them still runs
    and is recorded."""
    code, results, md = _check(sources, "--only", "build,backends,tests", CXX="false",
                               MAX_JOBS="1")
    steps = _steps(results)
    assert code == 1 and results["finished"] and not results["ok"]
    assert steps["build"]["status"] == "failed" and steps["build"]["rc"] != 0
    assert "BUILDING THE COMPILED EXTENSION FAILED" not in steps["build"]["tail"]
    # No C++ backend, or (where an editable install elsewhere supplies one) not this tree's.
    backends = steps["backends"]["data"]
    assert steps["backends"]["status"] == "failed" and not backends["ok"]
    assert backends["missing"] == ["cpp"] or not backends["library_in_tree"]
    assert steps["tests"]["status"] == "passed" and steps["tests"]["junit"]["tests"] > 100
    assert results["failed_steps"] == ["build", "backends"]
    assert "| build | failed |" in md and "result: **FAIL**" in md


@pytest.mark.parametrize("require", [False, True], ids=["plain", "required"])
def test_setup_without_a_compiler(sources, require):
    """A plain build without a working compiler still installs (the torch and Triton
    backends work), with a banner; VIPO_REQUIRE_EXT=1, as the check sets it, makes it an
    error."""
    env = dict(os.environ, CXX="false", MAX_JOBS="1")
    env.pop("VIPO_REQUIRE_EXT", None)
    env.pop("VIPO_REQUIRE_CUDA", None)
    if require:
        env["VIPO_REQUIRE_EXT"] = "1"
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=sources,
                          env=env, capture_output=True, text=True, timeout=120)
    assert not list((sources / "vipo_kernels").glob("_C*.so"))
    if require:
        assert proc.returncode != 0
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "BUILDING THE COMPILED EXTENSION FAILED" in proc.stderr


def test_a_step_over_its_limit_is_killed_and_recorded(tmp_path, monkeypatch):
    """The table step given 6 s is killed (its whole process group) and recorded as timed
    out; the step after it still runs; the exit status is 1."""
    steps = [gpu_check.Step("table", "bandwidth table", 6, 1),
             next(s for s in gpu_check.STEPS if s.name == "device_errors")]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    (js,) = tmp_path.glob("gpu-check-*.json")
    results = _steps(json.loads(js.read_text()))
    assert results["table"]["status"] == "timed out" and results["table"]["seconds"] < 30
    assert results["device_errors"]["status"] == "passed"
    problems = results["device_errors"]["data"]["problems"]
    assert problems == [] and len(results["device_errors"]["data"]["results"]) == 12


def test_no_time_left_is_a_failure_but_a_cuda_step_in_a_dry_run_is_not():
    assert gpu_check.failed({"status": "not run", "why": gpu_check.NO_TIME})
    assert not gpu_check.failed({"status": "not run", "why": gpu_check.NEEDS_CUDA})
    assert gpu_check.failed({"status": "timed out"})


def test_skips_on_the_gpu_machine_fail_the_tests_step(tmp_path):
    """On the GPU machine a skipped gpu-marked test means a backend is missing: the tests
    step fails on it even though pytest exits 0."""
    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="1">'
                   '<testcase name="a"/><testcase name="b"><skipped message="backend '
                   '\'cuda\' not built here"/></testcase></testsuite></testsuites>')
    check = gpu_check.Check(dry=False, out_dir=tmp_path, work_dir=tmp_path, stem="x",
                            deadline=0.0)
    step = next(s for s in gpu_check.STEPS if s.name == "tests")
    record: dict = {}
    assert gpu_check.judge(check, step, 0, record) == "failed"
    assert record["junit"]["skip_reasons"] == {"backend 'cuda' not built here": 1}
    check.dry = True
    assert gpu_check.judge(check, step, 0, {}) == "passed"


def test_noncontiguous_cases_keep_their_layout_on_the_device():
    """The GPU parity tests' non-contiguous cases are made on the target device (a dense
    copy there would test contiguous data); 'meta' stands in for CUDA here."""
    for layout in ("batch", "position"):
        case = make_loss_case((2, 4, 3, 5, 6), torch.bfloat16, kl_coef=0.5,
                              noncontiguous=layout, device="meta")
        for t in (case.model_output, case.sample, case.next_sample,
                  case.kwargs["ref_model_output"]):
            assert t.device.type == "meta" and not t.is_contiguous()
