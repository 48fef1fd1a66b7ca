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
        import diffusers

        self.cfg, self.device, self.weight_dtype = cfg, device, weight_dtype
        pipeline_cls = getattr(diffusers, self.pipeline_class)
        # Weights only from safetensors (never pickles); hub code only when asked for.
        self.pipe = pipeline_cls.from_pretrained(cfg.path, dtype=weight_dtype,
                                                 use_safetensors=True,
                                                 trust_remote_code=cfg.trust_remote_code)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        if self.vae_fp32 and self.pipe.vae.dtype != torch.float32:
            self.pipe.vae.to(torch.float32)
        self.pipe.to(device)
        self.use_cfg = self.true_cfg and cfg.guidance_scale > 1.0

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

    # ---- shared ---------------------------------------------------------------------------
    def velocity(self, model, latents, timesteps, cond: dict) -> torch.Tensor:
        """Guided velocity (METHOD.md 7). With CFG, v = v_u + w (v_c - v_u) and the
        unconditional branch runs without grad, so the conditional output gets w dL/dv.
        Rollout and recompute both call this, so their paths are identical."""
        v_cond = self.forward(model, latents, timesteps, cond)
        if not self.use_cfg:
            return v_cond
        with torch.no_grad():
            v_uncond = self.forward(model, latents, timesteps, cond, negative=True)
        return v_uncond + self.cfg.guidance_scale * (v_cond - v_uncond)

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
