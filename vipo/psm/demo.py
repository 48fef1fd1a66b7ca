"""Regenerates docs/images/psm_overlay.png:  python -m vipo.psm.demo [OUTPUT.png]

No pretrained backbone can be downloaded on the development machine, so the picture runs the
full PerceptualStructuringModule path (save_pretrained -> from_pretrained -> preprocessing ->
PCA maps -> overlay) with a tiny DINOv2 of random weights (hidden size 64, 2 layers, patch 14)
on synthetic images: a bright disc, a square and a ring on smooth textured backgrounds. A
random ViT is roughly a random projection of each patch's pixels, so the map separates regions
by colour statistics, not semantics; a pretrained DINOv2-L gives semantic maps.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from . import PerceptualStructuringModule, overlay

SIZE = 224            # 16 x 16 patches of 14 px
LATENT = (28, 28)     # a 224 px image in an 8x-downsampling VAE


def synthetic_images(size: int = SIZE) -> torch.Tensor:
    """(3, 3, size, size) in [0, 1]: three subjects on low-frequency textured backgrounds."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    texture = 0.5 + 0.08 * torch.sin(7 * x + 3 * y) * torch.cos(5 * y - 2 * x)
    backgrounds = [torch.stack([0.30 + 0.2 * texture, 0.45 + 0.2 * texture, 0.35 + 0.1 * y]),
                   torch.stack([0.55 + 0.1 * x, 0.50 + 0.2 * texture, 0.60 + 0.1 * texture]),
                   torch.stack([0.25 + 0.2 * texture, 0.30 + 0.1 * x, 0.50 + 0.2 * texture])]
    disc = ((x + 0.15) ** 2 + (y - 0.1) ** 2 < 0.35 ** 2)
    square = (x.abs() < 0.3) & ((y + 0.2).abs() < 0.4)
    radius = ((x - 0.2) ** 2 + y ** 2).sqrt()
    ring = (radius > 0.25) & (radius < 0.5)
    colours = [(0.95, 0.75, 0.20), (0.85, 0.15, 0.15), (0.95, 0.95, 0.90)]
    images = []
    for background, mask, colour in zip(backgrounds, [disc, square, ring], colours):
        subject = torch.tensor(colour).view(3, 1, 1) * (0.9 + 0.1 * texture)
        images.append(torch.where(mask, subject, background))
    return torch.stack(images).clamp(0, 1)


def tiny_random_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, patch_size=14, image_size=SIZE)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def make_figure(output: Path) -> Path:
    from PIL import Image
    images = synthetic_images()
    with tempfile.TemporaryDirectory() as tmp:
        psm = PerceptualStructuringModule.from_pretrained(tiny_random_dinov2(Path(tmp) / "dinov2"))
        maps = psm(images, latent_size=LATENT)
    heat = overlay(images, maps)                                          # (B, h, w, 3) uint8
    plain = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    gap = torch.full((SIZE, 8, 3), 255, dtype=torch.uint8)
    rows = [torch.cat([plain[i], gap, heat[i]], dim=1) for i in range(len(images))]
    spacer = torch.full((8, rows[0].shape[1], 3), 255, dtype=torch.uint8)
    grid = torch.cat([part for row in rows for part in (row, spacer)][:-1], dim=0)
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(output)
    return output


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/psm_overlay.png")
    print(make_figure(target))
