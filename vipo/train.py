"""``python -m vipo.train [PRESET | CONFIG.yaml] [key=value ...]``: GRPO / ViPO training.

One iteration (METHOD.md 7), one method per phase:
  sample      G SDE rollouts per prompt with the current policy (no grad)
  score       rewards of the decoded outputs
  advantages  group-normalised advantages, then PSM allocation maps (ViPO)
  optimize    recompute the velocity on a random subset of steps; fused vipo_loss; AdamW
  log         metrics CSV + TensorBoard, sample grids, map overlays
  evaluate    fixed held-out prompts from fixed noise (vipo/evaluation.py), before the first
              iteration, every eval_every and after the last
  checkpoint  trained weights (and EMA) as safetensors
``setup`` builds everything through ``accelerate.Accelerator`` (DDP/FSDP on GPUs via
``accelerate launch``; ``cpu=True`` without CUDA). With no arguments the ``toy`` preset
trains the shipped pretrained toy-world generator (vipo/toy) with ViPO on the CPU.
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

from .advantages import group_advantages
from .config import DEFAULT_PRESET, Config, ConfigError, help_text
from .logging_utils import MetricsLogger, PhaseTimer, save_grid, summary_line
from .plots import plot_curves
from .prompts import load_prompts

logger = logging.getLogger("vipo")



class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg.validate()
        self.setup()

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
        self.generator = torch.Generator(acc.device).manual_seed(t.seed + acc.process_index)
        self.run_dir = self._make_run_dir()
        weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.adapter = self._load_adapter(weight_dtype)
        params = self._trainable_parameters()
        self.ref_model = self._reference_model()
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      weight_decay=t.weight_decay, eps=t.adam_eps)
        self.model, self.optimizer = acc.prepare(self.adapter.transformer, optimizer)
        self.params = params
        self.ema = self._ema(params)
        self.rewards = self._load_rewards()
        self.psm = self._load_psm() if t.algorithm == "vipo" else None
        from .rollout import Schedule

        self.schedule = Schedule.build(cfg.sample, acc.device)
        self.prompts = load_prompts(cfg.sample.prompts)
        self.timer = PhaseTimer(acc.device)
        self.metrics = MetricsLogger(self.run_dir, cfg.run.tensorboard) \
            if acc.is_main_process else None
        self.history: list[dict] = []
        self.optimizer_steps = 0
        self.eval = self._eval_phase()

    def _eval_phase(self):
        if self.cfg.eval.eval_every < 0:
            return None
        from .evaluation import EvalPhase

        return EvalPhase(self.cfg, self.adapter, self.schedule, self.rewards, self.run_dir,
                         device=self.accelerator.device,
                         is_main=self.accelerator.is_main_process)

    def _make_run_dir(self) -> Path:
        from accelerate.utils import broadcast_object_list

        run = self.cfg.run
        name = [run.run_name or f"{self.cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"]
        broadcast_object_list(name)  # every process writes into the main process's folder
        run_dir = Path(run.output_dir) / name[0]
        if self.accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        return run_dir

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

        return [build_reward(name, self.cfg.reward, self.accelerator.device)
                for name in self.cfg.reward.reward]

    def _load_psm(self):
        from .psm import PerceptualStructuringModule

        p = self.cfg.psm
        path = p.backbone
        if path == "toy":
            from .toy.models import asset

            path = str(asset("backbone"))
        elif path == "tiny":
            from . import tiny

            with self.accelerator.main_process_first():
                path = str(tiny.ensure_backbone())
        # normalize="minmax" here: the trainer keeps these maps for logging and applies
        # map_norm itself, in ``advantages``.
        return PerceptualStructuringModule.from_pretrained(
            path, device=self.accelerator.device, n_components=p.n_components,
            aggregation=p.aggregation, sigma=p.psm_sigma, normalize="minmax")

    # ------------------------------------------------------------------ sample
    def sample(self):
        from .rollout import rollout

        s = self.cfg.sample
        prompts = [self.rng.choice(self.prompts) for _ in range(s.prompts_per_iter)]
        with self.timer("sampling"):
            return rollout(self.adapter, self.model, self.schedule, prompts,
                           group_size=s.group_size, same_init_noise=s.same_init_noise,
                           batch_size=s.sample_batch_size, ratio_level=self.cfg.train.ratio_level,
                           decode_from=s.decode_from, generator=self.generator,
                           autocast=self.accelerator.autocast,
                           backend=self.cfg.train.kernel_backend)

    # ------------------------------------------------------------------ score
    def score(self, roll) -> torch.Tensor:
        """(N, K) float32 rewards, one column per configured reward."""
        from .rewards import score_media

        with self.timer("reward"):
            columns = [score_media(fn, roll.media, roll.prompts, self.cfg.reward, name)
                       for fn, name in zip(self.rewards, self.cfg.reward.reward)]
        return torch.stack(columns, dim=1)

    # ------------------------------------------------------------------ advantages
    def advantages(self, roll, rewards):
        """Group advantages (METHOD.md 5), then the allocation maps of kept samples (6)."""
        r = self.cfg.reward
        batch_std = None
        if r.std_scope == "batch":
            every = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()
            if r.multi_reward == "sum_rewards":
                every = (every * torch.tensor(self.cfg.reward_weights)).sum(1, keepdim=True)
            every = every[torch.isfinite(every).all(dim=1)]
            batch_std = every.std(dim=0, unbiased=True)
        adv = group_advantages(rewards, roll.groups.cpu(), self.cfg.reward_weights,
                               mode=r.multi_reward, eps_std=r.eps_std,
                               nonfinite=r.nonfinite_reward, batch_std=batch_std,
                               names=r.reward)
        maps, raw = None, None
        if self.psm is not None:
            from .psm.maps import normalize_maps

            with self.timer("psm"), torch.no_grad():
                raw = self.allocation_maps(roll.media)  # min-max, kept for the logs
                # map_norm (METHOD.md 6) in its one place; the loss takes any map >= 0.
                maps = normalize_maps(raw, tuple(range(1, raw.dim())), self.cfg.psm.map_norm,
                                      self.cfg.psm.map_floor)
        return adv, maps, raw

    def allocation_maps(self, media: torch.Tensor) -> torch.Tensor:
        """PSM maps (N, *S) on the latent grid of the loss, in [0, 1]."""
        spatial = tuple(self.adapter.latent_shape()[1:])
        if self.adapter.is_video:
            return self.psm.video(media, latent_size=spatial, joint_pca=self.cfg.psm.joint_pca,
                                  temporal_sigma=self.cfg.psm.temporal_sigma).float()
        return self.psm(media, latent_size=spatial).float()

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
            out.update({f"loss_clip_{_tag(name)}": value
                        for name, value in zip(self.cfg.reward.reward, per_reward)})
        if acc.sync_gradients:
            out["grad_norm"] = acc.clip_grad_norm_(self.params, t.max_grad_norm)
            self.optimizer_steps += 1
            if self.ema is not None and self.optimizer_steps % t.ema_every == 0:
                self.ema.step(self.params)
        self.optimizer.step()  # a no-op until accelerate syncs gradients
        self.optimizer.zero_grad()
        return out

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
        every = acc.gather(rewards.to(acc.device)).float().cpu()  # (N * processes, K)
        finite = every[torch.isfinite(every).all(dim=1)]
        row = {"reward_mean": finite[:, 0].mean(), "reward_std": finite[:, 0].std()}
        if len(cfg.reward.reward) > 1:
            for col, name in enumerate(cfg.reward.reward):
                row[f"reward_{_tag(name)}_mean"] = finite[:, col].mean()
        row.update(zero_std_groups=adv.zero_std_groups, dropped_groups=adv.dropped_groups,
                   map_mean=raw_maps.mean() if raw_maps is not None else 1.0,
                   psm_failures=self.psm.failures if self.psm is not None else 0,
                   optimizer_steps=self.optimizer_steps, lr=self.optimizer.param_groups[0]["lr"])
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
                self._save_images(it, roll.media, raw_maps)
        return row

    def _save_images(self, it: int, media, maps) -> None:
        frames = media[:, 0] if media.dim() == 5 else media  # videos: first frame
        folder = self.run_dir / "samples"
        save_grid(frames, folder / f"iter{it:06d}.png", nrow=self.cfg.sample.group_size)
        if maps is not None:
            from .psm import overlay

            first = maps[:, 0] if maps.dim() == 4 else maps  # video maps: first latent frame
            heat = overlay(frames, first.to(frames.device))  # (N, h, w, 3) uint8
            save_grid(heat.permute(0, 3, 1, 2).float() / 255, folder / f"maps{it:06d}.png",
                      nrow=self.cfg.sample.group_size)

    # ------------------------------------------------------------------ checkpoint
    def checkpoint(self, tag: str) -> Path | None:
        """Trained weights as safetensors: the full transformer (save_pretrained) or the
        LoRA weights (peft state dict), plus the EMA weights when enabled."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)  # gathers FSDP shards on every process
        if not acc.is_main_process:
            return None
        from safetensors.torch import save_file

        folder = self.run_dir / "checkpoints" / tag
        model = acc.unwrap_model(self.model)
        if self.cfg.train.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            folder.mkdir(parents=True, exist_ok=True)
            lora = get_peft_model_state_dict(model, state_dict=state)
            save_file({k: v.contiguous().cpu() for k, v in lora.items()},
                      folder / "lora.safetensors")
        else:
            model.save_pretrained(folder / "transformer", state_dict=state,
                                  safe_serialization=True)
        if self.ema is not None:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            save_file({n: p.detach().contiguous().cpu()
                       for n, p in zip(names, self.ema.shadow_params)}, folder / "ema.safetensors")
        return folder

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
    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, start = self.cfg, time.perf_counter()
        bar = tqdm(range(cfg.train.iterations), desc="vipo", dynamic_ncols=True,
                   disable=not (cfg.run.progress and self.accelerator.is_main_process))
        self.evaluate(0)
        for it in bar:
            roll = self.sample()
            rewards = self.score(roll)
            adv, maps, raw = self.advantages(roll, rewards)
            stats = self.optimize(roll, adv, maps)
            row = self.log(it, roll, rewards, adv, raw, stats)
            bar.set_postfix(reward=f"{row['reward_mean']:.4f}", loss=f"{row['loss']:.2e}")
            if self._eval_due(it + 1):
                self.evaluate(it + 1)
            every = cfg.run.checkpoint_every
            if every > 0 and (it + 1) % every == 0 and it + 1 < cfg.train.iterations:
                self.checkpoint(f"iter{it + 1:06d}")
        self.evaluate(cfg.train.iterations)
        if cfg.run.checkpoint_every >= 0:
            self.checkpoint("final")
        seconds = time.perf_counter() - start
        line = summary_line(self.history, seconds, self.run_dir)
        if self.eval is not None:
            line += self.eval.summary()
            self.eval.close()
        if self.accelerator.is_main_process:
            self.metrics.close()
            if self.history:
                plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
            print(line, flush=True)
        return {"run_dir": self.run_dir, "history": self.history, "summary": line,
                "seconds": seconds, "eval": self.eval.rows if self.eval is not None else []}


def _cpu_gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.getrandbits(63))


def _tag(name: str) -> str:
    return name.replace(":", "_").replace(".", "_")


def parse_args(args: list) -> Config:
    """[PRESET | CONFIG.yaml] then key=value overrides -> a validated Config."""
    args = list(args)
    cfg = Config.from_name(DEFAULT_PRESET)
    if args and "=" not in args[0]:
        first = args.pop(0)
        cfg = Config.from_yaml(first) if first.endswith((".yaml", ".yml")) else \
            Config.from_name(first)
    cfg.apply_overrides(args)
    if cfg.sample.prompts != "builtin":
        load_prompts(cfg.sample.prompts)
    return cfg.validate()


def main(argv: list | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(help_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        trainer = Trainer(parse_args(args))
    except ConfigError as err:
        print(f"vipo.train: config error: {err}", file=sys.stderr)
        return 2
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
