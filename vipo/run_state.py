"""The run state: what a checkpoint must hold, besides weights and optimiser, for a resumed
run to continue exactly. It is the schema of a checkpoint's ``state.json`` (counters and
data order) and ``rng_<process>.pt`` (every random stream of one process)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .distributed import PromptSampler

COUNTERS = ("iteration", "optimizer_steps", "bad_steps", "dropped_iters")


@dataclass
class RunState:
    sampler: PromptSampler
    rng: random.Random            # the trainer's own stream (batch order, trained steps)
    iteration: int = 0            # iterations completed
    optimizer_steps: int = 0      # optimiser steps taken (skipped ones not counted)
    bad_steps: int = 0            # non-finite steps skipped in a row
    dropped_iters: int = 0        # iterations in a row whose every group was dropped
    extra: dict = field(default_factory=dict)  # scheduler, EMA counters, metric: set on save

    def state_dict(self) -> dict:
        """The JSON part (state.json)."""
        return {**{k: getattr(self, k) for k in COUNTERS},
                "sampler": self.sampler.state_dict(), **self.extra}

    def load_state_dict(self, state: dict) -> None:
        for key in COUNTERS:
            setattr(self, key, int(state[key]))
        self.sampler.load_state_dict(state["sampler"])
        self.extra = {k: v for k, v in state.items() if k not in COUNTERS + ("sampler",)}

    def rng_state(self) -> dict:
        """Every RNG state of this process, as tensors and plain numbers (weights_only-loadable)."""
        kind, key, pos, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached],
                "python": random.getstate(), "trainer": self.rng.getstate()}

    def load_rng_state(self, states: dict) -> None:
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        kind, key, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(_tuples(states["python"]))
        self.rng.setstate(_tuples(states["trainer"]))

    def snapshot(self) -> "Snapshot":
        """The state as it is now, to be written later (a crash checkpoint of the start of
        an iteration, or a stop's save that must not wait for the iteration to end)."""
        return Snapshot(self.state_dict(), self.rng_state())


@dataclass(frozen=True)
class Snapshot:
    state: dict
    rng: dict

    def with_counters(self, **counters) -> "Snapshot":
        return Snapshot({**copy.deepcopy(self.state), **counters}, self.rng)


def _tuples(x):
    """random.setstate needs tuples; a weights_only load may hand back lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
