"""FLUX.2 [klein]: Flux2Transformer2DModel on 2x2-patchified latent tokens, Qwen3 text
encoder, AutoencoderKLFlux2 with batch-norm latent statistics.

Follows diffusers' Flux2KleinPipeline.__call__ (v0.42.1):
  prompts    the pipeline's encode_prompt (chat template, hidden states 9, 18 and 27 of the
             text model stacked), padded to ``max_sequence_length``; 4-D text position ids;
  schedule   sigmas linspace(1, 1/N, N) through the pipeline's scheduler with mu from
             ``compute_empirical_mu`` (image token count and N), ``sigma_schedule=pipeline``;
  timestep   sigma (the pipeline's t / 1000), no guidance input;
  guidance   true CFG with guidance_scale > 1 against the empty prompt (the pipeline's only
             negative; model.negative_prompt defaults to it), off for step-distilled
             checkpoints (``is_distilled``), as in the pipeline;
  latents    the transformer works on (B, 4C, H/2, W/2) patchified latents normalised by the
             VAE's batch-norm statistics; decoding de-normalises and unpatchifies them.
Changed: the loss sees them unpatchified, (B, C, H, W) on the VAE's latent grid (a
permutation, like FLUX.1's unpacking); the unconditional branch runs without grad.
Flux2Pipeline (FLUX.2 [dev], Mistral text encoder, guidance-distilled) is not served here.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .base import Adapter

logger = logging.getLogger("vipo")


class Flux2Adapter(Adapter):
    arch = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    # Attention of the double-stream blocks (image and text) and the fused projection of
    # the single-stream blocks.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                            "add_v_proj", "to_add_out", "to_qkv_mlp_proj"]

    def wants_cfg(self) -> bool:
        distilled = bool(self.pipe.config.get("is_distilled", False))
        if distilled and self.cfg.guidance_scale > 1.0:
            logger.warning("model.guidance_scale=%s is ignored: this FLUX.2 [klein] checkpoint "
                           "is step-distilled (no CFG), as in its pipeline",
                           self.cfg.guidance_scale)
        return self.cfg.guidance_scale > 1.0 and not distilled

    @torch.no_grad()
    def encode_prompts(self, prompts: list) -> dict:
        cond = {"prompt_embeds": self._encode(list(prompts))}
        if self.use_cfg:
            cond["neg_prompt_embeds"] = self._encode(self.negative_prompts(len(prompts)))
        return cond

    def _encode(self, prompts: list) -> torch.Tensor:
        embeds, _text_ids = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.cfg.max_sequence_length)
        return embeds  # (B, L, 3D); the text ids are rebuilt from L in forward

    def latent_shape(self) -> tuple:
        return (self.transformer.config.in_channels // 4, *self.packed_grid())

    def pipeline_sigmas(self, num_steps: int) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        _, height, width = self.latent_shape()
        sigmas = None if self.pipe.scheduler.config.get("use_flow_sigmas") else \
            np.linspace(1.0, 1 / num_steps, num_steps)
        mu = compute_empirical_mu(image_seq_len=(height // 2) * (width // 2),
                                  num_steps=num_steps)
        return self.scheduler_sigmas(num_steps, sigmas=sigmas, mu=mu)

    def forward(self, model, latents, timesteps, cond, negative=False):
        from diffusers import Flux2KleinPipeline as P

        embeds = cond[("neg_" if negative else "") + "prompt_embeds"]
        patches = P._patchify_latents(latents.to(self.model_dtype))  # (B, 4C, H/2, W/2)
        batch, channels, height, width = patches.shape
        tokens = P._pack_latents(patches)  # (B, HW/4, 4C), row-major like the ids
        out = model(hidden_states=tokens, timestep=timesteps / 1000, guidance=None,
                    encoder_hidden_states=embeds,
                    txt_ids=P._prepare_text_ids(embeds).to(latents.device),
                    img_ids=P._prepare_latent_ids(patches).to(latents.device),
                    return_dict=False)[0]
        out = out[:, :tokens.shape[1]].transpose(1, 2).reshape(batch, channels, height, width)
        return P._unpatchify_latents(out.float())  # (B, C, H, W)

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Loss-layout latents -> what the VAE decodes (the pipeline's output_type='latent'):
        batch-norm statistics applied in the patchified layout, then unpatchified."""
        from diffusers import Flux2KleinPipeline as P

        bn, eps = self.pipe.vae.bn, self.pipe.vae.config.batch_norm_eps
        patches = P._patchify_latents(latents)
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(patches.device, patches.dtype)
        return P._unpatchify_latents(patches * std + mean)

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        pixels = vae.decode(self.vae_latents(latents.float()).to(vae.dtype), return_dict=False)[0]
        return self.to_unit(pixels)
