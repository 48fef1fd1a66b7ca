"""A bounded number of host synchronisations per training iteration.

On CUDA every conversion of a device tensor to a Python value (``item``, ``float``,
``bool``, ``int``, ``tolist``) waits for the device. Here, on the CPU, the trainer's own
conversions are counted by the file that makes them: per iteration the trainer makes one
for the divergence check, one per optimiser step for the non-finite guard, and two in the
log phase (the device statistics, the gathered rewards), however many micro-steps there
are. On a GPU, tests/test_kernels_cuda.py checks the kernels under CUDA's sync debug
mode."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from vipo.config import Config

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

WATCHED = {str(Path(__file__).resolve().parents[1] / "vipo" / name)
           for name in ("trainer.py", "run_loop.py", "distributed.py")}
CONVERSIONS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")
# Conversions of tensors that live on the CPU whatever the device: the prompt order (a CPU
# generator's permutation).
HOST_ONLY = {"_order"}


@pytest.fixture
def conversions(monkeypatch):
    """Counter of tensor-to-Python conversions made by the watched files, by file:line."""
    seen = Counter()
    for name in CONVERSIONS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename in WATCHED and caller.co_name not in HOST_ONLY:
                seen[f"{Path(caller.co_filename).name}:{sys._getframe(1).f_lineno}"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


@pytest.mark.parametrize("algorithm", ["vipo", "grpo"])
def test_conversions_per_iteration_are_bounded(tiny_world, tmp_path, conversions, algorithm):
    from vipo.trainer import Trainer

    cfg = Config.from_name("tiny")
    cfg.update({"path": str(tiny_world["sd3"]), "backbone": str(tiny_world["dinov2"]),
                "height": 32, "width": 32, "max_sequence_length": 16, "num_steps": 4,
                "group_size": 2, "prompts_per_iter": 2, "sample_batch_size": 4,
                "train_batch_size": 1, "grad_accum": 2, "timestep_fraction": 1.0,
                "algorithm": algorithm, "output_dir": str(tmp_path)})
    trainer = Trainer(cfg.validate())
    micro_steps = 4 * 3  # 4 samples x 3 trained steps, one sample per micro-step
    for it in range(2):
        conversions.clear()
        before = trainer.state.optimizer_steps
        trainer.iteration(it)
        steps = trainer.state.optimizer_steps - before
        assert steps == micro_steps // (2 * 3)  # grad_accum 2 samples x 3 steps
        print(it, dict(conversions))
        assert sum(conversions.values()) == 1 + steps + 2, dict(conversions)
