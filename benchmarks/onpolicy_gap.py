"""The on-policy gap of the rollout's stored log-probs, measured on the shipped toy world:
``python -m benchmarks.onpolicy_gap [--dtype fp32 bf16] [--sample-batch 16] [--train-batch 2]``.

The rollout computes each velocity in batches of ``sample_batch_size`` at one timestep; the
first optimiser step recomputes it in micro-batches of ``train_batch_size`` with mixed
timesteps. Where the matmuls round differently for another batch layout, the first step's
per-position ratios are not 1. Printed: the largest |log ratio| at the position and the
sample level over every trained micro-batch, against the presets' clip range 1e-4, and the
time of the no-grad forwards that ``train.old_log_probs=recompute`` adds."""

from __future__ import annotations

import argparse
import time

import torch

from vipo.config import Config
from vipo.distributed import reset_accelerate_state
from vipo.trainer import Trainer


def gap(dtype: str, sample_batch: int, train_batch: int, level: str) -> tuple[float, float]:
    cfg = Config.from_name("toy")
    cfg.update({"sample_batch_size": sample_batch, "group_size": sample_batch,
                "train_batch_size": train_batch, "grad_accum": sample_batch, "ratio_level": level,
                "old_log_probs": "rollout", "eval_every": -1, "cpu_threads": 2})
    trainer = Trainer(cfg.validate())
    if dtype == "bf16":  # bf16 autocast around every transformer call, as on a GPU
        trainer.accelerator.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    roll = trainer.sample(0)
    batches = trainer._micro_batches(roll.num_samples)
    stored = trainer._old_log_probs(roll, batches)
    trainer.cfg.train.old_log_probs = "recompute"
    start = time.perf_counter()
    fresh = trainer._old_log_probs(roll, batches)
    seconds = time.perf_counter() - start
    reset_accelerate_state()
    worst = max(float((a.double() - b.double()).abs().max()) for a, b in zip(stored, fresh))
    return worst, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--sample-batch", type=int, default=16, help="also the group size")
    parser.add_argument("--train-batch", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print("| weights | ratio level | max abs log ratio, first step | / clip range 1e-4 | "
          "recompute forwards (s) |\n|---|---|---|---|---|")
    for dtype in args.dtype:
        for level in ("position", "sample"):
            worst, seconds = gap(dtype, args.sample_batch, args.train_batch, level)
            print(f"| {dtype} | {level} | {worst:.3e} | {worst / 1e-4:.2f} | {seconds:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
