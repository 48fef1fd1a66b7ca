"""Stops, crashes and bad input: what the trainer does instead of dying with a traceback.

* ``StopSignals``: SIGTERM and SIGINT stop the run within one optimiser step, or the
  longest single operation, and the loop saves a resumable checkpoint; a second SIGINT
  stops at once.
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

from .errors import LoadError, RunStopped, StopNow, TrainingError  # noqa: F401 - re-exported

logger = logging.getLogger("vipo")


class StopSignals:
    """Context manager for SIGTERM/SIGINT. The first signal sets ``requested``; inside
    ``at_once()`` it also raises StopNow at once (the run loop then writes the last exact
    state), except within ``held()`` (an optimiser step), which raises it on exit. Outside
    ``at_once()`` the loop checks ``requested`` between iterations. Any SIGINT after the
    first signal raises KeyboardInterrupt at once; a repeated SIGTERM is ignored."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}
        self._at_once = False
        self._held = 0

    def _handle(self, signum, frame):
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = signum
        name = signal.Signals(signum).name
        if self._at_once and not self._held:
            logger.warning("%s received: stopping now and saving the last complete state "
                           "(Ctrl-C again stops at once, without saving)", name)
            raise StopNow(signum)
        logger.warning("%s received: stopping at the next safe point and saving a checkpoint "
                       "(Ctrl-C again stops at once, without saving)", name)

    @contextlib.contextmanager
    def at_once(self):
        """A stretch that a stop signal may cut anywhere (the loop can save the state of
        the start of the iteration, or the state as it is, exactly)."""
        previous, self._at_once = self._at_once, True
        try:
            if self.requested is not None and not self._held:
                raise StopNow(self.requested)
            yield
        finally:
            self._at_once = previous

    @contextlib.contextmanager
    def held(self):
        """A stretch a signal must not cut (it changes weights, optimiser and counters
        together); a signal received in it raises StopNow when it ends."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._at_once and self.requested is not None:
            raise StopNow(self.requested)

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
    naming it, in one line; a corrupt safetensors file is named too. A local-looking
    ``name`` that does not exist fails at once: it is never sent to the hub."""
    missing = missing_local(name)
    if missing:
        raise LoadError(f"cannot load {what} {name!r}: {missing}")
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
    if not Path(name).exists() and _from_hub(err):
        import huggingface_hub.constants

        if huggingface_hub.constants.HF_HUB_OFFLINE:
            return (f"not a local folder, and not in the hub cache; HF_HUB_OFFLINE is set, so "
                    f"the hub was not asked ({text[:160]})")
        return (f"not a local folder, and the hub cannot provide it ({text[:200]}); check "
                f"the id and the network")
    if name in text:  # the loader's own message already names it (and says why)
        return text[:400]
    return f"{type(err).__name__}: {text[:300]}"


def _from_hub(err: BaseException) -> bool:
    """Whether ``err`` or an error it was raised from came from the hub client or the
    network (a reward factory's own FileNotFoundError, say, did not)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__module__.split(".")[0] in ("huggingface_hub", "requests", "httpx",
                                                    "urllib3"):
            return True
        err = err.__cause__ or err.__context__
    return False


def missing_local(name: str) -> str | None:
    """Why ``name`` is a local path that does not exist, or None (it exists, or may be a hub
    id). Local-looking: starts with ./, ../, / or ~, has more than one separator (a hub id
    has at most one), or its first part is an existing folder."""
    path = Path(name).expanduser()
    if not name or path.exists():
        return None
    parts = name.replace("\\", "/").split("/")
    local = name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or len(parts) > 2 or \
        (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())
    if not local:
        return None
    nearest = path.absolute().parent
    while not nearest.exists():
        nearest = nearest.parent
    return (f"no such file or folder (the nearest existing folder is {str(nearest)!r}); a "
            f"local path is not looked up on the hub")


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
        logger.warning("could not write %s (%s); training goes on", what,
                       str(err).splitlines()[0] if str(err) else type(err).__name__)


@contextlib.contextmanager
def remove_on_failure(*paths: Path):
    """On an error, removes whichever of ``paths`` exist (a half-written or 0-byte image
    would look like a result), then re-raises."""
    try:
        yield
    except BaseException:
        for path in paths:
            Path(path).unlink(missing_ok=True)
        raise


def one_line(err: BaseException) -> str:
    """The message main() prints for an error: the exception's own line, no traceback."""
    if isinstance(err, TrainingError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
