"""The toy world's judges: the evaluator's metrics and the PSM map's overlap with the object.

``ToyEvaluator`` wraps the shipped ResNet (never the PSM backbone) and scores images
against the specs of their prompts: prompt fidelity (shape, colour, position, background
and size accuracy) and structure (IoU of its predicted 8 x 8 object mask against the
rendered mask of the same spec).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import models, world

FIDELITY_ATTRIBUTES = ("shape", "colour", "position", "background")


class ToyEvaluator:
    def __init__(self, folder=None, device="cpu"):
        from transformers import ResNetForImageClassification

        self.model = ResNetForImageClassification.from_pretrained(
            str(folder or models.asset("evaluator"))).to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(B, 3, 32, 32) in [0, 1] -> ({attribute: (B,) class index}, (B, 8, 8) bool mask)."""
        if images.shape[-2:] != (models.IMAGE_SIZE, models.IMAGE_SIZE):
            images = F.interpolate(images, size=(models.IMAGE_SIZE,) * 2, mode="bilinear",
                                   antialias=True, align_corners=False)
        logits = self.model(models.to_model_pixels(images.to(self.device).float())).logits
        heads, mask_logits = models.split_logits(logits.float().cpu())
        return {k: v.argmax(dim=1) for k, v in heads.items()}, mask_logits > 0

    def score(self, images: torch.Tensor, specs: list) -> dict:
        """Per-sample metrics, each (B,) float32: ``<attribute>_acc`` for the five
        attributes, ``fidelity`` (mean of the shape, colour, position and background
        accuracies) and ``structure_iou``."""
        predicted, mask = self.predict(images)
        truth = torch.tensor([list(s.labels().values()) for s in specs])  # (B, 5)
        out = {f"{name}_acc": (predicted[name] == truth[:, i]).float()
               for i, name in enumerate(world.ATTRIBUTES)}
        out["fidelity"] = torch.stack([out[f"{a}_acc"] for a in FIDELITY_ATTRIBUTES]).mean(0)
        true_cells = models.mask_cells(world.render_batch(specs, models.IMAGE_SIZE)[1])
        out["structure_iou"] = iou(mask, true_cells)
        return out


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) bool masks -> (B,) intersection over union (1 where both are empty)."""
    a, b = a.flatten(1), b.flatten(1)
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def map_top_iou(maps: torch.Tensor, masks: torch.Tensor, top: float = 0.3) -> torch.Tensor:
    """IoU of each map's top ``top`` share of pixels with the object mask (B,).

    maps (B, h, w) at latent size are resized (bilinear) to the mask's pixel grid first;
    the top share is the k = round(top * pixels) highest values (ties broken by order)."""
    size = masks.shape[-2:]
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                       align_corners=False)[:, 0].flatten(1)
    k = round(top * up.shape[1])
    chosen = torch.zeros_like(up, dtype=torch.bool)
    chosen.scatter_(1, up.topk(k, dim=1).indices, True)
    return iou(chosen, masks.flatten(1).bool())
