"""The project's error classes, in one module that imports nothing of the project, so
every layer (config, rewards, checkpoints, the trainer) can raise them without import loops.

Each carries a message that ``vipo.train`` prints as one line."""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class TrainingError(RuntimeError):
    """A failure reported in one line; ``save``: the state may still be checkpointed;
    ``everywhere``: raised by every process alike (it comes from gathered data), so all of
    them can take part in the crash checkpoint's collectives."""

    def __init__(self, message: str, *, save: bool = True, everywhere: bool = False):
        super().__init__(message)
        self.save, self.everywhere = save, everywhere


class LoadError(TrainingError):
    """A model, file or hub id that cannot be loaded (raised before training starts)."""

    def __init__(self, message: str):
        super().__init__(message, save=False)


class RunStopped(Exception):
    """Raised by the run loop after a stop signal, once the checkpoint is written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
