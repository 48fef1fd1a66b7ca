"""Z-Image (and Z-Image-Turbo): ZImageTransformer2DModel, a single-stream DiT over
lists of variable-length sequences, Qwen3 text encoder, the 16-channel FLUX.1 VAE.

Follows diffusers' ZImagePipeline.__call__ (v0.42.1):
  prompts    the pipeline's encode_prompt (chat template, second-to-last hidden state, one
             unpadded sequence per prompt), cut to ``max_sequence_length``;
  schedule   sigmas linspace(1, 1/N, N) (``get_default_z_image_sigmas``) through the
             pipeline's scheduler, with mu from the image token count (used only when the
             scheduler shifts dynamically), ``sigma_schedule=pipeline``;
  timestep   the model takes 1 - sigma ((1000 - t) / 1000) and predicts the negative of the
             velocity, which forward negates back;
  guidance   CFG when guidance_scale > 0 (Z-Image-Turbo runs 0: none), in the pipeline's
             form v_c + w (v_c - v_u); its defaults cfg_normalization=False and
             cfg_truncation=1 (neither changes anything) are the only ones supported;
  decoding   latents / scaling_factor + shift_factor.
Changed: the prompt sequences are stored zero-padded to ``max_sequence_length`` with their
lengths and cut back to the exact lengths for each pass (reading the lengths on the host,
one synchronisation per forward); the two CFG branches run as two passes (the pipeline
batches them), the unconditional one without grad.
"""

from __future__ import annotations

import torch

from .base import Adapter


class ZImageAdapter(Adapter):
    arch = "zimage"
    pipeline_class = "ZImagePipeline"
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # attention of every block

    def wants_cfg(self) -> bool:
        return self.cfg.guidance_scale > 0.0

    def guide(self, v_cond, v_uncond, timesteps):
        return v_cond + self.cfg.guidance_scale * (v_cond - v_uncond)

    @torch.no_grad()
    def encode_prompts(self, prompts: list) -> dict:
        # encode_prompt rewrites the lists it is given in place: pass copies.
        positive, negative = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=self.use_cfg,
            negative_prompt=self.negative_prompts(len(prompts)) if self.use_cfg else None,
            max_sequence_length=self.cfg.max_sequence_length)
        cond = self._padded(positive)
        if self.use_cfg:
            cond.update({f"neg_{k}": v for k, v in self._padded(negative).items()})
        return cond

    def _padded(self, sequences: list) -> dict:
        """[(L_i, D)] -> (B, max_sequence_length, D) zero-padded and (B,) lengths."""
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        padded = sequences[0].new_zeros(len(sequences), self.cfg.max_sequence_length,
                                        sequences[0].shape[1])
        for row, seq in zip(padded, sequences):
            row[:len(seq)] = seq
        return {"prompt_embeds": padded, "prompt_lengths": lengths}

    def latent_shape(self) -> tuple:
        return (self.transformer.config.in_channels, *self.packed_grid())

    def pipeline_sigmas(self, num_steps: int) -> torch.Tensor:
        from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift,
                                                                  get_default_z_image_sigmas)

        _, height, width = self.latent_shape()
        config = self.pipe.scheduler.config
        mu = calculate_shift((height // 2) * (width // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return self.scheduler_sigmas(num_steps, sigmas=get_default_z_image_sigmas(num_steps),
                                     mu=mu)

    def forward(self, model, latents, timesteps, cond, negative=False):
        prefix = "neg_" if negative else ""
        captions = [row[:n] for row, n in zip(cond[prefix + "prompt_embeds"],
                                              cond[prefix + "prompt_lengths"].tolist())]
        frames = list(latents.to(self.model_dtype).unsqueeze(2).unbind(0))  # B x (C, 1, H, W)
        out = model(frames, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # (B, C, H, W)

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return self.to_unit(vae.decode(latents.to(vae.dtype), return_dict=False)[0])
