"""The embedded tiny world: random-weight diffusers/transformers components built in code.

Every builder creates real library classes from small configs (sizes from
docs/environment.md, adjusted where noted) and writes them with ``save_pretrained``, so
the trainer and the tests load them back through the same ``from_pretrained`` path a hub
checkpoint takes. Nothing is downloaded; tokenizers are built from an in-code character
vocabulary.

Weights are random: the tiny default shows the RL machinery working (a rule reward going
up), not image quality. A later issue gives it pretrained weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

# Byte-level alphabet (GPT-2's bytes_to_unicode): CLIP's ByteLevel pre-tokenizer maps every
# byte to one of these characters, so a vocabulary over them covers any input text.
_PRINTABLE = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
    list(range(ord("®"), ord("ÿ") + 1))


def _byte_alphabet() -> list[str]:
    chars, n = [], 0
    for b in range(256):
        if b in _PRINTABLE:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


_CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
# Token length of the character-level tokenizers and the tiny text encoders' position
# tables: long enough for the built-in prompts, one token per character.
TEXT_LENGTH = 64


def clip_tokenizer():
    """A CLIPTokenizer over single byte-level characters (no merges), built without files."""
    from transformers import CLIPTokenizer

    chars = _byte_alphabet()
    vocab = {tok: i for i, tok in enumerate(_CLIP_SPECIALS + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_LENGTH)


def t5_tokenizer():
    """A T5Tokenizer (Unigram) over printable characters, built without files."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    printable = [chr(c) for c in range(33, 127)]
    pieces += [(c, -2.0) for c in printable] + [("▁" + c, -1.5) for c in printable]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TEXT_LENGTH)


def _clip_text_config(tokenizer, hidden=32, projection=32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=TEXT_LENGTH, projection_dim=projection,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _t5_config(tokenizer, d_model):
    from transformers import T5Config

    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                    num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                    decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)


def _image_vae(latent_channels: int, *, shift: float | None):
    """AutoencoderKL with 3 down blocks (8x) and narrow channels: docs/environment.md's
    (32,32,64,64) costs seconds per decode on 2 cores; (8,16,16,16) keeps the 8x factor of
    the real VAEs."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                         norm_num_groups=8, sample_size=64, scaling_factor=1.5305,
                         shift_factor=shift)
    # Output gain: a freshly initialised decoder maps every latent to near mid-grey (pixel
    # std ~0.05), so no latent is much redder than another (measured: optimising the latents
    # directly for redness reaches only +0.05). Scaling its last conv by 8 gives decodes that
    # span the colour range (pixel std ~0.4; the same optimisation reaches +0.34).
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(8.0)
    return vae


def _write(folder: Path, pipe) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sd3(folder, *, seed: int = 0, with_t5: bool = True) -> Path:
    """Tiny StableDiffusion3Pipeline: two CLIP text encoders with projection, optional T5."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    # CLIP hidden states (32 + 32) are zero-padded to the T5 width, so T5 must be >= 64 wide.
    # 4 latent channels (SD3 itself has 16): fewer latent dimensions per reward make the
    # tiny default's policy gradient less noisy.
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4,
                                        num_layers=2, attention_head_dim=16,
                                        num_attention_heads=2, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64,
                                        out_channels=4, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(4, shift=0.0609),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tok)), tokenizer_2=tok,
        text_encoder_3=T5EncoderModel(_t5_config(t5_tok, 64)) if with_t5 else None,
        tokenizer_3=t5_tok if with_t5 else None)
    return _write(Path(folder), pipe)


def build_flux(folder, *, seed: int = 0) -> Path:
    """Tiny FluxPipeline: 16 latent channels packed 2x2 into 64, guidance embedding on."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                        vae=_image_vae(16, shift=0.1159),
                        text_encoder=CLIPTextModel(_clip_text_config(tok)), tokenizer=tok,
                        text_encoder_2=T5EncoderModel(_t5_config(t5_tok, 32)),
                        tokenizer_2=t5_tok)
    return _write(Path(folder), pipe)


def _wan_transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                 attention_head_dim=12, in_channels=16, out_channels=16,
                                 text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def build_wan(folder, *, seed: int = 0, boundary_ratio: float | None = None,
              shift: float = 8.0) -> Path:
    """Tiny WanPipeline: UMT5 text encoder, 3-D transformer, causal video VAE (4x in time).
    With ``boundary_ratio`` (Wan 2.2) a second transformer of the same shape is the
    low-noise expert ``transformer_2``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    t5_tok = t5_tokenizer()
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(t5_tok), d_model=16, d_kv=8, d_ff=32,
                                       num_layers=2, num_heads=2,
                                       relative_attention_num_buckets=8,
                                       pad_token_id=t5_tok.pad_token_id,
                                       eos_token_id=t5_tok.eos_token_id,
                                       decoder_start_token_id=0))
    transformer = _wan_transformer()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    experts = {}
    if boundary_ratio is not None:
        experts = {"transformer_2": _wan_transformer(), "boundary_ratio": boundary_ratio}
    pipe = WanPipeline(tokenizer=t5_tok, text_encoder=text, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **experts)
    return _write(Path(folder), pipe)


def build_wan22(folder, *, seed: int = 0) -> Path:
    """Tiny Wan 2.2 text-to-video (A14B layout): two experts switching at Wan 2.2's
    boundary_ratio 0.875, shift 12 (its text-to-video sampling shift). The real checkpoint
    ships UniPC; the tiny one FlowMatchEuler, which the Euler/SDE rollout reproduces."""
    return build_wan(folder, seed=seed, boundary_ratio=0.875, shift=12.0)


# ---- the newer generators: LLM text encoders (Qwen2.5-VL, Qwen3) with a byte-level tokenizer ----
# A Qwen3-style chat template, enough for the pipelines' apply_chat_template calls
# (Flux2KleinPipeline passes enable_thinking=False, which adds the empty think block).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")


# Whole-word tokens for the words of Qwen-Image's prompt template, so that the template's
# head is 34 tokens long as with the real tokenizer (QwenImagePipeline drops exactly 34).
# Words after a space are tokens with the space, as in byte-level BPE.
_QWEN_WORDS = ("system user assistant Describe", " the image by detailing color shape size "
               "texture quantity text spatial relationships of objects and background")


def _word_merges(lines) -> tuple[list, list]:
    """Byte-level BPE merges that build each word of ``lines`` (those of the second with
    their leading space) from its characters, left to right; returns (tokens, merges)."""
    pieces = lines[0].split() + ["\u0120" + w for w in lines[1].split()]  # U+0120: a space
    tokens, merges = [], []
    for piece in pieces:
        for i in range(1, len(piece)):
            if (piece[:i], piece[i]) not in merges:
                merges.append((piece[:i], piece[i]))
                tokens.append(piece[:i + 1])
    return tokens, merges


def qwen_tokenizer():
    """A Qwen2Tokenizer over byte-level characters plus the words of Qwen-Image's template,
    with Qwen's chat markers as special tokens and a chat template; pads with <|endoftext|>."""
    from transformers import Qwen2Tokenizer

    words, merges = _word_merges(_QWEN_WORDS)
    vocab = {c: i for i, c in enumerate(_byte_alphabet() + words)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _qwen_text_fields(tok, *, hidden: int, layers: int) -> dict:
    """The text-model fields shared by the tiny Qwen2.5-VL and Qwen3 configs."""
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                head_dim=hidden // 2, max_position_embeddings=1024,
                bos_token_id=tok.pad_token_id, eos_token_id=tok.pad_token_id,
                pad_token_id=tok.pad_token_id)


def _qwen3(tok, *, hidden: int, layers: int, causal_lm: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(**_qwen_text_fields(tok, hidden=hidden, layers=layers))
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def _random_stats(n: int, seed: int) -> tuple[list, list]:
    """Per-channel latent mean and std (random, so the de-normalisation before decoding is
    exercised by the parity tests rather than being the identity)."""
    gen = torch.Generator().manual_seed(seed)
    mean = (0.5 * torch.randn(n, generator=gen)).tolist()
    std = (0.5 + torch.rand(n, generator=gen)).tolist()
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def build_qwenimage(folder, *, seed: int = 0) -> Path:
    """Tiny QwenImagePipeline: Qwen2.5-VL text encoder (2 layers, width 16, a 1-layer vision
    tower it never uses for text), 3-D causal VAE with 8x spatial compression, 16 latent
    channels packed 2x2 into 64 as in Qwen-Image. The scheduler is Qwen-Image's: dynamic
    exponential shift from the image token count, stretched to end at 0.02."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImagePipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    last = len(tok) - 1  # the vision token ids must lie in the vocabulary; text never has them
    text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={**_qwen_text_fields(tok, hidden=16, layers=2),
                     "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 16},
        vocab_size=len(tok), image_token_id=last, video_token_id=last,
        vision_start_token_id=last, vision_end_token_id=last))
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16,
                                              num_layers=2, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    mean, std = _random_stats(16, seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=mean,
                                 latents_std=std)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
        time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok,
                             transformer=transformer)
    return _write(Path(folder), pipe)


def build_flux2_klein(folder, *, seed: int = 0) -> Path:
    """Tiny Flux2KleinPipeline: Qwen3ForCausalLM text encoder (28 layers of width 16: the
    pipeline stacks hidden states 9, 18 and 27), AutoencoderKLFlux2 with 8 latent channels
    (FLUX.2 has 32) patchified 2x2 into 32, batch-norm statistics randomised, no guidance
    embedding (klein base runs true CFG)."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler,
                           Flux2KleinPipeline, Flux2Transformer2DModel)

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    text = _qwen3(tok, hidden=16, layers=28, causal_lm=True)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=1,
                                          num_single_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                             latent_channels=8, norm_num_groups=8, sample_size=64)
    mean, std = _random_stats(32, seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.tensor(mean))
        vae.bn.running_var.copy_(torch.tensor(std) ** 2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok,
                              transformer=transformer, is_distilled=False)
    return _write(Path(folder), pipe)


def build_zimage(folder, *, seed: int = 0) -> Path:
    """Tiny ZImagePipeline: Qwen3Model text encoder (3 layers of width 16; the pipeline takes
    the second-to-last hidden state), the 16-channel image VAE, a single-stream transformer
    of width 32; Z-Image's scheduler (static shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    text = _qwen3(tok, hidden=16, layers=3, causal_lm=False)
    transformer = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=2,
                                           n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=16, axes_dims=[4, 6, 6],
                                           axes_lens=[512, 64, 64])
    with torch.no_grad():  # zero-initialised in diffusers; random so that padding matters
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          vae=_image_vae(16, shift=0.1159), text_encoder=text, tokenizer=tok,
                          transformer=transformer)
    return _write(Path(folder), pipe)


def build_dinov2(folder, *, seed: int = 0, patch_size: int = 8) -> Path:
    """Tiny Dinov2Model (hidden 32, 2 layers) with its image processor, for the PSM.

    patch_size 8 instead of DINOv2's 14 gives a 8x8 patch grid on 64 px images."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, patch_size=patch_size, image_size=64))
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_center_crop=False).save_pretrained(folder)
    return folder


def build_clip(folder, *, seed: int = 0) -> Path:
    """Tiny CLIPModel + CLIPProcessor for the clip_score and pickscore rewards."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPVisionConfig)

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    config = CLIPConfig(text_config=_clip_text_config(tok).to_dict(),
                        vision_config=vision.to_dict(), projection_dim=32)
    folder = Path(folder)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "wan": build_wan, "qwenimage": build_qwenimage,
            "flux2": build_flux2_klein, "zimage": build_zimage, "wan22": build_wan22}


def default_cache() -> Path:
    return Path(os.environ.get("VIPO_TINY_CACHE", Path.home() / ".cache" / "vipo" / "tiny"))


# Bumped whenever a builder changes, so that caches built by older code are rebuilt.
CACHE_VERSION = "2"
MARKER = "TINY_WORLD"


def _cached(folder: Path, build) -> Path:
    """``folder`` built by ``build(folder)``, reused only when its marker names this
    CACHE_VERSION. The build goes to a temporary sibling that is renamed into place after
    the marker is written, so a build cut short is never mistaken for a finished one."""
    marker = folder / MARKER
    if marker.is_file() and marker.read_text().split("\n")[0] == f"version {CACHE_VERSION}":
        return folder
    tmp = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / MARKER).write_text(f"version {CACHE_VERSION}\nrandom weights, built by vipo.tiny\n")
    shutil.rmtree(folder, ignore_errors=True)  # an older version, or a half-written folder
    os.replace(tmp, folder)
    return folder


def ensure_world(arch: str, root=None) -> Path:
    """Folder of the tiny ``arch`` pipeline (a key of BUILDERS), built on first
    use (and rebuilt when half-written or from another CACHE_VERSION)."""
    if arch not in BUILDERS:
        raise ValueError(f"tiny world arch must be one of {sorted(BUILDERS)}, got {arch!r}")
    return _cached(Path(root or default_cache()) / arch, BUILDERS[arch])


def ensure_backbone(root=None) -> Path:
    """Folder of the tiny DINOv2 backbone, cached like ensure_world."""
    return _cached(Path(root or default_cache()) / "dinov2", build_dinov2)
