"""Heat-map overlays of allocation maps on images, for logs and figures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Anchor colours of a blue -> cyan -> green -> yellow -> red ramp (the classic "jet" order),
# interpolated linearly; written here so the package needs no matplotlib.
_RAMP = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.9, 0.9], [0.2, 0.9, 0.2],
                      [1.0, 0.9, 0.0], [1.0, 0.3, 0.0], [0.6, 0.0, 0.0]])


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """(...,) values in [0, 1] -> (..., 3) RGB in [0, 1] along the ramp."""
    ramp = _RAMP.to(values.device)
    position = values.clamp(0, 1) * (len(ramp) - 1)
    low = position.floor().long().clamp(max=len(ramp) - 2)
    frac = (position - low)[..., None]
    return ramp[low] * (1 - frac) + ramp[low + 1] * frac


def overlay(images: torch.Tensor, maps: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """Blends each map, resized to its image, onto the image as a heat map.

    Args:
        images: (B, 3, h, w) floats in [0, 1].
        maps: (B, H, W) allocation maps; min-max scaled per image for display, so "mean_one"
            and "floor" maps show the same layout as "minmax" ones.
        alpha: weight of the heat colours.

    Returns:
        (B, h, w, 3) uint8 on the CPU; `PIL.Image.fromarray(out[i].numpy())` saves it.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, h, w) tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps must be a (B, H, W) tensor with B={images.shape[0]}, got "
                         f"{getattr(maps, 'shape', type(maps).__name__)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    images = images.detach().float().clamp(0, 1)
    maps = maps.detach().float()[:, None]
    lo = maps.amin((2, 3), keepdim=True)
    span = maps.amax((2, 3), keepdim=True) - lo
    # A constant map (e.g. the all-ones fallback) is shown at its own value, not as zeros.
    scaled = torch.where(span > 1e-8, (maps - lo) / span.clamp_min(1e-8), maps.clamp(0, 1))
    maps = F.interpolate(scaled, size=images.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]                         # (B, h, w)
    blended = (1 - alpha) * images.permute(0, 2, 3, 1) + alpha * heat_colours(maps)
    return (blended * 255).round().clamp(0, 255).to(torch.uint8).cpu()
