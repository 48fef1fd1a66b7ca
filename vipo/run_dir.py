"""Run folders: a new run never writes into another run's folder.

``mkdir`` without ``exist_ok`` is atomic on POSIX file systems, so it doubles as the lock:
of two runs that pick the same name at the same moment exactly one creates the folder.
A generated name (``<preset>-<date>-<time>``) takes the next free ``-2``, ``-3``, ...
suffix; a ``run_name`` the user chose must be new unless ``resume=`` names it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .errors import ConfigError


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
