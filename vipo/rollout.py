"""Rollouts: the shifted sigma schedule and G-sample SDE trajectories (docs/method.md 1, 2, 7).

The step itself is ``vipo_kernels.sde_step`` (fp32 maths, log-prob of the stored z_{k+1});
this module owns the schedule, the noise, the group layout and what is stored for the
optimisation phase: every latent z_0..z_{T_s} and the old log-probs of the trainable
transitions k = 0..T_s-2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vipo_kernels import log_prob, sde_coefficients, sde_step


def shifted(s: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = shift*s / (1 + (shift - 1)*s), the SD3/Flux timestep shift."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sigma_schedule(num_steps: int, shift: float, kind: str = "dance") -> torch.Tensor:
    """(T_s + 1,) float32 noise levels from 1 down to 0 (docs/method.md 1).

    ``dance``: s_k = 1 - k/T_s for k = 0..T_s (DanceGRPO / ViPO scripts).
    ``diffusers``: FlowMatchEulerDiscreteScheduler's levels (Flow-GRPO): s_k runs linearly
    from 1 to the shifted-back sigma_min = 0.001 over T_s points, then sigma_{T_s} = 0.
    """
    if kind == "dance":
        s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return shifted(s, shift).to(torch.float32)
    if kind == "diffusers":
        sigma_min = shifted(torch.tensor(0.001, dtype=torch.float64), shift)
        k = torch.arange(num_steps, dtype=torch.float64)
        s = 1.0 - k * (1.0 - sigma_min) / (num_steps - 1)
        return torch.cat([shifted(s, shift), torch.zeros(1, dtype=torch.float64)]).float()
    raise ValueError(f"sigma_schedule must be 'dance' or 'diffusers', got {kind!r}")


@dataclass
class Schedule:
    """Per-step constants shared by rollout and recompute (so both see identical values)."""
    sigmas: torch.Tensor        # (T_s + 1,) float32
    timesteps: torch.Tensor     # (T_s,) float32 model input 1000*sigma (maybe truncated)
    coef_sample: torch.Tensor   # (T_s,) float32
    coef_output: torch.Tensor   # (T_s,) float32
    std: torch.Tensor           # (T_s,) float32

    @classmethod
    def build(cls, sample_cfg, device, adapter=None) -> "Schedule":
        """sample_cfg's schedule; ``sigma_schedule=pipeline`` asks ``adapter`` for the levels
        of its diffusers pipeline."""
        c = sample_cfg
        sigmas = adapter.pipeline_sigmas(c.num_steps) if c.sigma_schedule == "pipeline" else \
            sigma_schedule(c.num_steps, c.shift, c.sigma_schedule)
        # DanceGRPO/ViPO truncate int(1000*sigma) of the fp32 sigma; the step coefficients
        # always use the untruncated sigma (docs/method.md 1).
        timesteps = 1000.0 * sigmas[:-1]
        if c.timestep_input == "int":
            timesteps = torch.trunc(timesteps)
        coefs = sde_coefficients(sigmas[:-1], sigmas[1:], kind=c.sde, eta=c.eta,
                                 noise_level=c.noise_level)
        return cls(sigmas.to(device), timesteps.to(device),
                   *(x.to(device, torch.float32) for x in coefs))

    def step(self, k: torch.Tensor) -> dict:
        """Coefficients of steps ``k`` (B,) as keyword arguments of the kernels."""
        return {"coef_sample": self.coef_sample[k], "coef_output": self.coef_output[k],
                "std": self.std[k]}


@dataclass
class Rollout:
    prompts: list               # N prompts, group-major (G consecutive samples per prompt)
    groups: torch.Tensor        # (N,) long group index
    cond: dict                  # prompt conditioning, (N, ...) tensors
    latents: torch.Tensor       # (N, T_s + 1, C, *S) float32: z_0 .. z_{T_s}
    log_probs: torch.Tensor     # (N, T_s - 1, *S) position level or (N, T_s - 1) sample level
    media: torch.Tensor         # (N, 3, H, W) or (N, F, 3, H, W) decoded, in [0, 1]

    @property
    def num_samples(self) -> int:
        return len(self.prompts)

    @classmethod
    def cat(cls, parts: list, groups: list) -> "Rollout":
        """One rollout from single-group ``parts``; ``groups`` names each part's group."""
        size = parts[0].num_samples
        ids = torch.tensor(groups, device=parts[0].latents.device).repeat_interleave(size)
        cond = {k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond}
        return cls([q for p in parts for q in p.prompts], ids, cond,
                   torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]),
                   torch.cat([p.media for p in parts]))


@torch.no_grad()
def rollout(adapter, model, schedule: Schedule, prompts: list, *, group_size: int,
            same_init_noise: bool, batch_size: int, ratio_level: str, decode_from: str,
            generator: torch.Generator, autocast=contextlib.nullcontext,
            backend: str = "auto") -> Rollout:
    """G = ``group_size`` trajectories for each prompt, run in chunks of ``batch_size``."""
    device = adapter.device
    n_prompts = len(prompts)
    groups = torch.arange(n_prompts, device=device).repeat_interleave(group_size)
    cond = adapter.encode_prompts(list(prompts))
    cond = {k: v.repeat_interleave(group_size, dim=0) for k, v in cond.items()}
    shape = adapter.latent_shape()
    init = torch.randn((n_prompts if same_init_noise else n_prompts * group_size, *shape),
                       generator=generator, device=device, dtype=torch.float32)
    if same_init_noise:
        init = init.repeat_interleave(group_size, dim=0)
    chunks = [_trajectory(adapter, model, schedule, init[i:i + batch_size],
                          adapter.select(cond, slice(i, i + batch_size)), ratio_level,
                          decode_from, generator, autocast, backend)
              for i in range(0, init.shape[0], batch_size)]
    latents, log_probs, media = (torch.cat(parts) for parts in zip(*chunks))
    return Rollout([p for p in prompts for _ in range(group_size)], groups, cond, latents,
                   log_probs, media)


def _trajectory(adapter, model, schedule, z, cond, ratio_level, decode_from, generator,
                autocast, backend):
    """One chunk: T_s SDE steps from z_0 = ``z``; returns (latents, old log-probs, media)."""
    batch, steps = z.shape[0], len(schedule.timesteps)
    latents, log_probs = [z], []
    x0 = None
    for k in range(steps):
        index = torch.full((batch,), k, device=z.device, dtype=torch.long)
        with autocast():
            v = adapter.velocity(model, z, schedule.timesteps[index], cond)  # (B, C, *S)
        coefs = schedule.step(index)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z_next, logp = sde_step(v, z, noise, backend=backend, **coefs)
        if k < steps - 1:  # the last transition (to sigma = 0) is never trained
            if ratio_level == "sample":
                logp = log_prob(v, z, z_next, ratio_level="sample", backend=backend, **coefs)
            log_probs.append(logp)
        else:
            x0 = z - schedule.sigmas[k] * v  # x0 prediction of the last step
        z = z_next
        latents.append(z)
    media = adapter.decode(x0 if decode_from == "x0_pred" else z)
    return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1), media
