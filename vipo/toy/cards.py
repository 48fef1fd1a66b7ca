"""``CARD.md`` of each shipped toy model, written from its ``training.json`` (what
``vipo.toy.pretrain`` did) and ``figures.json`` (what ``vipo.toy.measure`` measured)."""

from __future__ import annotations

import json
from pathlib import Path

from . import models

ABOUT = {
    "generator": (
        "Toy-world text-to-image generator: a diffusers `StableDiffusion3Pipeline` "
        "(SD3Transformer2DModel, 4 layers, width 128; two frozen random-weight "
        "CLIPTextModelWithProjection encoders behind a word-level tokenizer; a null T5 that "
        "outputs the zeros the pipeline uses without T5; an AutoencoderKL with 2x "
        "downsampling, 16 x 16 x 8 latents for 32 px images), pretrained by rectified flow "
        "on the toy world's training split.",
        "from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(\"{folder}\")\n"
        "image = pipe(\"a large blue triangle on a grey background, top left\", "
        "num_inference_steps=8, guidance_scale=1.0).images[0]"),
    "backbone": (
        "PSM backbone for the toy world: a transformers `Dinov2Model` (4 layers, width 64, "
        "patch 4: an 8 x 8 patch grid on 32 px), trained on the world's renders to classify "
        "the attributes from the CLS token and each patch's object coverage from its "
        "last-layer token (the features the PSM reads); the heads are discarded. Read its "
        "map IoU beside the random-weight figure below: on this world's flat-coloured "
        "images the PCA map of an untrained backbone of the same architecture already "
        "covers the object about as well, near the ceiling a perfect map reaches.",
        "from vipo.psm import PerceptualStructuringModule\n"
        "psm = PerceptualStructuringModule.from_pretrained(\"{folder}\")\n"
        "maps = psm(images, latent_size=(16, 16))   # images (B, 3, 32, 32) in [0, 1]"),
    "evaluator": (
        "Out-of-domain judge of the toy world: a transformers `ResNetForImageClassification` "
        "(3 basic stages, widths 32-64-128) whose 90 logits are the shape (5), colour (6), "
        "background (4), position (9) and size (2) heads and an 8 x 8 object mask. A "
        "different architecture from the PSM backbone, and never used to shape the maps.",
        "from vipo.toy.evaluator import ToyEvaluator\n"
        "scores = ToyEvaluator(\"{folder}\").score(images, specs)   # per-sample metrics"),
}


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _training_lines(info: dict) -> list[str]:
    keys = ("data", "steps", "seconds", "batch", "lr", "ema", "t", "seed", "machine")
    return [f"- {k}: {info[k]}" for k in keys if k in info]


def write_card(name: str, root: Path = models.ASSETS) -> Path:
    folder = root / name
    about, usage = ABOUT[name]
    lines = [f"# vipo toy {name}", "", about, "", "```python", usage.format(
        folder=f"vipo/toy/assets/{name}"), "```", "", "## Training", ""]
    lines += _training_lines(_read(folder / "training.json"))
    if name == "generator":
        lines += ["", "VAE (trained first):"] + _training_lines(
            _read(folder / "vae" / "training.json"))
    regenerate = f"`python -m vipo.toy.pretrain {name}`"
    if name == "generator":
        regenerate += " (the VAE first, then the transformer on its latents)"
    lines += ["", f"Regenerate: {regenerate}; `--steps N` repeats a step count above instead "
              f"of the time budget; measure: `python -m vipo.toy.measure {name}`.", "",
              "## Measured figures", "",
              "Held-out combinations only (never trained on); `figures.json` holds the values.",
              ""]
    figures = _read(folder / "figures.json")
    for section, values in figures.items():
        if isinstance(values, dict):
            lines.append(f"- {section}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
        else:
            lines.append(f"- {section}: {values}")
    if not figures:
        lines.append("- not measured yet")
    path = folder / "CARD.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def update_figures(name: str, section: str, values, root: Path = models.ASSETS) -> None:
    """Merges one measured section into ``figures.json`` and rewrites the card."""
    path = root / name / "figures.json"
    figures = _read(path)
    figures[section] = values
    path.write_text(json.dumps(figures, indent=1) + "\n")
    write_card(name, root)
