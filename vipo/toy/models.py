"""The toy world's models, as real diffusers / transformers classes built from small configs.

- generator: a ``StableDiffusion3Pipeline`` (SD3Transformer2DModel, two frozen random-weight
  CLIPTextModelWithProjection encoders behind a word-level tokenizer, no T5, and an
  AutoencoderKL with 2x downsampling trained on the world);
- backbone: a ``Dinov2Model`` for the PSM, trained on the world's attributes and masks;
- evaluator: a ``ResNetForImageClassification`` whose logits are the attribute heads and an
  8 x 8 object mask, with a different architecture from the backbone so ViPO is never
  judged by the network that shapes its maps.

The shipped weights live in ``vipo/toy/assets/<name>``, written by ``save_pretrained``
(safetensors) and read by the real ``from_pretrained``; ``python -m vipo.toy.pretrain``
regenerates them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import world

ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE_SIZE = 32
TEXT_LENGTH = 16          # CLIP tokens per prompt (the longest prompt has 14 with bos/eos)
MASK_GRID = 8             # the evaluator's object mask is predicted on an 8 x 8 grid
# eos id 3, not 2 (docs/toy_world.md, "Facts from the feasibility run")
SPECIALS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def asset(name: str) -> Path:
    """Folder of a shipped model: ``generator``, ``backbone`` or ``evaluator``."""
    folder = ASSETS / name
    if not (folder / "CARD.md").is_file():
        raise FileNotFoundError(f"toy asset {name!r} is missing at {folder} (no CARD.md); "
                                f"rebuild it with `python -m vipo.toy.pretrain {name}`")
    return folder


# ---- text -----------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    words = {w for s in world.all_specs() for w in world.prompt(s).replace(",", " ,").split()}
    return SPECIALS + sorted(words)


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` that adds bos/eos and pads to 16 tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "background," -> "background", ","
    bos, eos = SPECIALS[2], SPECIALS[3]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=TEXT_LENGTH)


def text_encoder(tok, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=TEXT_LENGTH, projection_dim=64,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    return CLIPTextModelWithProjection(config).eval()


# ---- generator parts ------------------------------------------------------------------------
def autoencoder():
    """2x downsampling (16 x 16 x 8 latents for 32 px), no mid-block attention: measured to
    keep the world's shapes (its ceiling is in the generator card)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                         sample_size=IMAGE_SIZE, mid_block_add_attention=False,
                         scaling_factor=1.0, shift_factor=0.0)


def transformer(seed: int = 0):
    """SD3 architecture at the size the feasibility run measured (docs/toy_world.md; width
    128, 4 layers): 8 x 8 tokens of 2 x 2 latent patches; the text stream is the two CLIP
    encoders' 64 + 64 widths."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=8,
                                 out_channels=8, num_layers=4, attention_head_dim=32,
                                 num_attention_heads=4, joint_attention_dim=128,
                                 caption_projection_dim=128, pooled_projection_dim=128,
                                 pos_embed_max_size=8)


def null_t5(tok):
    """A 1-layer T5 encoder whose final RMS-norm weight is zero, so it outputs exactly the
    zeros StableDiffusion3Pipeline substitutes for a missing T5. It is there so that a plain
    ``DiffusionPipeline.from_pretrained(folder)`` loads (a saved pipeline without T5 needs
    ``text_encoder_3=None, tokenizer_3=None`` passed, docs/toy_world.md); its d_model is the
    joint attention width the CLIP embeddings are padded to."""
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=128, d_kv=8, d_ff=8,
                                    num_layers=1, num_heads=1, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id, decoder_start_token_id=0))
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return model.eval()


def pipeline(vae, model, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = tokenizer()
    return StableDiffusion3Pipeline(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder(tok, seed + 1), tokenizer=tok,
        text_encoder_2=text_encoder(tok, seed + 2), tokenizer_2=tok,
        text_encoder_3=null_t5(tok), tokenizer_3=tok)


def load_pipeline(folder=None, device="cpu"):
    """The shipped generator through the plain diffusers call."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder or asset("generator")))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---- backbone and evaluator -----------------------------------------------------------------
N_CLASSES = {name: len(values) for name, values in world.ATTRIBUTES.items()}
N_ATTRIBUTE_LOGITS = sum(N_CLASSES.values())


def backbone_model(seed: int = 0):
    """Dinov2Model with patch 4: an 8 x 8 patch grid on 32 px images."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=128, patch_size=4,
                                    image_size=IMAGE_SIZE))


def evaluator_model(seed: int = 0):
    """ResNet (3 basic stages) with one logit per attribute class and per mask cell."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    labels = [f"{name}={value}" for name, values in world.ATTRIBUTES.items() for value in values]
    labels += [f"mask=r{r}c{c}" for r in range(MASK_GRID) for c in range(MASK_GRID)]
    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128],
                          depths=[1, 1, 1], layer_type="basic", downsample_in_first_stage=False,
                          num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)})
    return ResNetForImageClassification(config)


def split_logits(logits: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Evaluator logits (B, 26 + 64) -> ({attribute: (B, n_classes)}, mask logits (B, 8, 8))."""
    heads, start = {}, 0
    for name, n in N_CLASSES.items():
        heads[name] = logits[:, start:start + n]
        start += n
    return heads, logits[:, start:].reshape(-1, MASK_GRID, MASK_GRID)


def to_model_pixels(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the evaluator's input range [-1, 1]."""
    return images * 2.0 - 1.0


def mask_cells(masks: torch.Tensor) -> torch.Tensor:
    """(B, 32, 32) bool masks -> (B, 8, 8) bool cells at least half covered."""
    size = masks.shape[-1] // MASK_GRID
    return torch.nn.functional.avg_pool2d(masks[:, None].float(), size)[:, 0] >= 0.5
