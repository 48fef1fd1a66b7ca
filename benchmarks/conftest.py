"""Benchmark setup: records the device, library versions and git SHA on every run so that
a figure can be traced to what produced it. Kernel backends are timed on the device they
target; on a CPU-only machine the Triton interpreter is not timed (it measures Python, not
the kernel)."""

import os
import subprocess

if os.environ.get("VIPO_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                              else f"cpu ({os.cpu_count()} cores, no GPU)")
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["git_sha"] = _git_sha()
