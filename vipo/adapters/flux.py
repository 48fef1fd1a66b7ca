"""FLUX.1: FluxTransformer2DModel on packed 2x2 latent tokens, CLIP-L pooled + T5 text.

Follows diffusers' FluxPipeline.__call__ (v0.42.1): packs (B, C, H, W) latents to
(B, HW/4, 4C) tokens with ``FluxPipeline._pack_latents``, passes timestep = sigma (the
pipeline's ``t / 1000``) and, for guidance-distilled checkpoints (FLUX.1-dev), the guidance
scale as a model input. Changed: the output is unpacked back to (B, C, H, W) with
``_unpack_latents`` so the loss sees per-position latents (docs/method.md 2); no true CFG.
"""

from __future__ import annotations

import logging

import torch

from .base import Adapter

logger = logging.getLogger("vipo")


class FluxAdapter(Adapter):
    arch = "flux"
    pipeline_class = "FluxPipeline"
    true_cfg = False  # FLUX.1-dev is guidance-distilled: one pass with the scale as input
    default_lora_targets = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj",
                            "add_v_proj", "to_add_out"]

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        self.guidance = bool(self.transformer.config.guidance_embeds)
        if not self.guidance and cfg.guidance_scale != 1.0:
            logger.warning("model.guidance_scale=%s is ignored: this Flux checkpoint has no "
                           "guidance embedding", cfg.guidance_scale)

    @torch.no_grad()
    def encode_prompts(self, prompts: list) -> dict:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device,
            max_sequence_length=self.cfg.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def latent_shape(self) -> tuple:
        return (self.transformer.config.in_channels // 4, *self.packed_grid())

    def forward(self, model, latents, timesteps, cond, negative=False):
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        dtype, device = self.model_dtype, latents.device
        packed = FluxPipeline._pack_latents(latents.to(dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2,
                                                           device, dtype)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        guidance = (torch.full((batch,), self.cfg.guidance_scale, device=device,
                               dtype=torch.float32) if self.guidance else None)
        out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                    pooled_projections=cond["pooled"],
                    encoder_hidden_states=cond["prompt_embeds"], txt_ids=text_ids,
                    img_ids=image_ids, return_dict=False)[0]  # (B, HW/4, 4C)
        factor = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * factor, width * factor,
                                            factor).float()  # (B, C, H, W)

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return self.to_unit(vae.decode(latents.to(vae.dtype), return_dict=False)[0])
