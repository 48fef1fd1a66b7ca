"""The model interface the trainer sees: encode prompts, predict velocity, latent shape,
decode to pixels. Adding a model means adding one subclass in its own file.

Latents are always handled in the *loss layout* (B, C, H, W) or (B, C, T, H, W): an adapter
whose transformer takes another layout (Flux's packed tokens) converts inside
``forward``. Conversions are permutations, so they commute with the elementwise SDE step.

Components are loaded with the real diffusers pipeline class's ``from_pretrained`` (hub id
or local folder); the pipeline object is kept for its prompt encoding and VAE.
"""

from __future__ import annotations

import abc
import logging

import torch

logger = logging.getLogger("vipo")


class Adapter(abc.ABC):
    arch = ""
    pipeline_class = ""          # diffusers pipeline class loaded with from_pretrained
    is_video = False
    true_cfg = True              # guidance_scale > 1 means classifier-free guidance
    vae_fp32 = False             # keep the VAE in fp32 whatever the weight dtype
    default_lora_targets: list = []

    def __init__(self, cfg, device: torch.device, weight_dtype: torch.dtype):
        """cfg: ModelConfig; weight_dtype: dtype of the frozen components (and of the
        transformer's base weights under LoRA; the trainer upcasts trained weights)."""
        self.cfg, self.device, self.weight_dtype = cfg, device, weight_dtype
        self.pipe = self.load_pipeline(cfg, weight_dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        if self.vae_fp32 and self.pipe.vae.dtype != torch.float32:
            self.pipe.vae.to(torch.float32)
        self.pipe.to(device)
        self.use_cfg = self.wants_cfg()

    def load_pipeline(self, cfg, weight_dtype: torch.dtype):
        """The diffusers pipeline of ``model.path`` (a subclass may adopt one built in
        memory instead: vipo.profile's random-weight real architectures)."""
        import diffusers

        pipeline_cls = getattr(diffusers, self.pipeline_class)
        # Weights only from safetensors (never pickles); hub code only when asked for.
        return pipeline_cls.from_pretrained(cfg.path, dtype=weight_dtype, use_safetensors=True,
                                            trust_remote_code=cfg.trust_remote_code)

    # ---- the interface: every adapter implements these four -------------------------------
    @abc.abstractmethod
    def encode_prompts(self, prompts: list) -> dict:
        """Prompt conditioning as a dict of (B, ...) tensors; with CFG also ``neg_*`` keys."""

    @abc.abstractmethod
    def latent_shape(self) -> tuple:
        """(C, H, W) or (C, T, H, W) of one sample in the loss layout."""

    @abc.abstractmethod
    def forward(self, model, latents, timesteps, cond: dict, negative: bool = False):
        """One transformer pass: latents (B, C, *S) fp32 and timesteps (B,) of 1000*sigma
        -> velocity (B, C, *S) fp32. ``negative`` selects the unconditional embeddings."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, *S) -> images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]."""

    # ---- what a pipeline may do differently (defaults: SD3, FLUX.1, Wan 2.1) ---------------
    def wants_cfg(self) -> bool:
        """Whether the pipeline would run true CFG at ``guidance_scale``."""
        return self.true_cfg and self.cfg.guidance_scale > 1.0

    def guide(self, v_cond, v_uncond, timesteps) -> torch.Tensor:
        """The pipeline's CFG combination of the two branches (loss layout, fp32)."""
        return v_uncond + self.cfg.guidance_scale * (v_cond - v_uncond)

    def pipeline_sigmas(self, num_steps: int) -> torch.Tensor:
        """(num_steps + 1,) float32 noise levels the pipeline's ``__call__`` would step
        through at the configured size (``sample.sigma_schedule=pipeline``)."""
        raise ValueError(f"sample.sigma_schedule=pipeline is not available for "
                         f"model.arch={self.arch}; use dance or diffusers")

    def scheduler_sigmas(self, num_steps: int, **kwargs) -> torch.Tensor:
        """The levels of a copy of the pipeline's scheduler after
        ``set_timesteps(num_steps, **kwargs)`` (the pipeline's own scheduler is untouched)."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return scheduler.sigmas.to(torch.float32)

    # ---- shared ---------------------------------------------------------------------------
    def packed_grid(self) -> tuple:
        """(H, W) latent sides of a model on 2x2 latent patches: the pipelines' rule, each
        side rounded down to an even number."""
        factor = self.pipe.vae_scale_factor
        return 2 * (self.cfg.height // (factor * 2)), 2 * (self.cfg.width // (factor * 2))

    def velocity(self, model, latents, timesteps, cond: dict) -> torch.Tensor:
        """Guided velocity (docs/method.md 7). With CFG the two branches are combined by
        ``guide`` (v = v_u + w (v_c - v_u) by default) and the unconditional one runs
        without grad, so the conditional output gets dv/dv_c dL/dv. Rollout and recompute
        both call this, so their paths are identical."""
        v_cond = self.forward(model, latents, timesteps, cond)
        if not self.use_cfg:
            return v_cond
        with torch.no_grad():
            v_uncond = self.forward(model, latents, timesteps, cond, negative=True)
        return self.guide(v_cond, v_uncond, timesteps)

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def negative_prompts(self, n: int) -> list:
        return [self.cfg.negative_prompt] * n

    @staticmethod
    def select(cond: dict, index) -> dict:
        """The conditioning of a subset of samples."""
        return {k: v[index] for k, v in cond.items()}

    @staticmethod
    def to_unit(pixels: torch.Tensor) -> torch.Tensor:
        """VAE output in [-1, 1] -> float32 in [0, 1]."""
        return (pixels.float() / 2 + 0.5).clamp(0, 1)
