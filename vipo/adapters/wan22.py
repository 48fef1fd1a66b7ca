"""Wan 2.2 text-to-video (A14B): WanPipeline with two experts of the same architecture, the
high-noise ``transformer`` and the low-noise ``transformer_2``, switching at
``boundary_ratio``.

Follows diffusers' WanPipeline.__call__ (v0.42.1) with ``boundary_ratio`` set: a step whose
timestep t = 1000 sigma satisfies t >= boundary_ratio * num_train_timesteps runs the
high-noise expert with ``guidance_scale``, every later step the low-noise expert with
``guidance_scale_2`` (model.guidance_scale_2; 0 means the same as guidance_scale, the
pipeline's None); everything else as Wan 2.1 (vipo/adapters/wan.py). Schedule: the
pipeline's scheduler levels for N steps (``sigma_schedule=pipeline``); with the shipped
UniPC scheduler the rollout steps Euler/SDE along UniPC's levels (not its multistep update).
Changed: the two experts are one module (``vipo.experts.ExpertPair``) that routes each
sample of a batch by its own timestep; training (which expert, ``model.experts``) is
vipo/experts.py's.
"""

from __future__ import annotations

import torch

from ..experts import ExpertPair
from .wan import WanAdapter


class Wan22Adapter(WanAdapter):
    arch = "wan22"

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        pipe = self.pipe
        ratio = pipe.config.get("boundary_ratio")
        if ratio is None or pipe.transformer_2 is None or pipe.transformer is None:
            raise ValueError("model.path: arch=wan22 needs a WanPipeline with transformer, "
                             "transformer_2 and boundary_ratio (Wan 2.2 A14B); for Wan 2.1 "
                             "use arch=wan")
        if pipe.config.get("expand_timesteps"):
            raise ValueError("model.path: Wan 2.2 TI2V (expand_timesteps) is not supported")
        boundary = ratio * pipe.scheduler.config.num_train_timesteps
        self.transformer = ExpertPair(pipe.transformer, pipe.transformer_2, boundary,
                                      trained=cfg.experts)

    def guide(self, v_cond, v_uncond, timesteps):
        second = self.cfg.guidance_scale_2 or self.cfg.guidance_scale
        scale = torch.where(self.transformer.owners(timesteps), self.cfg.guidance_scale, second)
        scale = scale.view(-1, *([1] * (v_cond.dim() - 1))).to(v_cond.dtype)
        return v_uncond + scale * (v_cond - v_uncond)

    def pipeline_sigmas(self, num_steps: int) -> torch.Tensor:
        return self.scheduler_sigmas(num_steps)
