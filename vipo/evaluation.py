"""The evaluation phase: the same prompts from the same initial noise, every time.

Before the first iteration, every ``eval_every`` iterations and after the last, the trainer
samples ``eval_samples`` fixed prompts (``eval_prompts``; the toy world's held-out prompts by
default there) from noise drawn once with ``eval_seed``, with the deterministic Euler ODE on
the training schedule (the SDE's noise would blur before/after comparisons). It scores them
with every training reward plus the eval-only ``eval_rewards`` (a reward factory's
``fn.details`` adds sub-metrics), appends a row to ``eval.csv`` and TensorBoard (``eval/``),
and saves the grid ``eval/iter<k>.png``; at the end ``eval/before_after.png`` stacks the first
and the last grid and ``eval_curves.png`` plots the metrics.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .faults import warn_on_failure
from .logging_utils import MetricsLogger, first_frames, save_grid, save_labelled_grids
from .prompts import load_prompts, spread
from .rewards import build_reward, reward_tag, score_media


def eval_prompt_list(eval_cfg) -> list:
    return spread(load_prompts(eval_cfg.eval_prompts, "eval.eval_prompts"),
                  eval_cfg.eval_samples)


@torch.no_grad()
def sample_ode(adapter, model, schedule, noise, cond, batch_size: int,
               autocast=contextlib.nullcontext) -> torch.Tensor:
    """Euler ODE from ``noise`` along ``schedule.sigmas``: z <- z + (sigma' - sigma) v; the
    final z (sigma = 0) is decoded. Deterministic given the weights."""
    media = []
    for start in range(0, noise.shape[0], batch_size):
        z = noise[start:start + batch_size]
        chunk = adapter.select(cond, slice(start, start + batch_size))
        for k in range(len(schedule.timesteps)):
            index = torch.full((z.shape[0],), k, device=z.device, dtype=torch.long)
            with autocast():
                v = adapter.velocity(model, z, schedule.timesteps[index], chunk)
            z = z + (schedule.sigmas[k + 1] - schedule.sigmas[k]) * v
        media.append(adapter.decode(z))
    return torch.cat(media)


class EvalPhase:
    def __init__(self, cfg, adapter, schedule, train_rewards: list, run_dir, *, device,
                 is_main: bool, start: int = 0):
        """start: the iteration a resumed run continues from (later eval rows are dropped)."""
        self.cfg, self.adapter, self.schedule = cfg, adapter, schedule
        self.prompts = eval_prompt_list(cfg.eval)
        gen = torch.Generator().manual_seed(cfg.eval.eval_seed)  # CPU: same noise anywhere
        self.noise = torch.randn((len(self.prompts), *adapter.latent_shape()),
                                 generator=gen).to(device)
        self.cond = adapter.encode_prompts(self.prompts)
        extra = [n for n in cfg.eval.eval_rewards if n not in cfg.reward.reward]
        self.rewards = list(zip(cfg.reward.reward, train_rewards)) + \
            [(name, build_reward(name, cfg.reward, device)) for name in extra]
        self.folder = run_dir / "eval"
        self.is_main = is_main
        self.metrics = MetricsLogger(run_dir, cfg.run.tensorboard, filename="eval.csv",
                                     tensorboard_dir="tensorboard/eval", start=start) \
            if is_main else None
        self.rows: list[dict] = list(self.metrics.rows) if self.metrics else []
        self.grids: list = []

    def __call__(self, model, iteration: int, autocast=contextlib.nullcontext) -> dict:
        media = sample_ode(self.adapter, model, self.schedule, self.noise, self.cond,
                           self.cfg.sample.sample_batch_size, autocast)
        row = self.score(media)
        self.rows.append({"iteration": iteration, **row})
        if self.is_main:
            self.metrics.log(iteration, row)
            frames = first_frames(media)
            self.grids.append(frames.cpu())
            path = self.folder / f"iter{iteration:06d}.png"
            with warn_on_failure(str(path)):
                save_grid(frames, path, nrow=self._per_row())
        return row

    def score(self, media: torch.Tensor) -> dict:
        """Mean of every reward (and of its ``details``) over the evaluation samples."""
        row = {}
        for name, fn in self.rewards:
            row[f"eval_{reward_tag(name)}"] = float(score_media(fn, media, self.prompts, self.cfg.reward,
                                                   name).mean())
            if hasattr(fn, "details"):
                for key, values in fn.details(first_frames(media), self.prompts).items():
                    row[f"eval_{key}"] = float(values.float().mean())
        return row

    def _per_row(self) -> int:
        return max(1, math.ceil(math.sqrt(len(self.prompts) * 2)))

    def close(self) -> None:
        """before_after.png (first grid above the last) and eval_curves.png."""
        if not self.is_main:
            return
        self.metrics.close()
        if len(self.grids) >= 2:
            first, last = self.rows[0]["iteration"], self.rows[-1]["iteration"]
            path = self.folder / "before_after.png"
            with warn_on_failure(str(path)):
                save_labelled_grids([(f"before (iteration {first})", self.grids[0]),
                                     (f"after (iteration {last})", self.grids[-1])],
                                    path, nrow=self._per_row())
        from .plots import plot_curves

        if self.rows:
            keys = [k for k in self.rows[0] if k != "iteration"]
            with warn_on_failure("eval_curves.png"):
                plot_curves(self.metrics.path, self.folder.parent / "eval_curves.png", keys)

    def summary(self) -> str:
        """First -> last value of each eval metric, for the closing line."""
        if len(self.rows) < 2:
            return ""
        first, last = self.rows[0], self.rows[-1]
        return "; eval " + ", ".join(f"{k[5:]} {first[k]:.3f} -> {last[k]:.3f}"
                                     for k in first if k != "iteration")
