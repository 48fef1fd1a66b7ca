"""Wan 2.1 text-to-video: WanTransformer3DModel, UMT5 text encoder, causal video VAE.

Follows diffusers' WanPipeline.__call__ (v0.42.1): timestep = 1000*sigma per sample;
true CFG with the negative prompt; latents de-normalised with the VAE's per-channel
latents_mean / latents_std before decoding; the VAE is kept in fp32, as the diffusers Wan
examples load it. Changed: the two CFG branches run as separate passes and the
unconditional one without grad (docs/method.md 7); frames come back as (B, F, 3, H, W).
"""

from __future__ import annotations

import torch

from .base import Adapter


class WanAdapter(Adapter):
    arch = "wan"
    pipeline_class = "WanPipeline"
    is_video = True
    vae_fp32 = True
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]

    @torch.no_grad()
    def encode_prompts(self, prompts: list) -> dict:
        embeds, neg_embeds = self.pipe.encode_prompt(
            prompt=list(prompts),
            negative_prompt=self.negative_prompts(len(prompts)) if self.use_cfg else None,
            do_classifier_free_guidance=self.use_cfg,
            max_sequence_length=self.cfg.max_sequence_length, device=self.device,
            dtype=self.weight_dtype)
        cond = {"prompt_embeds": embeds}
        if self.use_cfg:
            cond["neg_prompt_embeds"] = neg_embeds
        return cond

    def latent_shape(self) -> tuple:
        temporal, spatial = self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial
        return (self.transformer.config.in_channels, (self.cfg.num_frames - 1) // temporal + 1,
                self.cfg.height // spatial, self.cfg.width // spatial)

    def forward(self, model, latents, timesteps, cond, negative=False):
        prefix = "neg_" if negative else ""
        out = model(hidden_states=latents.to(self.model_dtype), timestep=timesteps,
                    encoder_hidden_states=cond[prefix + "prompt_embeds"], return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
        return self.to_unit(video).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W) -> (B, F, 3, H, W)
