"""Exact shortcut for SD3 pipelines without T5: the zero padding as one weighted token.

Without ``text_encoder_3``, ``StableDiffusion3Pipeline.encode_prompt`` appends
``max_sequence_length`` (256 by default) all-zero T5 tokens to the 2 x 77 (or fewer) CLIP
tokens. SD3's text stream has no positional embedding, so identical input tokens stay
identical through every block, and n identical keys/values in softmax attention act as one
key whose logit is raised by log(n). Replacing the n zero tokens by one token plus that
logit bias therefore gives the same velocity (up to rounding) at a fraction of the cost: at
the toy world's size the text stream shrinks from 272 to 17 tokens.

``RepeatedContextJointAttnProcessor`` is diffusers' ``JointAttnProcessor2_0`` (v0.42.1)
with one change: an additive key bias for the context tokens, passed per call as
``joint_attention_kwargs={"context_log_count": (S_ctx,) or (B, S_ctx) tensor}``. Without it
the processor is the stock one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0


class RepeatedContextJointAttnProcessor(JointAttnProcessor2_0):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 context_log_count: torch.Tensor | None = None, *args, **kwargs):
        if context_log_count is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    *args, **kwargs)
        batch, n_image = hidden_states.shape[:2]

        def heads(x):  # (B, L, H*D) -> (B, H, L, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)),
                             heads(attn.to_v(hidden_states)))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        c_query, c_key, c_value = (heads(attn.add_q_proj(encoder_hidden_states)),
                                   heads(attn.add_k_proj(encoder_hidden_states)),
                                   heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        query = torch.cat([query, c_query], dim=2)
        key = torch.cat([key, c_key], dim=2)
        value = torch.cat([value, c_value], dim=2)
        log_count = context_log_count.expand(batch, -1) if context_log_count.dim() == 1 \
            else context_log_count
        bias = torch.cat([log_count.new_zeros(batch, n_image), log_count], dim=1)  # (B, L)
        out = F.scaled_dot_product_attention(query, key, value,
                                             attn_mask=bias.to(query.dtype)[:, None, None, :])
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (B, L, H*D)
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, context


def compress_zero_tail(embeds: torch.Tensor, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) prompt embeddings whose last ``tail`` tokens are the pipeline's zero padding
    -> ((B, L - tail + 1, D) embeddings, (L - tail + 1,) log-counts: 0, ..., 0, log(tail)).
    Raises if the tail is not all zeros (then the shortcut would not be exact)."""
    if tail < 1 or embeds.shape[1] <= tail:
        raise ValueError(f"tail must be in [1, {embeds.shape[1] - 1}], got {tail}")
    if bool(embeds[:, -tail:].any()):
        raise ValueError("the last max_sequence_length prompt tokens are not all zero; the "
                         "repeated-context shortcut applies only to SD3 without T5")
    head = embeds[:, :embeds.shape[1] - tail + 1]
    log_count = torch.zeros(head.shape[1], dtype=torch.float32, device=embeds.device)
    log_count[-1] = math.log(tail)
    return head, log_count
