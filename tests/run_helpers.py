"""Command lines of the smallest trainer runs, shared by the distributed, resume and fault
tests: the tiny preset cut to 32 px, 3 steps, groups of 2, on the shared tiny world."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "checkpoints/final/transformer/diffusion_pytorch_model.safetensors"


def run_args(world, out, name: str, **overrides) -> list:
    """``key=value`` arguments of a 2-iteration run named ``name`` under ``out``."""
    values = {"path": world["sd3"], "backbone": world["dinov2"], "height": 32, "width": 32,
              "max_sequence_length": 16, "num_steps": 3, "group_size": 2,
              "prompts_per_iter": 2, "sample_batch_size": 2, "train_batch_size": 2,
              "grad_accum": 4, "timestep_fraction": 1.0, "iterations": 2, "lr": 1e-3,
              "output_dir": out, "run_name": name, "progress": "false", "image_every": 0,
              "tensorboard": "false", "kernel_backend": "torch", "eval_every": -1}
    values.update(overrides)
    return ["tiny"] + [f"{k}={v}" for k, v in values.items() if v is not None]


def env(tmp_path) -> dict:
    """The environment of a trainer subprocess: this checkout first on the path, offline."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "VIPO_TINY_CACHE": str(Path(tmp_path) / "cache")}


TRAIN = [sys.executable, "-m", "vipo.train"]


def launch(processes: int = 2, target: list | None = None) -> list:
    """``accelerate launch`` of ``processes`` CPU processes (gloo), as a user would; the
    target defaults to ``-m vipo.train``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port)] + \
        (target or ["-m", "vipo.train"])


def check_call(command: list, tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=tmp_path, env=env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def normwise(a: dict, b: dict) -> float:
    """||a - b|| over every tensor of two state dicts."""
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def reset_accelerate() -> None:
    """Each in-process run builds its own Accelerator; accelerate keeps singletons."""
    from vipo.distributed import reset_accelerate_state

    reset_accelerate_state()


@contextlib.contextmanager
def started(command: list, tmp_path):
    """A trainer subprocess that is killed if the test fails before it ends."""
    proc = subprocess.Popen(command, cwd=tmp_path, env=env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run(*args) -> int:
    """``python -m vipo.train ARGS`` in this process; its exit code."""
    from vipo.train import main

    code = main([str(a) for a in args])
    reset_accelerate()
    return code
