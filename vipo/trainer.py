"""The Trainer: the model, the optimiser and the five phases of one iteration
(docs/method.md, "One iteration"):

  sample      G SDE rollouts per prompt with the current policy (no grad)
  score       rewards of the decoded outputs
  advantages  group-normalised advantages, then the allocation maps (ViPO)
  optimize    recompute the velocity on a random subset of steps; fused vipo_loss; AdamW
  log         the iteration's metrics row

The run around it (folder, resume, stops, evaluation, checkpoints) is vipo.run_loop's; what a
checkpoint must restore besides weights and optimiser is ``self.state`` (vipo.run_state).

Host synchronisation on CUDA is bounded (tests/test_syncs.py): the statistics stay on the
device until ``log`` moves them in one transfer; the non-finite guard reads one flag per
optimiser step, reduced over processes so that all of them skip a step together; sampling
checks once for divergence; the rewards are gathered once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
from dataclasses import dataclass

import torch

from . import experts, faults
from .distributed import PromptSampler, global_advantages, group_generator, reduce_stats
from .errors import ConfigError, TrainingError
from .logging_utils import PhaseTimer
from .prompts import load_prompts
from .rewards import reward_tag
from .run_state import RunState

logger = logging.getLogger("vipo")

# Statistics every iteration's row has (NaN when a phase did not produce them).
STAT_KEYS = ("loss", "loss_clip", "loss_kl", "clip_frac_low", "clip_frac_high", "approx_kl",
             "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "onpolicy_max_abs_log_ratio")
PHASES = ("sampling", "reward", "psm", "training")


def precision_of(cfg) -> str:
    """fp32 or bf16 (``auto``: bf16 on CUDA, fp32 on the CPU)."""
    cuda = torch.cuda.is_available()
    precision = cfg.model.precision if cfg.model.precision != "auto" else \
        ("bf16" if cuda else "fp32")
    if precision == "bf16" and not cuda:
        raise ConfigError("model.precision=bf16 needs a CUDA device (bf16 on this CPU is "
                          "~25x slower than fp32); use precision=auto or fp32")
    return precision


def make_accelerator(cfg):
    """The run's one Accelerator: DDP (or nothing) around the model; FSDP is applied by the
    trainer itself (vipo.sharding), so an accelerate config with distributed_type FSDP is
    refused with the fix."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    t, cuda = cfg.train, torch.cuda.is_available()
    accum = (t.grad_accum // t.train_batch_size) * cfg.train_steps_per_sample
    acc = Accelerator(cpu=not cuda, gradient_accumulation_steps=accum,
                      mixed_precision="bf16" if precision_of(cfg) == "bf16" else "no",
                      kwargs_handlers=experts.ddp_kwargs(cfg))
    if acc.distributed_type == DistributedType.FSDP:
        raise ConfigError("train.fsdp: vipo shards the transformer itself (torch FSDP2, "
                          "train.fsdp=true); launch with a MULTI_GPU accelerate config such as "
                          "configs/accelerate/fsdp_flux_8gpu.yaml, not distributed_type FSDP")
    if not cuda and cfg.run.cpu_threads > 0:
        torch.set_num_threads(cfg.run.cpu_threads)
    return acc


@dataclass
class IterationResult:
    row: dict                 # the metrics of the iteration (floats)
    media: torch.Tensor       # this process's decoded samples
    maps: torch.Tensor | None  # their allocation maps, min-max (for the overlays)


class Trainer:
    def __init__(self, cfg, accelerator=None, adapter=None):
        """cfg: a validated Config. accelerator: the run's (default: ``make_accelerator``).
        adapter: a prebuilt model adapter (vipo.adapters); default: loaded from model.path."""
        from accelerate.utils import set_seed

        self.cfg, t = cfg, cfg.train
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        set_seed(t.seed + acc.process_index)
        self.prompts = load_prompts(cfg.sample.prompts)
        self.state = RunState(
            PromptSampler(len(self.prompts), t.seed, cfg.sample.prompts_per_iter,
                          acc.num_processes, acc.process_index),
            random.Random(t.seed + acc.process_index))
        # Rewards and the PSM backbone load first: a bad name fails before the big model.
        self.rewards = self._load_rewards()
        self.psm = self._load_psm() if t.algorithm == "vipo" else None
        precision = precision_of(cfg)
        weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.adapter = adapter or self._load_adapter(weight_dtype)
        self._prepare_model(precision)
        from .rollout import Schedule

        self.schedule = Schedule.build(cfg.sample, acc.device, self.adapter)
        # Wan 2.2: the trainable steps each trained expert owns (None: one transformer).
        self.step_pools = experts.step_pools(self.adapter, self.schedule, cfg)
        self.timer = PhaseTimer(acc.device)
        self.stepped = False        # an optimiser step was taken in this iteration
        self.skipped_steps = 0      # steps skipped in this iteration
        self._bad = None            # device flag: a non-finite loss since the last step
        self.onpolicy_checked = False
        self.step_guard = contextlib.nullcontext  # the run loop's StopSignals.held

    # ------------------------------------------------------------------ setup
    def _prepare_model(self, precision: str) -> None:
        """Trainable parameters, sharding, reference model, optimiser, scheduler, EMA."""
        from . import sharding

        t, acc = self.cfg.train, self.accelerator
        transformer = self.adapter.transformer
        self._set_trainable(transformer)
        self.sharded = t.fsdp and acc.num_processes > 1
        # The KL reference is the initial model: a frozen copy (LoRA: the base weights with
        # the adapters off), sharded like the policy so it costs a shard per process.
        self.ref_model = None
        if t.kl_coef > 0 and t.lora_rank == 0:
            self.ref_model = copy.deepcopy(transformer).requires_grad_(False).eval()
            if self.ref_model.dtype != self.adapter.weight_dtype:
                self.ref_model.to(self.adapter.weight_dtype)  # no fp32 master copy needed
        if self.sharded:
            sharding.shard(transformer, precision)
            if self.ref_model is not None:
                sharding.shard(self.ref_model, precision)
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_eps)
        warmup = t.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        if self.sharded:  # accelerate must not wrap it in DDP: FSDP2 reduces the gradients
            self.model, self.optimizer = transformer, acc.prepare_optimizer(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(transformer, optimizer)
        # Sharding replaces the parameters with DTensors; clipping and EMA need those.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = None
        if t.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=t.ema_decay, use_ema_warmup=False)

    def _set_trainable(self, transformer) -> None:
        t = self.cfg.train
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
        with faults.loading("the PSM backbone (psm.backbone)", path):
            return load_map_source(self.cfg.psm, path, self.accelerator.device, self.prompts)

    # ------------------------------------------------------------------ sample
    def sample(self, it: int):
        """This process's shard of the iteration's prompts; each group draws its noise from
        its own generator (vipo.distributed), so the samples do not depend on the layout."""
        from .rollout import Rollout, rollout

        s, device = self.cfg.sample, self.accelerator.device
        indices, groups = self.state.sampler.next()
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
        if not bool(torch.isfinite(roll.latents).all()):  # sync: once per iteration
            raise TrainingError(
                f"iteration {it}: the policy produced non-finite latents, so the model has "
                f"diverged; lower train.lr (now {self.cfg.train.lr:g}) or check the rewards. "
                f"Its weights are not saved", save=False)
        return roll

    # ------------------------------------------------------------------ score
    def score(self, roll) -> torch.Tensor:
        """(N, K) float32 CPU rewards, one column per configured reward."""
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
        """(advantages of this process's samples, every process's rewards, loss maps,
        min-max maps for the overlays). The maps are psm.map_source's min-max maps with
        ``psm.map_norm`` applied here, its one place (docs/method.md, "Allocation maps")."""
        try:
            adv, every = global_advantages(self.accelerator, rewards, roll.groups.cpu(),
                                           self.cfg.reward_weights, self.cfg.reward,
                                           roll.prompts)
        except ValueError as err:  # a non-finite reward, named with its sample and prompt
            raise TrainingError(str(err), everywhere=True) from err
        self._count_dropped(adv)
        maps = raw = None
        if self.psm is not None:
            from .psm.maps import normalize_maps

            with self.timer("psm"), torch.no_grad():
                raw = self.allocation_maps(roll.media, roll.prompts)
                maps = normalize_maps(raw, tuple(range(1, raw.dim())), self.cfg.psm.map_norm,
                                      self.cfg.psm.map_floor)
        return adv, every, maps, raw

    def _count_dropped(self, adv) -> None:
        """Stops a run whose every group is dropped (non-finite rewards) for
        reward.max_dropped_iters iterations in a row: it would learn nothing."""
        if adv.total_groups == 0 or adv.dropped_groups < adv.total_groups:
            self.state.dropped_iters = 0
            return
        self.state.dropped_iters += 1
        limit = self.cfg.reward.max_dropped_iters
        logger.warning("every group had a non-finite reward and was dropped (%d of %d "
                       "iterations allowed in a row)", self.state.dropped_iters, limit)
        if self.state.dropped_iters >= limit:
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
        grad_accum samples x |S_i| steps per optimiser step. Returns device statistics."""
        t, acc = self.cfg.train, self.accelerator
        # Dropped groups stay in the loop with A = 0 (no clip-loss gradient): every process
        # then runs the same number of backward passes, which DDP/FSDP need to stay in step.
        batches = self._micro_batches(roll.num_samples)
        old = self._old_log_probs(roll, batches)
        sums: dict = {}
        steps_before, onpolicy = self.state.optimizer_steps, None
        with self.timer("training"):
            for (mb, k), old_lp in zip(batches, old):
                cond = self.adapter.select(roll.cond, mb)
                on_policy = self.state.optimizer_steps == steps_before
                with acc.accumulate(self.model):
                    stats = self._train_step(roll, mb, k, cond, old_lp, adv.values[mb.cpu()],
                                             adv.weights, None if maps is None else maps[mb])
                if on_policy:  # the weights are the rollout's: every ratio must be 1
                    gap = torch.maximum(stats["ratio_max"].log().abs(),
                                        stats["ratio_min"].log().abs())
                    onpolicy = gap if onpolicy is None else torch.maximum(onpolicy, gap)
                for key, v in stats.items():
                    total, n = sums.get(key, (0.0, 0))
                    sums[key] = (total + v, n + 1)
        out = {k: total / n for k, (total, n) in sums.items()}
        if onpolicy is not None:
            out["onpolicy_max_abs_log_ratio"] = onpolicy
        return out

    def _micro_batches(self, n: int) -> list:
        """[(samples (B,), their trained steps (B,)), ...] on the device, in training order:
        samples in a random order, micro-batches of train_batch_size, each with |S| steps
        (a random subset of 0..T_s-2 per sample, or the first |S| in order)."""
        device = self.accelerator.device
        gen = torch.Generator().manual_seed(self.state.rng.getrandbits(63))
        order = torch.randperm(n, generator=gen)
        trainable, count = self.cfg.sample.num_steps - 1, self.cfg.train_steps_per_sample
        if self.step_pools is not None:  # experts: the same expert at each position
            gen = torch.Generator().manual_seed(self.state.rng.getrandbits(63))
            steps = experts.draw_steps(self.step_pools, n, count,
                                       self.cfg.train.timestep_order == "first", gen)
        elif self.cfg.train.timestep_order == "first":
            steps = torch.arange(count).expand(n, count)
        else:
            gen = torch.Generator().manual_seed(self.state.rng.getrandbits(63))
            steps = torch.stack([torch.randperm(trainable, generator=gen)[:count]
                                 for _ in range(n)])
        size = self.cfg.train.train_batch_size
        return [(order[s:s + size].to(device), steps[order[s:s + size], j].to(device))
                for s in range(0, n, size) for j in range(count)]

    def _old_log_probs(self, roll, batches) -> list:
        """The old log-probs of each micro-batch. ``rollout``: as the rollout stored them.
        ``recompute``: recomputed with the current weights in the training layout (same
        micro-batches, same timesteps), so that the first step's ratios are exactly 1 even
        where the rollout's batch layout rounds differently (bf16 matmuls are not
        batch-invariant). Costs one no-grad forward per trained micro-batch."""
        if self.old_log_probs_mode() == "rollout":
            return [roll.log_probs[mb, k] for mb, k in batches]
        from vipo_kernels import log_prob

        out = []
        with self.timer("training"), torch.no_grad():
            for mb, k in batches:
                z, z_next = roll.latents[mb, k], roll.latents[mb, k + 1]
                with self.accelerator.autocast():
                    v = self.adapter.velocity(self.model, z, self.schedule.timesteps[k],
                                              self.adapter.select(roll.cond, mb))
                out.append(log_prob(v, z, z_next, ratio_level=self.cfg.train.ratio_level,
                                    backend=self.cfg.train.kernel_backend,
                                    **self.schedule.step(k)))
        return out

    def old_log_probs_mode(self) -> str:
        mode = self.cfg.train.old_log_probs
        if mode == "auto":
            return "recompute" if precision_of(self.cfg) == "bf16" else "rollout"
        return mode

    def _train_step(self, roll, mb, k, cond, old_lp, adv, weights, amap) -> dict:
        from vipo_kernels import vipo_loss

        t, acc = self.cfg.train, self.accelerator
        z, z_next = roll.latents[mb, k], roll.latents[mb, k + 1]  # (B, C, *S)
        with acc.autocast():
            v = self.adapter.velocity(self.model, z, self.schedule.timesteps[k], cond)
        ref = self._reference_velocity(z, k, cond) if t.kl_coef > 0 else None
        # L = sum_k w_k L_clip(A_k) + L_KL in one call: (B, K) advantages with the weights
        # group_advantages chose, the map as the PSM and map_norm made it; the loss clips A.
        loss, stats = vipo_loss(v, z, z_next, old_lp, adv.to(acc.device), amap,
                                **self.schedule.step(k), reward_weights=weights,
                                clip_range=t.clip_range, adv_clip=t.adv_clip,
                                ratio_level=t.ratio_level, kl_coef=t.kl_coef,
                                ref_model_output=ref, backend=t.kernel_backend)
        acc.backward(loss)
        per_reward = stats.pop("loss_clip_per_reward")
        out = {"loss": loss.detach(), **stats}
        if len(per_reward) > 1:
            out.update({f"loss_clip_{reward_tag(name)}": value
                        for name, value in zip(self.cfg.reward.reward, per_reward)})
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad  # stays on the device
        if acc.sync_gradients:
            with self.step_guard():  # a stop signal waits for the step to finish
                out["grad_norm"] = self._optimizer_step()
        return out

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, then step, unless the accumulated loss or the gradient norm is non-finite on
        any process: then every process skips the step (one sync, reduced over processes),
        and train.max_bad_steps skips in a row stop the run."""
        from . import sharding

        t, acc, state = self.cfg.train, self.accelerator, self.state
        if self.sharded:
            norm = sharding.clip_grad_norm_(self.params, t.max_grad_norm)
        else:
            norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
        bad = (~torch.isfinite(norm)) | self._bad
        if acc.num_processes > 1:
            bad = acc.reduce(bad.to(torch.int32), "max")
        if bool(bad):  # the one sync of an optimiser step
            state.bad_steps += 1
            self.skipped_steps += 1
            logger.warning("non-finite loss or gradient norm (%s): optimiser step skipped "
                           "(%d in a row)", float(norm), state.bad_steps)
        else:
            self.optimizer.step()
            self.scheduler.step()
            state.bad_steps, self.stepped = 0, True
            state.optimizer_steps += 1
            if self.ema is not None and state.optimizer_steps % t.ema_every == 0:
                self.ema.step(self.params)
        self.optimizer.zero_grad()
        self._bad = None
        if state.bad_steps >= t.max_bad_steps:
            raise TrainingError(
                f"{state.bad_steps} optimiser steps in a row had a non-finite loss or gradient "
                f"norm and were skipped: training has likely diverged; lower train.lr (now "
                f"{t.lr:g}) or check the rewards for extreme values", save=False)
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
    def log(self, adv, every_reward: torch.Tensor, raw_maps, stats: dict) -> dict:
        """The iteration's metrics row (Python floats): the device statistics in one
        transfer (reduced over processes), the gathered CPU rewards in one conversion."""
        cfg, names = self.cfg, self.cfg.reward.reward
        device_stats = {k: v for k, v in stats.items()
                        if k in STAT_KEYS or k.startswith("loss_clip_")}
        if raw_maps is not None:
            device_stats["map_mean"] = raw_maps.mean()
        host = reduce_stats(self.accelerator, device_stats)
        finite = every_reward[torch.isfinite(every_reward).all(dim=1)].double()
        mean, std, *columns = torch.cat([finite[:, :1].mean(0), finite[:, :1].std(0),
                                         finite.mean(0)]).tolist()
        row = {"reward_mean": mean, "reward_std": std}
        if len(names) > 1:
            row.update({f"reward_{reward_tag(n)}_mean": v for n, v in zip(names, columns)})
        row.update(zero_std_groups=adv.zero_std_groups, dropped_groups=adv.dropped_groups,
                   map_mean=host.get("map_mean", 1.0),
                   psm_failures=self.psm.failures if self.psm is not None else 0,
                   optimizer_steps=self.state.optimizer_steps,
                   skipped_steps=self.skipped_steps,
                   lr=self.optimizer.param_groups[0]["lr"])
        row.update({k: host.get(k, math.nan) for k in STAT_KEYS})
        row.update({k: v for k, v in host.items() if k.startswith("loss_clip_")})
        seconds = self.timer.pop()
        row.update({f"time_{phase}": seconds.get(phase, 0.0) for phase in PHASES})
        return {k: float(v) for k, v in row.items()}

    # ------------------------------------------------------------------ one iteration
    def iteration(self, it: int) -> IterationResult:
        """The five phases; an OOM names its phase and what to shrink."""
        cfg = self.cfg
        self.stepped, self.skipped_steps = False, 0
        with faults.phase("sampling", cfg):
            roll = self.sample(it)
        with faults.phase("reward", cfg):
            rewards = self.score(roll)
        with faults.phase("psm", cfg):
            adv, every, maps, raw = self.advantages(roll, rewards)
        with faults.phase("training", cfg):
            stats = self.optimize(roll, adv, maps)
        row = self.log(adv, every, raw, stats)
        self._check_onpolicy(row)
        self.state.iteration = it + 1
        return IterationResult(row, roll.media, raw)

    def _check_onpolicy(self, row: dict) -> None:
        """At the run's first iteration every position's ratio must start within clip_range/10
        of 1; otherwise the clip acts on rounding noise. train.onpolicy_check says whether a
        failure stops the run or warns."""
        if self.onpolicy_checked or self.cfg.train.onpolicy_check == "off":
            return
        self.onpolicy_checked = True
        gap, eps = row["onpolicy_max_abs_log_ratio"], self.cfg.train.clip_range
        if not gap > eps / 10 or math.isnan(gap):
            return
        message = (f"the first optimiser step's ratios are not 1: max |log ratio| {gap:.3g} > "
                   f"clip_range/10 = {eps / 10:.3g}, so the clip acts on rounding noise of the "
                   f"rollout's batch layout; set train.old_log_probs=recompute (now "
                   f"{self.cfg.train.old_log_probs})")
        if self.cfg.train.onpolicy_check == "stop" and self.old_log_probs_mode() == "rollout":
            raise TrainingError(message, save=False, everywhere=True)
        logger.warning(message)
