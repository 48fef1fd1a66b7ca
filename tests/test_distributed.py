"""Several processes (accelerate launch, gloo on the CPU) against one process with the same
global batch; the prompt sampler and cross-process advantages on their own."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vipo.advantages import group_advantages
from vipo.distributed import PromptSampler
from vipo.logging_utils import read_metrics

from .run_helpers import ROOT, TRAIN, WEIGHTS, env, run_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_with_the_same_global_batch(tiny_world, tmp_path):
    """2 processes x 1 prompt (gloo, launched as a user would) end 2 optimiser steps with
    the parameters of 1 process x 2 prompts, within fp32 rounding."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "vipo.train"]
    # Every trainable step is trained (run_args), so a micro-batch's make-up does not change
    # the summed gradient; grad_accum counts one process's samples.
    for name, command in (
            ("ddp", launch + run_args(tiny_world, tmp_path, "ddp", prompts_per_iter=1,
                                      grad_accum=2)),
            ("one", TRAIN + run_args(tiny_world, tmp_path, "one", prompts_per_iter=2,
                                     grad_accum=4))):
        proc = subprocess.run(command, cwd=tmp_path, env=env(tmp_path), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    from safetensors.torch import load_file

    ddp, one = load_file(tmp_path / "ddp" / WEIGHTS), load_file(tmp_path / "one" / WEIGHTS)
    start = load_file(Path(tiny_world["sd3"]) / "transformer" /
                      "diffusion_pytorch_model.safetensors")
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    worst = max(float((ddp[k] - one[k]).abs().max()) for k in one)
    # Normwise: the two layouts sum the same gradients in another order (all-reduce over
    # processes against accumulation in one), so in fp32 the weights may differ by rounding
    # of relative size ~ n * 2^-24 for reductions of n terms (n ~ 1e3 here), normwise. An
    # elementwise tolerance is no bound at all: Adam maps a gradient near adam_eps to an
    # update anywhere in [-lr, lr], so single elements differ by what one CPU's rounding
    # happens to give (1.2e-5 on an AMD EPYC, 4e-7 on an Intel Xeon).
    diff = sum(float((ddp[k] - one[k]).double().pow(2).sum()) for k in one) ** 0.5
    change = sum(float((one[k] - start[k]).double().pow(2).sum()) for k in one) ** 0.5
    print(f"largest weight change {moved:.3e}; 2-process difference: largest {worst:.3e}, "
          f"normwise {diff / change:.3e} of the change")
    assert moved > 1e-4  # the two steps did move the weights
    assert diff <= 1e-3 * change
    rows_ddp, rows_one = (read_metrics(tmp_path / n / "metrics.csv") for n in ("ddp", "one"))
    assert len(rows_ddp) == len(rows_one) == 2  # only the main process wrote metrics
    assert [r["optimizer_steps"] for r in rows_ddp] == [1, 2] == \
        [r["optimizer_steps"] for r in rows_one]
    # The same samples: iteration 0 runs identical weights, so its rewards are identical;
    # the training statistics are reduced over both processes.
    assert rows_ddp[0]["reward_mean"] == rows_one[0]["reward_mean"]
    for key in ("reward_std", "loss", "approx_kl", "ratio_max"):
        assert rows_ddp[1][key] == pytest.approx(rows_one[1][key], rel=1e-4, abs=1e-7), key
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / "final").glob("rng_*")) \
        == ["rng_0.pt", "rng_1.pt"]


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


@pytest.mark.parametrize("name, kind, processes, machines", [
    ("ddp_8gpu", "MULTI_GPU", 8, 1), ("fsdp_flux_8gpu", "FSDP", 8, 1),
    ("fsdp_flux_2x8gpu", "FSDP", 16, 2)])
def test_accelerate_config_files(name, kind, processes, machines):
    """The README's accelerate configs parse with accelerate's own loader, and the FSDP ones
    wrap block classes that exist in diffusers. (Not launched: this machine has no GPU, and
    accelerate turns FSDP into DDP on the CPU.)"""
    import diffusers.models.transformers.transformer_flux as flux
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert (config.distributed_type.name, config.num_processes, config.num_machines) == \
        (kind, processes, machines)
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        for cls in config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert isinstance(getattr(flux, cls), type), cls
