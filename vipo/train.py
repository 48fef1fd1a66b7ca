"""``python -m vipo.train [PRESET | CONFIG.yaml] [key=value ...]``: GRPO / ViPO training.

One iteration (METHOD.md 7), one method per phase:
  sample      G SDE rollouts per prompt with the current policy (no grad)
  score       rewards of the decoded outputs
  advantages  group-normalised advantages, then PSM allocation maps (ViPO)
  optimize    recompute the velocity on a random subset of steps; fused vipo_loss; AdamW
  log         metrics CSV + TensorBoard, sample grids, map overlays
  evaluate    fixed held-out prompts from fixed noise (vipo/evaluation.py), before the first
              iteration, every eval_every and after the last
  checkpoint  weights, optimizer, RNG and data order, atomically (vipo.checkpointing)
``setup`` builds everything through ``accelerate.Accelerator`` (DDP/FSDP on GPUs via
``accelerate launch``; ``cpu=True`` without CUDA; what differs across processes lives in
vipo.distributed). ``run`` turns SIGTERM/SIGINT and errors into a resumable checkpoint and
a one-line message (vipo.faults); ``resume=`` continues a run exactly. With no arguments
the ``toy`` preset trains the shipped pretrained toy-world generator (vipo/toy) with ViPO
on the CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import faults
from .config import DEFAULT_PRESET, Config, ConfigError, help_text
from .distributed import PromptSampler, global_advantages, group_generator, reduce_stats
from .faults import TrainingError
from .logging_utils import MetricsLogger, PhaseTimer, first_frames, save_grid, summary_line
from .plots import plot_curves
from .prompts import load_prompts
from .rewards import reward_tag

logger = logging.getLogger("vipo")



class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()
        self.run_dir = None
        try:
            self.setup()
        except BaseException:
            self._remove_unused_run_dir()
            raise

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg, t = self.cfg, self.cfg.train
        cuda = torch.cuda.is_available()
        precision = cfg.model.precision if cfg.model.precision != "auto" else \
            ("bf16" if cuda else "fp32")
        if precision == "bf16" and not cuda:
            raise ConfigError("model.precision=bf16 needs a CUDA device (bf16 on this CPU is "
                              "~25x slower than fp32); use precision=auto or fp32")
        accum = (t.grad_accum // t.train_batch_size) * cfg.train_steps_per_sample
        self.accelerator = acc = Accelerator(cpu=not cuda, gradient_accumulation_steps=accum,
                                             mixed_precision="bf16" if precision == "bf16"
                                             else "no")
        if not cuda and cfg.run.cpu_threads > 0:
            torch.set_num_threads(cfg.run.cpu_threads)
        set_seed(t.seed + acc.process_index)
        self.rng = random.Random(t.seed + acc.process_index)
        self.run_dir, resume_from = self._run_dir()
        self.prompts = load_prompts(cfg.sample.prompts)
        self.sampler = PromptSampler(len(self.prompts), t.seed, cfg.sample.prompts_per_iter,
                                     acc.num_processes, acc.process_index)
        # Rewards and the PSM backbone load first: a bad name fails before the big model.
        self.rewards = self._load_rewards()
        self.psm = self._load_psm() if t.algorithm == "vipo" else None
        weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.adapter = self._load_adapter(weight_dtype)
        params = self._trainable_parameters()
        self.ref_model = self._reference_model()
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_eps)
        warmup = t.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.model, self.optimizer = acc.prepare(self.adapter.transformer, optimizer)
        # FSDP replaces the parameters with sharded ones; clipping and EMA need those.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = self._ema(self.params)
        from .rollout import Schedule

        self.schedule = Schedule.build(cfg.sample, acc.device)
        self.timer = PhaseTimer(acc.device)
        self.optimizer_steps = self.bad_steps = self.dropped_iters = self.start_iteration = 0
        self.skipped_steps, self._stepped, self._bad_loss = 0, False, False
        self.last_checkpoint, self._saving, self._snapshot, self._done = None, False, None, None
        if resume_from is not None:
            self._resume(resume_from)
            self._write_config(self.run_dir)
        self.metrics = MetricsLogger(self.run_dir, cfg.run.tensorboard,
                                     start=self.start_iteration) if acc.is_main_process else None
        self.history: list[dict] = [{k: v for k, v in r.items() if k != "iteration"}
                                    for r in (self.metrics.rows if self.metrics else [])]
        self._resumed_rows = len(self.history)
        self.eval = self._eval_phase()

    def _eval_phase(self):
        if self.cfg.eval.eval_every < 0:
            return None
        from .evaluation import EvalPhase

        return EvalPhase(self.cfg, self.adapter, self.schedule, self.rewards, self.run_dir,
                         device=self.accelerator.device,
                         is_main=self.accelerator.is_main_process, start=self.start_iteration)

    def _run_dir(self) -> tuple[Path, Path | None]:
        """(run folder, checkpoint to resume): a new folder, or the resumed run's."""
        from accelerate.utils import broadcast_object_list

        from .run_dir import create_run_dir, find_resume

        run, acc = self.cfg.run, self.accelerator
        found = [None, None]
        if acc.is_main_process:  # only the main process touches the file system
            if run.resume:
                found = list(find_resume(run.resume, run.output_dir, run.run_name))
            else:
                found[0] = create_run_dir(run.output_dir, run.run_name, self.cfg.preset)
                self._write_config(found[0])
        broadcast_object_list(found)  # every process writes into the main process's folder
        self._new_run_dir = not run.resume
        return Path(found[0]), found[1] and Path(found[1])

    def _write_config(self, folder: Path) -> None:
        """The resolved config.yaml (a resumed run's only once its checkpoint has loaded)."""
        if self.accelerator.is_main_process:
            saved = copy.deepcopy(self.cfg)
            saved.run.resume = ""
            (folder / "config.yaml").write_text(saved.to_yaml())

    def _remove_unused_run_dir(self) -> None:
        """A run that failed during setup leaves no folder behind (only its config.yaml
        was written), so the name can be used again."""
        folder = self.run_dir
        if folder is None or not getattr(self, "_new_run_dir", False) or \
                not self.accelerator.is_main_process:
            return
        if [p.name for p in folder.iterdir()] == ["config.yaml"]:
            (folder / "config.yaml").unlink()
            folder.rmdir()

    def _resume(self, folder: Path) -> None:
        from .checkpointing import CheckpointError, load_checkpoint

        try:
            state = load_checkpoint(self, folder)
        except CheckpointError as err:
            raise faults.LoadError(str(err)) from None
        self.start_iteration, self.optimizer_steps = state["iteration"], state["optimizer_steps"]
        self.bad_steps, self.dropped_iters = state["bad_steps"], state["dropped_iters"]
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.last_checkpoint = folder
        logger.info("resuming %s from iteration %d", folder, self.start_iteration)

    def _load_adapter(self, weight_dtype):
        from .adapters import get_adapter

        model_cfg = copy.copy(self.cfg.model)
        if model_cfg.path == "toy":
            from .toy.models import asset

            model_cfg.path = str(asset("generator"))
        elif model_cfg.path == "tiny":
            from . import tiny

            with self.accelerator.main_process_first():
                model_cfg.path = str(tiny.ensure_world(model_cfg.arch))
        with faults.loading(f"the {model_cfg.arch} pipeline (model.path)", model_cfg.path):
            return get_adapter(model_cfg.arch)(model_cfg, self.accelerator.device, weight_dtype)

    def _trainable_parameters(self) -> list:
        t, transformer = self.cfg.train, self.adapter.transformer
        if t.lora_rank > 0:
            from diffusers.training_utils import cast_training_params
            from peft import LoraConfig

            transformer.add_adapter(LoraConfig(
                r=t.lora_rank, lora_alpha=t.lora_alpha or 2 * t.lora_rank, lora_dropout=0.0,
                init_lora_weights="gaussian",
                target_modules=t.lora_targets or self.adapter.default_lora_targets))
            cast_training_params(transformer, dtype=torch.float32)  # fp32 LoRA weights
        else:
            if transformer.dtype != torch.float32:
                transformer.to(torch.float32)  # fp32 master weights
            transformer.requires_grad_(True)
        if self.cfg.model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        # eval() throughout: no dropout, and rollout and recompute see the same module state.
        transformer.eval()
        return [p for p in transformer.parameters() if p.requires_grad]

    def _reference_model(self):
        """Frozen initial model for the KL term: LoRA reuses the base weights (adapters
        disabled); full fine-tuning keeps a copy."""
        if self.cfg.train.kl_coef == 0 or self.cfg.train.lora_rank > 0:
            return None
        return copy.deepcopy(self.adapter.transformer).requires_grad_(False).eval()

    def _ema(self, params):
        if self.cfg.train.ema_decay == 0:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(params, decay=self.cfg.train.ema_decay, use_ema_warmup=False)

    def _load_rewards(self) -> list:
        from .rewards import build_reward

        rewards = []
        for name in self.cfg.reward.reward:
            with faults.loading("the reward", name):
                rewards.append(build_reward(name, self.cfg.reward, self.accelerator.device))
        return rewards

    def _load_psm(self):
        """The map source of psm.map_source (vipo.psm.sources)."""
        from .psm.sources import load_map_source

        path = self.cfg.psm.backbone
        if path == "toy":
            from .toy.models import asset

            path = str(asset("backbone"))
        elif path == "tiny":
            from . import tiny

            with self.accelerator.main_process_first():
                path = str(tiny.ensure_backbone())
        # The source's maps are min-max: the trainer keeps them for logging and applies
        # map_norm itself, in ``advantages``.
        with faults.loading("the PSM backbone (psm.backbone)", path):
            return load_map_source(self.cfg.psm, path, self.accelerator.device, self.prompts)

    # ------------------------------------------------------------------ sample
    def sample(self, it: int = 0):
        """This process's shard of the iteration's prompts; each group draws its noise from
        its own generator (vipo.distributed), so the samples do not depend on the layout."""
        from .rollout import Rollout, rollout

        s, device = self.cfg.sample, self.accelerator.device
        indices, groups = self.sampler.next()
        with self.timer("sampling"):
            parts = [rollout(self.adapter, self.model, self.schedule, [self.prompts[i]],
                             group_size=s.group_size, same_init_noise=s.same_init_noise,
                             batch_size=s.sample_batch_size,
                             ratio_level=self.cfg.train.ratio_level, decode_from=s.decode_from,
                             generator=group_generator(self.cfg.train.seed, it, g, device),
                             autocast=self.accelerator.autocast,
                             backend=self.cfg.train.kernel_backend)
                     for i, g in zip(indices, groups)]
        roll = Rollout.cat(parts, groups)
        if not bool(torch.isfinite(roll.latents).all()):
            raise TrainingError(
                f"iteration {it}: the policy produced non-finite latents, so the model has "
                f"diverged; lower train.lr (now {self.cfg.train.lr:g}) or check the rewards. "
                f"Its weights are not saved; {self._last_good()}", save=False)
        return roll

    # ------------------------------------------------------------------ score
    def score(self, roll) -> torch.Tensor:
        """(N, K) float32 rewards, one column per configured reward."""
        from .rewards import score_media

        columns = []
        with self.timer("reward"):
            for fn, name in zip(self.rewards, self.cfg.reward.reward):
                try:
                    columns.append(score_media(fn, roll.media, roll.prompts, self.cfg.reward,
                                               name))
                except Exception as err:
                    if faults.is_oom(err):
                        raise
                    raise TrainingError(f"reward {name!r} raised {faults.one_line(err)}") \
                        from err
        return torch.stack(columns, dim=1)

    # ------------------------------------------------------------------ advantages
    def advantages(self, roll, rewards):
        """Group advantages (METHOD.md 5), then the allocation maps of kept samples (6)."""
        try:
            adv = global_advantages(self.accelerator, rewards, roll.groups.cpu(),
                                    self.cfg.reward_weights, self.cfg.reward, roll.prompts)
        except ValueError as err:  # a non-finite reward, named with its sample and prompt
            raise TrainingError(str(err), everywhere=True) from err
        self._count_dropped(adv)
        maps, raw = None, None
        if self.psm is not None:
            from .psm.maps import normalize_maps

            with self.timer("psm"), torch.no_grad():
                raw = self.allocation_maps(roll.media, roll.prompts)  # min-max, for the logs
                # map_norm (METHOD.md 6) in its one place; the loss takes any map >= 0.
                maps = normalize_maps(raw, tuple(range(1, raw.dim())), self.cfg.psm.map_norm,
                                      self.cfg.psm.map_floor)
        return adv, maps, raw

    def _count_dropped(self, adv) -> None:
        """Stops a run whose every group is dropped (non-finite rewards) for
        reward.max_dropped_iters iterations in a row: it would learn nothing."""
        if adv.total_groups == 0 or adv.dropped_groups < adv.total_groups:
            self.dropped_iters = 0
            return
        self.dropped_iters += 1
        limit = self.cfg.reward.max_dropped_iters
        logger.warning("every group had a non-finite reward and was dropped (%d of %d "
                       "iterations allowed in a row)", self.dropped_iters, limit)
        if self.dropped_iters >= limit:
            raise TrainingError(f"nonfinite_reward=drop_group dropped every group for {limit} "
                                f"iterations in a row: the rewards {self.cfg.reward.reward} are "
                                f"non-finite, so nothing is learned; check the reward",
                                everywhere=True)

    def allocation_maps(self, media: torch.Tensor, prompts: list) -> torch.Tensor:
        """Maps (N, *S) of psm.map_source on the latent grid of the loss, in [0, 1]."""
        return self.psm(media, prompts, self.adapter.latent_shape()[1:])

    # ------------------------------------------------------------------ optimize
    def optimize(self, roll, adv, maps) -> dict:
        """Recompute + loss on |S_i| steps of every sample; accelerate accumulates
        grad_accum samples x |S_i| steps per optimiser step (METHOD.md 7)."""
        t, acc = self.cfg.train, self.accelerator
        # Dropped groups stay in the loop with A = 0 (no clip-loss gradient): every process
        # then runs the same number of backward passes, which DDP/FSDP need to stay in step.
        order = torch.randperm(roll.num_samples, generator=_cpu_gen(self.rng))
        steps = self._train_steps(roll.num_samples)  # (N, |S|)
        totals: dict = {}
        counts: dict = {}
        first = None
        with self.timer("training"):
            for start in range(0, len(order), t.train_batch_size):
                mb_cpu = order[start:start + t.train_batch_size]
                mb = mb_cpu.to(acc.device)
                cond = self.adapter.select(roll.cond, mb)
                for j in range(steps.shape[1]):
                    k = steps[mb_cpu, j].to(acc.device)  # (B,) step of each sample
                    with acc.accumulate(self.model):
                        stats = self._train_step(roll, mb, k, cond, adv.values[mb_cpu],
                                                 None if maps is None else maps[mb])
                    first = first or stats
                    for key, v in stats.items():
                        totals[key] = totals.get(key, 0.0) + float(v)
                        counts[key] = counts.get(key, 0) + 1
        out = {k: v / counts[k] for k, v in totals.items()}
        # Before the first optimiser step of the iteration the policy is the rollout's:
        # every ratio must be 1 up to rounding (METHOD.md 7's on-policy check).
        out["onpolicy_max_abs_log_ratio"] = max(abs(math.log(first["ratio_max"])),
                                                abs(math.log(first["ratio_min"]))) \
            if first else math.nan
        return out

    def _train_steps(self, n: int) -> torch.Tensor:
        """(N, |S|) trained step indices: a random subset of 0..T_s-2 per sample, or the
        first |S| in order (timestep_order=first)."""
        trainable, count = self.cfg.sample.num_steps - 1, self.cfg.train_steps_per_sample
        if self.cfg.train.timestep_order == "first":
            return torch.arange(count).expand(n, count)
        gen = _cpu_gen(self.rng)
        return torch.stack([torch.randperm(trainable, generator=gen)[:count] for _ in range(n)])

    def _train_step(self, roll, mb, k, cond, adv, amap) -> dict:
        from vipo_kernels import vipo_loss

        t, acc = self.cfg.train, self.accelerator
        z, z_next = roll.latents[mb, k], roll.latents[mb, k + 1]  # (B, C, *S)
        coefs = self.schedule.step(k)
        with acc.autocast():
            v = self.adapter.velocity(self.model, z, self.schedule.timesteps[k], cond)
        ref = self._reference_velocity(z, k, cond) if t.kl_coef > 0 else None
        # L = sum_k w_k L_clip(A_k) + L_KL (METHOD.md 5) in one call: (B, K) advantages, the
        # map as the PSM and map_norm made it; the loss clips A to adv_clip itself.
        loss, stats = vipo_loss(v, z, z_next, roll.log_probs[mb, k], adv.to(acc.device), amap,
                                **coefs, reward_weights=self.adv_weights, clip_range=t.clip_range,
                                adv_clip=t.adv_clip, ratio_level=t.ratio_level,
                                kl_coef=t.kl_coef, ref_model_output=ref,
                                backend=t.kernel_backend)
        acc.backward(loss)
        per_reward = stats.pop("loss_clip_per_reward")
        out = {"loss": loss.detach(), **stats}
        if len(per_reward) > 1:
            out.update({f"loss_clip_{reward_tag(name)}": value
                        for name, value in zip(self.cfg.reward.reward, per_reward)})
        self._bad_loss = self._bad_loss or not bool(torch.isfinite(loss))
        if acc.sync_gradients:
            out["grad_norm"] = self._optimizer_step()
        return out

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, then step, unless the accumulated loss or the gradient norm is non-finite:
        that step is skipped and counted, and train.max_bad_steps skips in a row stop the
        run. The norm is taken after DDP's all-reduce, so every process decides alike."""
        t = self.cfg.train
        norm = self.accelerator.clip_grad_norm_(self.params, t.max_grad_norm)
        if self._bad_loss or not bool(torch.isfinite(norm)):
            self.bad_steps += 1
            self.skipped_steps += 1
            logger.warning("non-finite loss or gradient norm (%s): optimiser step skipped "
                           "(%d in a row)", float(norm), self.bad_steps)
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.bad_steps, self._stepped = 0, True
            self.optimizer_steps += 1
            if self.ema is not None and self.optimizer_steps % t.ema_every == 0:
                self.ema.step(self.params)
        self.optimizer.zero_grad()
        self._bad_loss = False
        if self.bad_steps >= t.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} optimiser steps in a row had a non-finite loss or gradient "
                f"norm and were skipped: training has likely diverged; lower train.lr (now "
                f"{t.lr:g}) or check the rewards for extreme values; {self._last_good()}",
                save=False)
        return norm

    @torch.no_grad()
    def _reference_velocity(self, z, k, cond):
        timesteps = self.schedule.timesteps[k]
        if self.ref_model is not None:
            with self.accelerator.autocast():
                return self.adapter.velocity(self.ref_model, z, timesteps, cond)
        base = self.accelerator.unwrap_model(self.model)
        base.disable_adapters()
        try:
            with self.accelerator.autocast():
                return self.adapter.velocity(base, z, timesteps, cond)
        finally:
            base.enable_adapters()

    # ------------------------------------------------------------------ log
    def log(self, it: int, roll, rewards, adv, raw_maps, train_stats: dict) -> dict:
        acc, cfg = self.accelerator, self.cfg
        train_stats = reduce_stats(acc, train_stats)
        every = acc.gather(rewards.to(acc.device)).float().cpu()  # (N * processes, K)
        finite = every[torch.isfinite(every).all(dim=1)]
        row = {"reward_mean": finite[:, 0].mean(), "reward_std": finite[:, 0].std()}
        if len(cfg.reward.reward) > 1:
            for col, name in enumerate(cfg.reward.reward):
                row[f"reward_{reward_tag(name)}_mean"] = finite[:, col].mean()
        row.update(zero_std_groups=adv.zero_std_groups, dropped_groups=adv.dropped_groups,
                   map_mean=raw_maps.mean() if raw_maps is not None else 1.0,
                   psm_failures=self.psm.failures if self.psm is not None else 0,
                   optimizer_steps=self.optimizer_steps, skipped_steps=self.skipped_steps,
                   lr=self.optimizer.param_groups[0]["lr"])
        stat_keys = ("loss", "loss_clip", "loss_kl", "clip_frac_low", "clip_frac_high",
                     "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "grad_norm",
                     "onpolicy_max_abs_log_ratio")
        row.update({k: train_stats.get(k, math.nan) for k in stat_keys})
        row.update({k: v for k, v in train_stats.items() if k.startswith("loss_clip_")})
        seconds = self.timer.pop()
        for phase in ("sampling", "reward", "psm", "training"):
            row[f"time_{phase}"] = seconds.get(phase, 0.0)
        row = {k: float(v) for k, v in row.items()}
        self.history.append(row)
        if acc.is_main_process:
            self.metrics.log(it, row)
            every_n = cfg.run.image_every
            if every_n and (it % every_n == 0 or it == cfg.train.iterations - 1):
                with faults.warn_on_failure(f"the sample images of iteration {it}"):
                    self._save_images(it, roll.media, raw_maps)
        return row

    def _save_images(self, it: int, media, maps) -> None:
        frames = first_frames(media)
        folder = self.run_dir / "samples"
        save_grid(frames, folder / f"iter{it:06d}.png", nrow=self.cfg.sample.group_size)
        if maps is not None:
            from .psm import overlay

            first = maps[:, 0] if maps.dim() == 4 else maps  # video maps: first latent frame
            heat = overlay(frames, first.to(frames.device))  # (N, h, w, 3) uint8
            save_grid(heat.permute(0, 3, 1, 2).float() / 255, folder / f"maps{it:06d}.png",
                      nrow=self.cfg.sample.group_size)

    # ------------------------------------------------------------------ checkpoint
    def checkpoint(self, tag: str, iteration: int, kind: str, snapshot: dict | None = None):
        """Saves a resumable checkpoint (vipo.checkpointing) of the state after ``iteration``
        iterations, or of ``snapshot`` (the state taken when that iteration began)."""
        from .checkpointing import prune, save_checkpoint

        snap = snapshot or self._state_now()
        metric = self.cfg.run.best_metric
        state = {"iteration": iteration, "kind": kind, "sampler": snap["sampler"],
                 "optimizer_steps": snap["optimizer_steps"], "bad_steps": snap["bad_steps"],
                 "dropped_iters": snap["dropped_iters"],
                 "scheduler": self.scheduler.state_dict(),
                 "ema": {k: v for k, v in self.ema.state_dict().items()
                         if k != "shadow_params"} if self.ema is not None else None,
                 "metric": self.history[-1].get(metric) if metric and self.history else None}
        self._saving = True  # stays set if the save fails: no crash checkpoint after that
        folder = save_checkpoint(self, tag, state, snap["rng"])
        self._saving = False
        if self.accelerator.is_main_process and kind != "final":
            prune(self.run_dir, self.cfg.run.keep_checkpoints, metric)
        self.last_checkpoint = folder
        return folder

    def _state_now(self) -> dict:
        from .checkpointing import capture_rng

        return {"rng": capture_rng(self.rng), "sampler": self.sampler.state_dict(),
                "optimizer_steps": self.optimizer_steps, "bad_steps": self.bad_steps,
                "dropped_iters": self.dropped_iters}

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was saved before"
        return (f"the last checkpoint is {self.last_checkpoint} (resume={self.run_dir} with a "
                f"lower lr=... continues from it)")

    @property
    def adv_weights(self) -> list:
        return self.cfg.reward_weights if self.cfg.reward.multi_reward == "per_reward" else [1.0]

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, iteration: int) -> None:
        """The evaluation phase on the current weights (vipo/evaluation.py)."""
        if self.eval is None:
            return
        with self.timer("eval"):
            self.eval(self.model, iteration, self.accelerator.autocast)

    def _eval_due(self, done: int) -> bool:
        every = self.cfg.eval.eval_every
        return every > 0 and done % every == 0 and done < self.cfg.train.iterations

    # ------------------------------------------------------------------ loop
    def iteration(self, it: int) -> dict:
        """One iteration of the named phases; an OOM names its phase and what to shrink."""
        cfg = self.cfg
        with faults.phase("sampling", cfg):
            roll = self.sample(it)
        with faults.phase("reward", cfg):
            rewards = self.score(roll)
        with faults.phase("psm", cfg):
            adv, maps, raw = self.advantages(roll, rewards)
        with faults.phase("training", cfg):
            stats = self.optimize(roll, adv, maps)
        return self.log(it, roll, rewards, adv, raw, stats)

    def run(self) -> dict:
        """The loop. A stop signal ends it after the current iteration with a checkpoint
        (RunStopped); an error saves one first unless the state is not worth it."""
        from tqdm.auto import tqdm

        cfg, start = self.cfg, time.perf_counter()
        saving = cfg.run.checkpoint_every >= 0
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), desc="vipo",
                   dynamic_ncols=True, initial=self.start_iteration, total=cfg.train.iterations,
                   disable=not (cfg.run.progress and self.accelerator.is_main_process))
        try:
            with faults.StopSignals() as stop:
                if self.start_iteration == 0 or self._eval_due(self.start_iteration):
                    self.evaluate(self.start_iteration)
                for it in bar:
                    self._done = it
                    self._snapshot = {**self._state_now(), "iteration": it}
                    self._stepped = self._bad_loss = False
                    self.skipped_steps = 0
                    row = self.iteration(it)
                    bar.set_postfix(reward=f"{row['reward_mean']:.4f}", loss=f"{row['loss']:.2e}")
                    self._snapshot, self._done = None, it + 1
                    if self._eval_due(it + 1):
                        self.evaluate(it + 1)
                    if it + 1 < cfg.train.iterations:
                        self._between_iterations(it + 1, stop)
                self.evaluate(cfg.train.iterations)
                if saving:
                    self.checkpoint("final", cfg.train.iterations, "final")
        except BaseException as err:
            if saving and not isinstance(err, faults.RunStopped):
                self._save_after_failure(err)
            raise
        finally:
            bar.close()
            self._close()
        return self._finish(start)

    def _between_iterations(self, done: int, stop) -> None:
        """The periodic checkpoint, and the stop one (then RunStopped) after a signal."""
        every, signum = self.cfg.run.checkpoint_every, self._stop_requested(stop)
        if self.cfg.run.checkpoint_every >= 0 and (signum or every > 0 and done % every == 0):
            self.checkpoint(f"iter{done:06d}", done, "stop" if signum else "periodic")
        if signum:
            raise faults.RunStopped(signum)

    def _stop_requested(self, stop) -> int | None:
        """The signal, if any process received one (all stop together)."""
        flag = torch.tensor([stop.requested or 0], device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, "max")) or None \
            if self.accelerator.num_processes > 1 else stop.requested

    def _save_after_failure(self, err: BaseException) -> None:
        """A crash checkpoint: exact (the iteration's start) when no optimiser step had been
        taken in it, else the state as it is, counted as a finished iteration."""
        worth = getattr(err, "save", True) and not isinstance(err, KeyboardInterrupt)
        if self._saving or not worth or self._done is None:
            return
        if self.accelerator.num_processes > 1 and not getattr(err, "everywhere", False):
            # The other processes are not in this except block: a save's barriers would hang.
            logger.error("an error on one of %d processes: no crash checkpoint; the last "
                         "checkpoint stays the latest", self.accelerator.num_processes)
            return
        it = self._done
        try:
            if self._snapshot is None:  # between iterations (e.g. the evaluation): exact
                self.checkpoint(f"iter{it:06d}", it, "crash")
            elif self._stepped:
                self.checkpoint(f"iter{it + 1:06d}", it + 1, "crash")
            else:
                self.checkpoint(f"iter{it:06d}", it, "crash", self._snapshot)
        except Exception as save_err:  # noqa: BLE001 - report the original error first
            logger.error("the crash checkpoint could not be written either: %s",
                         faults.one_line(save_err))

    def _close(self) -> None:
        if self.accelerator.is_main_process and self.metrics is not None:
            self.metrics.close()
            if self.history:
                with faults.warn_on_failure("curves.png"):
                    plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")

    def _finish(self, start: float) -> dict:
        seconds = time.perf_counter() - start
        # This session's iterations: a resumed run's earlier rows took no time here.
        line = summary_line(self.history[self._resumed_rows:], seconds, self.run_dir)
        if self.start_iteration:
            line += f" (resumed at iteration {self.start_iteration})"
        if self.eval is not None:
            line += self.eval.summary()
            self.eval.close()
        if self.accelerator.is_main_process:
            print(line, flush=True)
        return {"run_dir": self.run_dir, "history": self.history, "summary": line,
                "seconds": seconds, "eval": self.eval.rows if self.eval is not None else []}


def _cpu_gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(63))


def parse_args(args: list) -> Config:
    """[PRESET | CONFIG.yaml] then key=value overrides -> a validated Config. With
    ``resume=``, the resumed run's saved config.yaml is the base instead."""
    args = list(args)
    first = args.pop(0) if args and "=" not in args[0] else None
    cfg = Config.from_name(DEFAULT_PRESET) if first is None else \
        Config.from_yaml(first) if first.endswith((".yaml", ".yml")) else Config.from_name(first)
    cfg.apply_overrides(args)
    if cfg.run.resume:
        from .run_dir import find_resume

        if first is not None:
            raise ConfigError(f"run.resume: continues the run's saved config; give key=value "
                              f"overrides only, not {first!r}")
        run_dir, _ = find_resume(cfg.run.resume, cfg.run.output_dir, cfg.run.run_name)
        resume = cfg.run.resume
        cfg = Config.from_yaml(run_dir / "config.yaml")
        cfg.apply_overrides(args)
        cfg.run.resume = resume
    if cfg.sample.prompts != "builtin":
        load_prompts(cfg.sample.prompts)
    return cfg.validate()


def _help(args: list) -> str:
    """--help for the preset or file (and overrides) that would run."""
    rest = [a for a in args if a not in ("-h", "--help", "--debug")]
    first = rest.pop(0) if rest and "=" not in rest[0] else None
    cfg = Config.from_name(DEFAULT_PRESET) if first is None else \
        Config.from_yaml(first) if first.endswith((".yaml", ".yml")) else Config.from_name(first)
    cfg.apply_overrides(rest)
    return help_text(cfg)


def main(argv: list | None = None) -> int:
    """Exit codes: 0 done, 1 error (one line; --debug for the traceback), 2 config or load
    error, 128 + signal number after a stop signal (the checkpoint is saved)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    trainer = None
    try:
        if any(a in ("-h", "--help") for a in args):
            print(_help(args))
            return 0
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        cfg = parse_args(args)
        debug = debug or cfg.run.debug
        trainer = Trainer(cfg)
        trainer.run()
        return 0
    except faults.RunStopped as stop:
        print(f"vipo.train: stopped by {stop}; {_saved(trainer)}", file=sys.stderr)
        return 128 + stop.signum
    except (ConfigError, faults.LoadError) as err:
        if debug:
            raise
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"vipo.train: {kind}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vipo.train: interrupted; {_saved(trainer)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure gets its one line
        if debug:
            raise
        message = faults.one_line(err)
        saved = "" if "checkpoint" in message else f"; {_saved(trainer)}"
        print(f"vipo.train: error: {message}{saved} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _saved(trainer) -> str:
    if trainer is None or trainer.last_checkpoint is None:
        return "no checkpoint saved"
    return f"checkpoint {trainer.last_checkpoint}; continue with resume={trainer.run_dir}"


if __name__ == "__main__":
    sys.exit(main())
