"""Qwen-Image: QwenImageTransformer2DModel on packed 2x2 latent tokens, Qwen2.5-VL text
encoder, 3-D causal VAE used on single frames.

Follows diffusers' QwenImagePipeline.__call__ (v0.42.1):
  prompts    the pipeline's encode_prompt (its chat template, the template's first 34 tokens
             dropped, a padding mask), cut to ``max_sequence_length``;
  schedule   sigmas linspace(1, 1/N, N) through the pipeline's scheduler with mu from the
             image token count (``calculate_shift``), ``sample.sigma_schedule=pipeline``;
  timestep   sigma (the pipeline's t / 1000);
  guidance   true CFG when ``true_cfg_scale`` (here model.guidance_scale) > 1, the combination
             rescaled to the conditional branch's norm per packed token; no guidance input
             (Qwen-Image is not guidance-distilled);
  decoding   latents de-normalised with the VAE's latents_mean / latents_std, frame 0.
Changed: the loss sees unpacked (B, C, H, W) latents (packing is a permutation); prompt
embeddings are stored padded to ``max_sequence_length`` with their mask and cut back to the
longest prompt of each batch, which is what the pipeline pads to (the extra columns are
masked out of attention, so this is exact; finding that length reads the mask on the host,
one synchronisation per forward); the unconditional branch runs without grad.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Adapter


def pad_tokens(embeds: torch.Tensor, mask: torch.Tensor | None, length: int):
    """(B, L, D) embeddings and their (B, L) mask (None: all valid) -> zero-padded
    (B, length, D) embeddings and (B, length) long mask."""
    batch, tokens = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(batch, tokens, dtype=torch.long, device=embeds.device)
    padded = embeds.new_zeros(batch, length, embeds.shape[2])
    padded[:, :tokens] = embeds
    full = mask.new_zeros(batch, length)
    full[:, :tokens] = mask
    return padded, full.long()


def trim_tokens(embeds: torch.Tensor, mask: torch.Tensor):
    """Drops the trailing columns that are padding in every row; a mask of all ones
    becomes None, as the pipeline passes it."""
    length = int(mask.any(dim=0).nonzero().max()) + 1
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, None if bool(mask.all()) else mask


class QwenImageAdapter(Adapter):
    arch = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    # The joint attention's image and text projections.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                            "add_v_proj", "to_add_out"]

    def __init__(self, cfg, device, weight_dtype):
        super().__init__(cfg, device, weight_dtype)
        if self.transformer.config.guidance_embeds:
            raise ValueError("model.path: guidance-distilled Qwen-Image transformers "
                             "(guidance_embeds=True) are not supported by arch=qwenimage")

    @torch.no_grad()
    def encode_prompts(self, prompts: list) -> dict:
        cond = self._encode(list(prompts))
        if self.use_cfg:
            neg = self._encode(self.negative_prompts(len(prompts)))
            cond.update({f"neg_{k}": v for k, v in neg.items()})
        return cond

    def _encode(self, prompts: list) -> dict:
        length = self.cfg.max_sequence_length
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                               max_sequence_length=length)
        embeds, mask = pad_tokens(embeds, mask, length)
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def latent_shape(self) -> tuple:
        return (self.transformer.config.in_channels // 4, *self.packed_grid())

    def pipeline_sigmas(self, num_steps: int) -> torch.Tensor:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        _, height, width = self.latent_shape()
        config = self.pipe.scheduler.config
        mu = calculate_shift((height // 2) * (width // 2),
                             config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return self.scheduler_sigmas(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                                     mu=mu)

    def forward(self, model, latents, timesteps, cond, negative=False):
        from diffusers import QwenImagePipeline

        prefix = "neg_" if negative else ""
        embeds, mask = trim_tokens(cond[prefix + "prompt_embeds"], cond[prefix + "prompt_mask"])
        batch, channels, height, width = latents.shape
        packed = QwenImagePipeline._pack_latents(latents.to(self.model_dtype), batch, channels,
                                                 height, width)
        out = model(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                    encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                    img_shapes=[[(1, height // 2, width // 2)]] * batch,
                    return_dict=False)[0]  # (B, HW/4, 4C)
        return self._unpack(out.float(), height, width)

    def _unpack(self, tokens, height, width):
        from diffusers import QwenImagePipeline

        factor = self.pipe.vae_scale_factor
        return QwenImagePipeline._unpack_latents(tokens, height * factor, width * factor,
                                                 factor)[:, :, 0]  # (B, C, H, W)

    def guide(self, v_cond, v_uncond, timesteps):
        """The pipeline's CFG: v_u + w (v_c - v_u), rescaled per packed token (2x2 latent
        positions x C channels) to the norm of v_c."""
        from diffusers import QwenImagePipeline

        combined = v_uncond + self.cfg.guidance_scale * (v_cond - v_uncond)
        batch, channels, height, width = v_cond.shape

        def token_norm(x):  # (B, HW/4, 1)
            return torch.norm(QwenImagePipeline._pack_latents(x, batch, channels, height, width),
                              dim=-1, keepdim=True)

        ratio = token_norm(v_cond) / token_norm(combined)
        return combined * self._unpack(ratio.repeat(1, 1, 4 * channels), height, width)

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device,
                                                                          vae.dtype)
        latents = latents[:, :, None].to(vae.dtype) / inv_std + mean  # the pipeline's order
        return self.to_unit(vae.decode(latents, return_dict=False)[0][:, :, 0])
