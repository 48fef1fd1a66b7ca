"""Runs on a shared cluster: a stop inside a short grace period, start-or-resume for a requeued
job, one writer per run, and a resume that branches from an older checkpoint (CPU, tiny
world). The long iteration is a reward that sleeps while a flag file exists."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

import pytest

from vipo.checkpointing import complete_checkpoints, read_state
from vipo.logging_utils import read_metrics

from .run_helpers import TRAIN, run, run_args, started
from .test_faults import one_line
from .test_resume import same_run

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

# Each call: touch $VIPO_T_READY; while $VIPO_T_SLOW exists, sleep 60 s (an iteration far
# longer than the grace); raise on the call numbered $VIPO_T_FAIL. The factory sleeps while
# $VIPO_T_SLOW_LOAD exists (a long model load).
REWARD = """
    import os, time
    from pathlib import Path

    def factory(cfg, device):
        while os.path.exists(os.environ.get("VIPO_T_SLOW_LOAD", "/nonexistent")):
            Path(os.environ["VIPO_T_READY"]).touch()
            time.sleep(0.2)
        calls = []
        def fn(images, prompts):
            calls.append(1)
            if str(len(calls)) == os.environ.get("VIPO_T_FAIL"):
                raise RuntimeError("reward server unreachable")
            if os.path.exists(os.environ.get("VIPO_T_SLOW", "/nonexistent")):
                Path(os.environ["VIPO_T_READY"]).touch()
                time.sleep(60)
            return images.mean(dim=(1, 2, 3))
        return fn
    """


@pytest.fixture
def flags(tmp_path, monkeypatch):
    (tmp_path / "cluster_reward.py").write_text(textwrap.dedent(REWARD))
    monkeypatch.syspath_prepend(str(tmp_path))
    names = {k: tmp_path / k for k in ("slow", "slow_load", "ready")}
    for key, path in names.items():
        monkeypatch.setenv(f"VIPO_T_{key.upper()}", str(path))
    return names


def _wait(path: Path, proc, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def _term_then_kill(proc, grace: float) -> tuple[int, str, float]:
    """SIGTERM, then SIGKILL after ``grace`` seconds, as SLURM and Kubernetes do."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=grace)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: the grace is over
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err, time.monotonic() - start


def test_sigterm_saves_within_a_short_grace_and_one_writer_per_run(tiny_world, tmp_path,
                                                                   flags):
    """A reward call sleeps 60 s; SIGTERM then SIGKILL 20 s later (the tiny model saves in
    about a second on quiet cores; the margin is for a loaded machine): the run saves the
    state at that iteration's start in time, the resumed run matches an uninterrupted one.
    While it runs, a second process on the same run is refused in one line."""
    reward = {"reward": "cluster_reward:factory", "iterations": 3, "checkpoint_every": 0}
    args = run_args(tiny_world, tmp_path, "cut", **reward)
    with started(TRAIN + args, tmp_path) as proc:
        _wait(tmp_path / "cut" / "metrics.csv", proc)  # iteration 0 is done
        flags["slow"].touch()
        flags["ready"].unlink(missing_ok=True)
        _wait(flags["ready"], proc)  # an iteration is scoring, for 60 s
        second = run(*run_args(tiny_world, tmp_path, "cut", resume="auto", **reward))
        code, err, seconds = _term_then_kill(proc, grace=20.0)
    assert second == 2
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and seconds < 20.0
    last = err.strip().splitlines()[-1]
    assert last.startswith("vipo.train: stopped by SIGTERM; checkpoint ") and \
        f"resume={tmp_path / 'cut'}" in last, last
    (checkpoint,) = complete_checkpoints(tmp_path / "cut")
    done = read_state(checkpoint)["iteration"]  # the iterations before the sleeping one
    assert done >= 1 and read_state(checkpoint)["kind"] == "stop"
    assert len(read_metrics(tmp_path / "cut" / "metrics.csv")) == done
    flags["slow"].unlink()
    assert run(f"resume={tmp_path / 'cut'}", f"output_dir={tmp_path}") == 0
    assert run(*run_args(tiny_world, tmp_path, "straight", **reward)) == 0
    same_run(tmp_path / "straight", tmp_path / "cut")


def test_the_same_auto_command_three_times(tiny_world, tmp_path, flags, monkeypatch):
    """One command, repeated as a requeued job would: stopped while loading (nothing left
    that blocks it), then a reward error at iteration 2 (crash checkpoint), then it resumes
    and ends exactly like an uninterrupted run."""
    reward = {"reward": "cluster_reward:factory", "iterations": 3, "checkpoint_every": 1}
    args = run_args(tiny_world, tmp_path, "R", resume="auto", **reward)
    flags["slow_load"].touch()
    with started(TRAIN + args, tmp_path) as proc:
        _wait(flags["ready"], proc)  # loading the rewards, slowly
        code, err, _ = _term_then_kill(proc, grace=30.0)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "before training started" in err.strip().splitlines()[-1]
    assert not (tmp_path / "R").exists() or not complete_checkpoints(tmp_path / "R")
    flags["slow_load"].unlink()
    monkeypatch.setenv("VIPO_T_FAIL", "3")  # the third reward call: iteration 2
    assert run(*args) == 1
    assert [read_state(c)["iteration"] for c in complete_checkpoints(tmp_path / "R")][-1] == 2
    monkeypatch.delenv("VIPO_T_FAIL")
    assert run(*args) == 0
    assert run(*run_args(tiny_world, tmp_path, "straight", **reward)) == 0
    same_run(tmp_path / "straight", tmp_path / "R")


def test_resume_from_an_older_checkpoint_branches(tiny_world, tmp_path, caplog):
    """6 iterations with checkpoints every 2 (iter000002, iter000004, final), resumed from iter000002 for 3 iterations: the
    later checkpoints move aside, the run's final is the branch's and agrees with
    metrics.csv, and resume= of the run takes the branch."""
    assert run(*run_args(tiny_world, tmp_path, "c", iterations=6, checkpoint_every=2,
                         keep_checkpoints=6)) == 0
    older = tmp_path / "c" / "checkpoints" / "iter000002"
    assert run(f"resume={older}", f"output_dir={tmp_path}", "iterations=3", "lr=2e-3") == 0
    assert "a branch; moved iter000004, final" in caplog.text
    aside = list((tmp_path / "c" / "checkpoints").glob(".abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == \
        ["final", "iter000004"]
    final = tmp_path / "c" / "checkpoints" / "final"
    assert read_state(final)["iteration"] == 3 == len(read_metrics(tmp_path / "c" / "metrics.csv"))
    assert [c.name for c in complete_checkpoints(tmp_path / "c")] == ["iter000002", "final"]


def test_full_disk_at_a_periodic_save(tiny_world, tmp_path, monkeypatch, capsys):
    """A patched writer raising ENOSPC at the second periodic save (torch.save's own message
    would be 'unexpected pos'): one line naming the full disk, no half-written folder, the
    first checkpoint kept and resumable."""

    import vipo.checkpointing as ck

    original, calls = ck._write_weights, []

    def write(parts, folder, weights):
        calls.append(folder)
        if len(calls) == 2:
            (folder / "junk").write_bytes(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        original(parts, folder, weights)

    monkeypatch.setattr(ck, "_write_weights", write)
    real_usage = ck.shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real_usage(p)._replace(
        free=0 if len(calls) == 2 else real_usage(p).free))
    assert run(*run_args(tiny_world, tmp_path, "p", iterations=3, checkpoint_every=1)) == 1
    line = one_line(capsys)
    assert "No space left on device" in line and "iter000002 not saved" in line, line
    assert "half-written files were removed" in line and "resume=" in line, line
    assert not list((tmp_path / "p" / "checkpoints").glob(".partial-*"))
    assert [c.name for c in complete_checkpoints(tmp_path / "p")] == ["iter000001"]


def test_free_space_is_checked_before_the_final_save(tiny_world, tmp_path, monkeypatch,
                                                     capsys):
    """Too little free space for the final checkpoint (a patched disk_usage): one line says
    how much is needed and where, and which checkpoint is kept (the previous final)."""
    import vipo.checkpointing as ck

    assert run(*run_args(tiny_world, tmp_path, "f", iterations=2, checkpoint_every=1)) == 0
    real_usage = ck.shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    assert run(f"resume={tmp_path / 'f'}", f"output_dir={tmp_path}", "iterations=3") == 1
    line = one_line(capsys)
    assert "not enough disk space for checkpoint final: it needs about" in line, line
    final = tmp_path / "f" / "checkpoints" / "final"
    assert str(final.parent) in line and f"checkpoint {final}; continue with resume=" in line
    assert read_state(final)["iteration"] == 2  # the last good one, kept


def test_full_disk_at_the_final_save_retries_after_pruning(tiny_world, tmp_path, monkeypatch,
                                                           caplog):
    """A patched writer raising ENOSPC at the first try of the final save: the weights are
    still in memory, the checkpoints keep_checkpoints allows to go are pruned and the final
    is written on the second try."""
    import errno

    import vipo.checkpointing as ck

    original, finals = ck._write_weights, []

    def write(parts, folder, weights):
        if "final" in folder.name:
            finals.append(folder)
            if len(finals) == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        original(parts, folder, weights)

    monkeypatch.setattr(ck, "_write_weights", write)
    assert run(*run_args(tiny_world, tmp_path, "r", iterations=3, checkpoint_every=1,
                         keep_checkpoints=2)) == 0
    assert len(finals) == 2 and "trying once more after removing older checkpoints" in caplog.text
    assert [c.name for c in complete_checkpoints(tmp_path / "r")] == ["iter000002", "final"]
    assert read_state(tmp_path / "r" / "checkpoints" / "final")["iteration"] == 3
