"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel, CLIP-L + CLIP-G (+ optional T5), VAE.

Follows diffusers' StableDiffusion3Pipeline.__call__ (v0.42.1): timestep = 1000*sigma
passed as is; latents scaled by 1/scaling_factor + shift_factor before decoding. Changed:
no scheduler object (the trainer owns the SDE step); CFG branches run as two passes so the
unconditional one can run without grad; the all-zero T5 tokens of a pipeline without T5 are
replaced by one token of the same attention weight (exact, ``repeated_context``).
"""

from __future__ import annotations

import torch

from .base import Adapter


class SD3Adapter(Adapter):
    arch = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    # Flow-GRPO's SD3.5 LoRA targets: the joint attention's image and text projections.
    default_lora_targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
                            "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q",
                            "attn.to_v"]

    @torch.no_grad()
    def encode_prompts(self, prompts: list) -> dict:
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=self.use_cfg,
            negative_prompt=self.negative_prompts(len(prompts)) if self.use_cfg else None,
            max_sequence_length=self.cfg.max_sequence_length)
        cond = {"prompt_embeds": embeds, "pooled": pooled}
        if self.use_cfg:
            cond.update(neg_prompt_embeds=neg_embeds, neg_pooled=neg_pooled)
        return self._compress_zero_tokens(cond)

    def _compress_zero_tokens(self, cond: dict) -> dict:
        """Without T5 (or with one that outputs zeros) the last max_sequence_length tokens
        are zeros: keep one, weighted by their count (vipo/adapters/repeated_context.py)."""
        from .repeated_context import RepeatedContextJointAttnProcessor, compress_zero_tail

        tail = self.cfg.max_sequence_length
        keys = [k for k in cond if k.endswith("prompt_embeds")]
        if any(cond[k].shape[1] <= tail or bool(cond[k][:, -tail:].any()) for k in keys):
            return cond
        if not getattr(self, "_repeated_context", False):
            self.transformer.set_attn_processor(RepeatedContextJointAttnProcessor())
            self._repeated_context = True
        for key in keys:
            cond[key], log_count = compress_zero_tail(cond[key], tail)
            cond[key.replace("prompt_embeds", "log_count")] = log_count.expand(
                cond[key].shape[0], -1)  # (B, S_ctx): one row per sample, like the embeds
        return cond

    def latent_shape(self) -> tuple:
        factor = self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels, self.cfg.height // factor,
                self.cfg.width // factor)

    def forward(self, model, latents, timesteps, cond, negative=False):
        prefix = "neg_" if negative else ""
        log_count = cond.get(prefix + "log_count")
        out = model(hidden_states=latents.to(self.model_dtype), timestep=timesteps,
                    encoder_hidden_states=cond[prefix + "prompt_embeds"],
                    pooled_projections=cond[prefix + "pooled"], return_dict=False,
                    joint_attention_kwargs=None if log_count is None else
                    {"context_log_count": log_count})[0]
        return out.float()

    @torch.no_grad()
    def decode(self, latents):
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return self.to_unit(vae.decode(latents.to(vae.dtype), return_dict=False)[0])
