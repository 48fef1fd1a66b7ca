"""Stops, crashes and bad input: what the trainer does instead of dying with a traceback.

* ``StopSignals``: SIGTERM and SIGINT ask the loop to stop after the current iteration,
  which then saves a resumable checkpoint; a second SIGINT stops at once.
* ``TrainingError``: a failure with a one-line message; ``save`` says whether the state is
  still worth a checkpoint (not after divergence, not when the save itself failed).
* ``loading``: turns the many ways a model or file fails to load into one line naming it.
* ``phase``: an out-of-memory error names the phase and what to shrink.
* ``warn_on_failure``: for optional outputs (sample images, overlays, TensorBoard).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path

from .errors import LoadError, RunStopped, TrainingError  # noqa: F401 - re-exported

logger = logging.getLogger("vipo")


class StopSignals:
    """Context manager: SIGTERM/SIGINT set ``requested`` (the loop checks it between
    iterations); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        logger.warning("%s received: stopping after this iteration and saving a checkpoint "
                       "(Ctrl-C again stops at once)", signal.Signals(signum).name)

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


_SHRINK = {"sampling": "sample.sample_batch_size", "training": "train.train_batch_size",
           "reward": "sample.sample_batch_size", "psm": "sample.sample_batch_size"}


@contextlib.contextmanager
def phase(name: str, cfg):
    """Re-raises an out-of-memory error in phase ``name`` as a TrainingError saying what to
    change; other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if not is_oom(err):
            raise
        key = _SHRINK.get(name, "train.train_batch_size")
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        hint = "" if cfg.model.gradient_checkpointing else \
            ", or turn on model.gradient_checkpointing=true"
        raise TrainingError(f"out of memory during {name} ({str(err).splitlines()[0][:120]}); "
                            f"lower {key} (now {value}){hint}") from None


@contextlib.contextmanager
def loading(what: str, name: str):
    """Errors while loading ``what`` from ``name`` (a folder, file or hub id) -> LoadError
    naming it, in one line; a corrupt safetensors file is named too."""
    try:
        yield
    except LoadError:
        raise
    except Exception as err:  # noqa: BLE001 - loaders raise OSError, ValueError, HF errors...
        if is_oom(err) or isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise LoadError(f"cannot load {what} {name!r}: {_why(err, name)}") from None


def _why(err: Exception, name: str) -> str:
    bad = _corrupt_safetensors(name)
    if bad is not None:
        return f"the file {str(bad)!r} is corrupt or truncated"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if name in text:  # the loader's own message already names it (and says why)
        return text[:400]
    if not Path(name).exists() and ("/" not in name or name.count("/") == 1):
        return (f"not a local folder, and the hub cannot provide it ({text[:200]}); check "
                f"the id, the network, or HF_HUB_OFFLINE")
    return f"{type(err).__name__}: {text[:300]}"


def _corrupt_safetensors(name: str) -> Path | None:
    """The first *.safetensors file under folder ``name`` that safetensors cannot open."""
    folder = Path(name)
    if not folder.is_dir():
        return None
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception:  # noqa: BLE001 - any failure to open means the file is bad
            return path
    return None


@contextlib.contextmanager
def warn_on_failure(what: str):
    """For outputs the run does not need (images, overlays): an OSError warns, the run goes
    on. Metrics and checkpoints do not use this: their failures are real errors."""
    try:
        yield
    except OSError as err:
        logger.warning("could not write %s (%s); training goes on", what, err)


def one_line(err: BaseException) -> str:
    """The message main() prints for an error: the exception's own line, no traceback."""
    if isinstance(err, TrainingError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
