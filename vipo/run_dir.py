"""Run folders: a new run never writes into another run's folder.

``mkdir`` without ``exist_ok`` is atomic on POSIX file systems, so it doubles as the lock:
of two runs that pick the same name at the same moment exactly one creates the folder.
A generated name (``<preset>-<date>-<time>``) takes the next free ``-2``, ``-3``, ...
suffix; a ``run_name`` the user chose must be new unless ``resume=`` names it.

``RunLock``: one writer per run folder, an exclusive ``flock`` on ``<run>/.lock``. The
kernel drops it when the process ends in any way (kill -9 included), so a crashed run's
lock is never in the way; the file holds the owner's pid and host for the message.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger("vipo")
LOCK = ".lock"
RUN_FILES = ("config.yaml", "metrics.csv", "eval.csv", "curves.png", "samples", "tensorboard",
             "checkpoints")


def create_run_dir(output_dir, run_name: str, preset: str) -> Path:
    """Creates and returns a new, empty run folder; never reuses an existing one."""
    parent = Path(output_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.output_dir: cannot create {str(parent)!r} ({err})") from None
    if run_name:
        folder = parent / run_name
        try:
            folder.mkdir()
        except FileExistsError:
            raise ConfigError(f"run.run_name: the run folder {str(folder)!r} already exists; "
                              f"choose another run_name, or continue it with "
                              f"resume={folder}") from None
        return folder
    stem = f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 10_000):
        folder = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"run.output_dir: no free run folder name {stem}-N in {str(parent)!r}")


def find_resume(resume: str, output_dir, run_name: str) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) that ``resume=`` points at: a run folder (its newest
    complete checkpoint), a checkpoint folder inside one, or ``latest`` (the run of
    ``run_name``, else the run under ``output_dir`` with the newest checkpoint)."""
    from .checkpointing import complete_checkpoints, read_state

    what = f"run.resume={resume}"
    if resume == "auto":
        return Path(output_dir) / run_name, complete_checkpoints(Path(output_dir) / run_name)[-1]
    if resume == "latest" and not run_name:
        runs = [d for d in Path(output_dir).glob("*") if d.is_dir() and complete_checkpoints(d)]
        if not runs:
            raise ConfigError(f"{what}: no run under {str(output_dir)!r} has a complete "
                              f"checkpoint")
        run = max(runs, key=lambda d: complete_checkpoints(d)[-1].stat().st_mtime)
        return run, complete_checkpoints(run)[-1]
    path = Path(output_dir) / run_name if resume == "latest" else Path(resume)
    if path.parent.name == "checkpoints":
        if read_state(path) is None:
            raise ConfigError(f"{what}: {str(path)!r} is not a complete checkpoint")
        return _existing_run(path.parent.parent, what), path
    run = _existing_run(path, what)
    found = complete_checkpoints(run)
    if not found:
        raise ConfigError(f"{what}: the run {str(run)!r} has no complete checkpoint")
    return run, found[-1]


def _existing_run(folder: Path, what: str) -> Path:
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{what}: {str(folder)!r} is not a run folder (no config.yaml)")
    return folder


class RunLock:
    """``acquire()`` takes the run folder's lock or raises ConfigError naming its holder;
    ``release()`` (also at exit) drops it. The file stays: removing it would let a waiting
    process lock the removed file while a third creates a new one."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd = None

    def acquire(self) -> "RunLock":
        import atexit
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"run folder {str(self.path.parent)!r} is in use by another "
                              f"process ({self._holder()}); one run has one writer: wait for "
                              f"it to end or stop it") from None
        except OSError as err:  # a file system without locks: go on, unprotected
            logger.warning("cannot lock %s (%s): nothing stops a second process writing "
                           "this run", self.path, err)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        atexit.register(self.release)
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            return f"pid {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"lock {self.path}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def auto_run_dir(output_dir, run_name: str) -> tuple[Path, bool]:
    """``resume=auto``: (run_name's folder, whether it has a complete checkpoint to resume).
    The folder is created when missing; without a complete checkpoint the run starts over
    in it, so what an earlier start left (a config.yaml, metrics of unsaved iterations,
    half-written checkpoints) is removed first. Call with the folder's lock held: see
    ``lock_auto_run_dir``."""
    from .checkpointing import complete_checkpoints

    folder = Path(output_dir) / run_name
    if complete_checkpoints(folder):
        return folder, True
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return folder, False


def lock_auto_run_dir(output_dir, run_name: str) -> tuple[Path, RunLock]:
    """Creates run_name's folder if needed and locks it (``resume=auto``)."""
    if not run_name:
        raise ConfigError("run.resume=auto: needs run.run_name (the run that a requeued job "
                          "starts or continues)")
    folder = Path(output_dir) / run_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.output_dir: cannot create {str(folder)!r} ({err})") from None
    return folder, RunLock(folder).acquire()
