"""Exact resume, atomic checkpoints, stop signals and run folders (CPU, tiny world)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vipo.checkpointing import complete_checkpoints, read_state
from vipo.logging_utils import read_metrics
from vipo.run_dir import create_run_dir

from .run_helpers import TRAIN, WEIGHTS, env, run, run_args, started


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def same_run(a: Path, b: Path, weights: str = WEIGHTS) -> None:
    """Bit-identical final weights, and metrics equal in every column but the timings."""
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    for table in ("metrics.csv", "eval.csv"):
        if not (a / table).is_file():
            assert not (b / table).is_file()
            continue
        rows_a, rows_b = read_metrics(a / table), read_metrics(b / table)
        assert len(rows_a) == len(rows_b), table
        for ra, rb in zip(rows_a, rows_b):
            for key in ra:
                if not key.startswith("time_"):
                    same = ra[key] == rb[key] or (ra[key] != ra[key] and rb[key] != rb[key])
                    assert same, (table, key)


# Everything a checkpoint must carry is exercised: random step subsets (the trainer's RNG),
# LR warm-up (scheduler), EMA, PSM maps, and AdamW moments.
STATEFUL = {"num_steps": 4, "timestep_fraction": 0.67, "lr_warmup_steps": 3, "iterations": 4,
            "grad_accum": 2, "checkpoint_every": 2, "algorithm": "vipo", "eval_every": 2,
            "eval_samples": 2}


@pytest.mark.parametrize("variant", [{"ema_decay": 0.9}, {"lora_rank": 2}], ids=["full", "lora"])
def test_resumed_run_is_bit_identical(tiny_world, tmp_path, variant):
    """A run stopped after iteration 2 (its periodic checkpoint, later rows and checkpoints
    gone) and resumed ends exactly like the uninterrupted run."""
    weights = "checkpoints/final/pytorch_lora_weights.safetensors" if "lora_rank" in variant \
        else WEIGHTS
    assert run(*run_args(tiny_world, tmp_path, "whole", **STATEFUL, **variant)) == 0
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "final")  # as if stopped after iteration 2
    assert [c.name for c in complete_checkpoints(cut)] == ["iter000002"]
    assert run(f"resume={cut}", f"output_dir={tmp_path}") == 0
    same_run(tmp_path / "whole", cut, weights)
    if "ema_decay" in variant:
        ema = [load_file(d / "checkpoints/final/ema.safetensors") for d in (tmp_path / "whole", cut)]
        assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    assert read_state(cut / "checkpoints" / "final")["optimizer_steps"] == \
        read_state(tmp_path / "whole" / "checkpoints" / "final")["optimizer_steps"]


def test_resume_latest_and_bad_resume_targets(tiny_world, tmp_path, capsys):
    assert run(*run_args(tiny_world, tmp_path, "a", checkpoint_every=1)) == 0
    assert run("resume=latest", f"output_dir={tmp_path}", "iterations=3") == 0
    assert len(read_metrics(tmp_path / "a" / "metrics.csv")) == 3  # appended to run a
    capsys.readouterr()
    for target, message in [(tmp_path / "nope", "is not a run folder"),
                            (tmp_path / "a" / "checkpoints" / ".partial-x",
                             "is not a complete checkpoint")]:
        assert run(f"resume={target}", f"output_dir={tmp_path}") == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "run.resume" in err and message in err, err
    assert run("resume=latest", f"output_dir={tmp_path / 'empty'}") == 2
    assert "no run under" in capsys.readouterr().err


def test_retention_keeps_the_last_n_and_the_best(tiny_world, tmp_path):
    assert run(*run_args(tiny_world, tmp_path, "r", iterations=6, checkpoint_every=1,
                         keep_checkpoints=2)) == 0
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    names = [c.name for c in complete_checkpoints(tmp_path / "r")]
    # iterNNNNNN holds the state after NNNNNN iterations; its metric is that of the last row.
    best = max(range(5), key=lambda i: rows[i]["reward_mean"])
    expected = {f"iter{i:06d}" for i in (4, 5, best + 1)} | {"final"}
    assert set(names) == expected, (names, [r["reward_mean"] for r in rows])


def _wait_for(path: Path, rows: int, proc, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and len(path.read_text().splitlines()) > rows:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {rows} rows")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_and_resume_matches(tiny_world, tmp_path, signum):
    """A signal to a running `python -m vipo.train`: it finishes the iteration, saves a
    checkpoint, exits with 128 + signal and one line; resuming (compared for SIGTERM) ends
    like a run never stopped."""
    args = run_args(tiny_world, tmp_path, "stopped", iterations=200)
    with started(TRAIN + args, tmp_path) as proc:
        _wait_for(tmp_path / "stopped" / "metrics.csv", 1, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"vipo.train: stopped by {signal.Signals(signum).name}; checkpoint ")
    assert f"resume={tmp_path / 'stopped'}" in last
    (checkpoint,) = complete_checkpoints(tmp_path / "stopped")
    done = read_state(checkpoint)["iteration"]
    assert read_state(checkpoint)["kind"] == "stop"
    assert len(read_metrics(tmp_path / "stopped" / "metrics.csv")) == done
    if signum != signal.SIGTERM:
        return
    total = done + 2
    assert run(f"resume={tmp_path / 'stopped'}", f"output_dir={tmp_path}",
               f"iterations={total}") == 0
    assert run(*run_args(tiny_world, tmp_path, "straight", iterations=total)) == 0
    same_run(tmp_path / "straight", tmp_path / "stopped")


KILL_DURING_SAVE = """
import os, signal, sys
import vipo.checkpointing as ck
from vipo.train import main

original, calls = ck._write_weights, []

def write_then_die(trainer, folder, weights):
    calls.append(folder)
    original(trainer, folder, weights)
    if len(calls) == 2:  # the second checkpoint: cut its weights file short, then SIGKILL
        path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

ck._write_weights = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_save_leaves_the_previous_checkpoint(tiny_world, tmp_path):
    args = run_args(tiny_world, tmp_path, "killed", iterations=4, checkpoint_every=1)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE] + args, cwd=tmp_path,
                          env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folder = tmp_path / "killed" / "checkpoints"
    assert (folder / ".partial-iter000002").is_dir()  # the save that was cut short
    assert [c.name for c in complete_checkpoints(tmp_path / "killed")] == ["iter000001"]
    assert run("resume=latest", "run_name=killed", f"output_dir={tmp_path}") == 0
    rows = read_metrics(tmp_path / "killed" / "metrics.csv")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]  # iteration 1 re-run once
    assert run(*run_args(tiny_world, tmp_path, "straight", iterations=4)) == 0
    same_run(tmp_path / "straight", tmp_path / "killed")


def _make_run_dir(args):
    import vipo.run_dir

    out, barrier = args
    # The same second for all, so that every one of them wants the same generated name.
    vipo.run_dir.time.strftime = lambda fmt: "20261201-120000"
    barrier.wait()  # all start at the same moment
    return str(create_run_dir(out, "", "tiny"))


def test_run_folders_never_collide(tmp_path):
    """Eight runs creating their folder at the same moment, in the same second, get eight
    folders: tiny-20261201-120000 and its -2 ... -8."""
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(8)
        with multiprocessing.get_context("spawn").Pool(8) as pool:
            folders = pool.map(_make_run_dir, [(tmp_path, barrier)] * 8)
    assert sorted(Path(f).name for f in folders) == sorted(
        ["tiny-20261201-120000"] + [f"tiny-20261201-120000-{n}" for n in range(2, 9)])


def test_two_trainer_runs_started_together(tiny_world, tmp_path):
    """Two `python -m vipo.train` with the same settings and no run_name, started at the
    same moment: two folders, each with its own whole metrics.csv."""
    args = run_args(tiny_world, tmp_path, None)
    with started(TRAIN + args, tmp_path) as first, started(TRAIN + args, tmp_path) as second:
        for proc in (first, second):
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-2000:]
    runs = sorted(d for d in tmp_path.iterdir() if (d / "metrics.csv").is_file())
    assert len(runs) == 2
    for folder in runs:
        assert [r["iteration"] for r in read_metrics(folder / "metrics.csv")] == [0, 1]


def test_reused_run_name_is_an_error(tiny_world, tmp_path, capsys):
    assert run(*run_args(tiny_world, tmp_path, "taken")) == 0
    before = (tmp_path / "taken" / "metrics.csv").read_bytes()
    capsys.readouterr()
    assert run(*run_args(tiny_world, tmp_path, "taken")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.run_name" in err and "resume=" in err, err
    assert (tmp_path / "taken" / "metrics.csv").read_bytes() == before  # nothing lost


def test_checkpoint_files_are_what_the_docs_say(tiny_world, tmp_path):
    assert run(*run_args(tiny_world, tmp_path, "c", ema_decay=0.5)) == 0
    folder = tmp_path / "c" / "checkpoints" / "final"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["ema.safetensors", "optimizer.pt", "rng_0.pt", "state.json",
                     "transformer"]
    state = json.loads((folder / "state.json").read_text())
    assert state["complete"] and state["iteration"] == 2 and state["kind"] == "final"
    assert {"sampler", "scheduler", "ema", "optimizer_steps"} <= state.keys()
    # weights_only: tensors and plain values only
    rng = torch.load(folder / "rng_0.pt", weights_only=True)
    assert {"torch", "cuda", "numpy", "python", "trainer"} == rng.keys()
    assert not list((tmp_path / "c" / "checkpoints").glob(".*"))  # no partial left over


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT only asks for a stop; the second raises KeyboardInterrupt."""
    import os

    from vipo.faults import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
