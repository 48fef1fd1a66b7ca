"""Several processes (accelerate launch, gloo on the CPU) against one process with the same
global batch; the prompt sampler and cross-process advantages on their own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vipo.advantages import group_advantages
from vipo.distributed import PromptSampler
from vipo.logging_utils import read_metrics

from .run_helpers import ROOT, TRAIN, WEIGHTS, check_call, launch, normwise, run_args


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tiny_world, tmp_path, fsdp):
    """2 processes x 1 prompt (gloo, launched as a user would; DDP, or FSDP2 sharding) end 2
    optimiser steps with the parameters of 1 process x 2 prompts, within fp32 rounding; the
    sharded run's checkpoint loads with plain from_pretrained."""
    # Every trainable step is trained (run_args), so a micro-batch's make-up does not change
    # the summed gradient; grad_accum counts one process's samples.
    check_call(launch() + run_args(tiny_world, tmp_path, "two", prompts_per_iter=1,
                                   grad_accum=2, fsdp=str(fsdp).lower()), tmp_path)
    check_call(TRAIN + run_args(tiny_world, tmp_path, "one", prompts_per_iter=2, grad_accum=4),
               tmp_path)
    from safetensors.torch import load_file

    two, one = load_file(tmp_path / "two" / WEIGHTS), load_file(tmp_path / "one" / WEIGHTS)
    start = load_file(Path(tiny_world["sd3"]) / "transformer" /
                      "diffusion_pytorch_model.safetensors")
    assert two.keys() == one.keys()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    # Normwise: the two layouts sum the same gradients in another order (all-reduce or
    # reduce-scatter over processes against accumulation in one), so in fp32 the weights
    # differ by rounding of relative size ~ n * 2^-24 for reductions of n terms (n ~ 1e3
    # here), normwise. An elementwise tolerance is no bound at all: Adam maps a gradient
    # near adam_eps to an update anywhere in [-lr, lr], so single elements differ by what
    # one CPU's rounding gives (1.2e-5 on an AMD EPYC, 4e-7 on an Intel Xeon).
    ratio = normwise(two, one) / normwise(one, start)
    print(f"largest weight change {moved:.3e}; 2-process difference: largest {worst:.3e}, "
          f"normwise {ratio:.3e} of the change")
    assert moved > 1e-4  # the two steps did move the weights
    assert ratio <= 1e-3
    rows_two, rows_one = (read_metrics(tmp_path / n / "metrics.csv") for n in ("two", "one"))
    assert len(rows_two) == len(rows_one) == 2  # only the main process wrote metrics
    assert [r["optimizer_steps"] for r in rows_two] == [1, 2] == \
        [r["optimizer_steps"] for r in rows_one]
    # The same samples: iteration 0 runs identical weights on the same noise, so its rewards
    # agree to fp32 rounding (each is a mean over 32 x 32 pixels, whose vectorised sum may
    # run in another order for another batch shape: relative error <= 1024 x 2^-24 ~ 6e-5);
    # the training statistics are reduced over both processes.
    assert rows_two[0]["reward_mean"] == pytest.approx(rows_one[0]["reward_mean"], rel=6e-5)
    # Iteration 1 runs weights that differ by that rounding. The loss, a mean of A x ratio
    # with advantages of mean 0 and size ~1, cancels: compared on that natural scale.
    for key in ("reward_std", "ratio_max"):
        assert rows_two[1][key] == pytest.approx(rows_one[1][key], rel=1e-4, abs=1e-7), key
    for key in ("loss", "approx_kl"):
        assert rows_two[1][key] == pytest.approx(rows_one[1][key], rel=0, abs=1e-5), key
    final = tmp_path / "two" / "checkpoints" / "final"
    assert sorted(p.name for p in final.glob("rng_*")) == ["rng_0.pt", "rng_1.pt"]
    from diffusers import SD3Transformer2DModel

    loaded = SD3Transformer2DModel.from_pretrained(final / "transformer").state_dict()
    assert loaded.keys() == two.keys()
    assert all(torch.equal(loaded[k], two[k]) for k in two)


def test_prompt_shards_cover_the_stream_without_repeats_and_resume():
    one = PromptSampler(10, seed=3, per_process=4, num_processes=1, rank=0)
    shards = [PromptSampler(10, seed=3, per_process=2, num_processes=2, rank=r) for r in (0, 1)]
    for _ in range(5):  # crosses epoch boundaries
        whole, groups = one.next()
        parts = [s.next() for s in shards]
        assert parts[0][0] + parts[1][0] == whole  # rank 0 then rank 1: the same prompts
        assert parts[0][1] + parts[1][1] == groups == [0, 1, 2, 3]
    epoch = PromptSampler(10, seed=3, per_process=5, num_processes=2, rank=0)
    other = PromptSampler(10, seed=3, per_process=5, num_processes=2, rank=1)
    assert sorted(epoch.next()[0] + other.next()[0]) == list(range(10))  # one epoch, no repeat
    resumed = PromptSampler(10, seed=3, per_process=4, num_processes=1, rank=0)
    resumed.load_state_dict(one.state_dict())
    assert [resumed.next() for _ in range(3)] == [one.next() for _ in range(3)]


def test_a_group_spread_over_processes_gets_the_same_advantages():
    """global_advantages normalises the rows gathered from every process by group id, so
    the result must not depend on where a group's rows sit: here group 7 is split between
    the rows of two processes."""
    rewards = torch.tensor([[1.0], [4.0], [2.0], [8.0], [3.0], [0.5]])
    groups = torch.tensor([7, 7, 7, 9, 9, 9])
    together = group_advantages(rewards, groups, [1.0]).values
    order = torch.tensor([0, 3, 4, 1, 2, 5])  # process 0: rows 0, 3, 4; process 1: 1, 2, 5
    spread = group_advantages(rewards[order], groups[order], [1.0]).values
    assert torch.equal(spread, together[order])


@pytest.mark.parametrize("name, processes, machines", [
    ("ddp_8gpu", 8, 1), ("fsdp_flux_8gpu", 8, 1), ("fsdp_flux_2x8gpu", 16, 2)])
def test_accelerate_config_files(name, processes, machines):
    """The README's accelerate configs parse with accelerate's own loader and launch plain
    multi-GPU processes: sharding is the trainer's (train.fsdp), which refuses accelerate's
    distributed_type FSDP."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.name, config.num_processes, config.num_machines) == \
        ("MULTI_GPU", processes, machines)


SKIP_ON_ONE = """
import dataclasses, os, sys
import vipo.trainer as trainer
from vipo.train import main

rank, real = int(os.environ["RANK"]), trainer.Trainer._train_step

def nan_on_rank_1(self, roll, *args):
    if rank == 1 and self.state.iteration == 0:  # a NaN loss in iteration 0, here only
        roll = dataclasses.replace(roll, latents=roll.latents * float("nan"))
    return real(self, roll, *args)

trainer.Trainer._train_step = nan_on_rank_1
sys.exit(main(sys.argv[2:]))
"""


def test_processes_skip_a_step_together(tiny_world, tmp_path):
    """A non-finite loss on one process only: the guard is reduced over processes, so both
    skip that optimiser step and stay in step (same count, same weights)."""
    script = tmp_path / "skip.py"
    script.write_text(SKIP_ON_ONE)
    check_call(launch(2, [str(script)]) +
               run_args(tiny_world, tmp_path, "skip", prompts_per_iter=1, grad_accum=2,
                        kernel_backend="torch", max_bad_steps=3), tmp_path)
    rows = read_metrics(tmp_path / "skip" / "metrics.csv")
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    assert [r["optimizer_steps"] for r in rows] == [0, 1]
