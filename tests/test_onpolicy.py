"""The first optimiser step's ratios start at 1 whatever the batch layout: a stand-in
model whose output depends on how its batch is composed (as bf16 matmuls on a GPU are not
batch-invariant) breaks the rollout's stored log-probs, not the recomputed ones; the
trainer's first-iteration check stops or warns naming the fix."""

from __future__ import annotations

import pytest
import torch

from vipo.config import Config
from vipo.errors import TrainingError

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

EPS = 1e-4  # the flux_vipo / wan_vipo presets' clip range


def make_trainer(tiny_world, tmp_path, **overrides):
    from vipo.trainer import Trainer

    cfg = Config.from_name("tiny")
    cfg.update({"path": str(tiny_world["sd3"]), "backbone": str(tiny_world["dinov2"]),
                "height": 32, "width": 32, "max_sequence_length": 16, "num_steps": 3,
                "group_size": 4, "prompts_per_iter": 1, "sample_batch_size": 4,
                "train_batch_size": 2, "grad_accum": 4, "timestep_fraction": 1.0,
                "clip_range": EPS, "kernel_backend": "torch", "output_dir": str(tmp_path),
                **overrides})
    trainer = Trainer(cfg.validate())
    # The stand-in: the transformer's output moves by 1e-3 of its batch mean, so the same
    # sample gets another velocity in a batch of 4 (rollout) than in one of 2 (training).
    trainer.adapter.transformer.register_forward_hook(
        lambda module, args, out: (out[0] + 1e-3 * out[0].mean(0, keepdim=True),))
    return trainer


def first_step_gap(trainer) -> float:
    roll = trainer.sample(0)
    adv, _, maps, _ = trainer.advantages(roll, trainer.score(roll))
    return float(trainer.optimize(roll, adv, maps)["onpolicy_max_abs_log_ratio"])


def test_recomputed_old_log_probs_start_every_ratio_at_one(tiny_world, tmp_path):
    from vipo.distributed import reset_accelerate_state

    stored = first_step_gap(make_trainer(tiny_world, tmp_path, old_log_probs="rollout"))
    reset_accelerate_state()
    recomputed = first_step_gap(make_trainer(tiny_world, tmp_path, old_log_probs="recompute"))
    print(f"first-step max |log ratio|: stored {stored:.3e}, recomputed {recomputed:.3e}")
    assert stored > EPS / 10  # the stand-in does break the stored log-probs
    # The same forward on the same micro-batch with the same weights: identical, so 0.
    assert recomputed <= EPS / 10 and recomputed == 0.0


@pytest.mark.parametrize("check", ["stop", "warn"])
def test_first_iteration_check_names_the_fix(tiny_world, tmp_path, check, caplog):
    trainer = make_trainer(tiny_world, tmp_path, old_log_probs="rollout", onpolicy_check=check)
    if check == "stop":
        with pytest.raises(TrainingError, match="train.old_log_probs=recompute"):
            trainer.iteration(0)
        return
    trainer.iteration(0)
    assert any("train.old_log_probs=recompute" in r.getMessage() for r in caplog.records)
