"""Frozen vision backbones from transformers, as patch-feature extractors.

`load_backbone(name_or_path)` reads the checkpoint's config, picks the family by `model_type`
and returns a `Backbone` whose `__call__(images)` maps (B, 3, h, w) floats in [0, 1] to
patch features (B, N, D) fp32 and the patch grid (h_p, w_p). The grid always comes from the
config (patch size, image size) or from the spatial shape of a convolutional feature map,
never from factoring the token count. transformers is imported here only, and lazily.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Family:
    """How one transformers model family turns pixels into a patch grid.

    layout: "tokens" (ViT-style sequence: prefix tokens, then patches in row-major order),
        "conv" (a (B, C, h, w) feature map is the grid) or "sam" (fixed square input; the
        image is resized so its longest side fills it, then zero-padded).
    prefix: CLS token count; register tokens are added from the config.
    mean, std: used when the checkpoint has no preprocessor_config.json; they are the
        defaults of the family's public checkpoints (the processor class defaults can differ,
        e.g. BitImageProcessor, which DINOv2 uses, defaults to the CLIP statistics).
    """
    model_class: str
    layout: str
    prefix: int = 0
    interpolate: bool = False     # pass interpolate_pos_encoding=True (native resolution)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


FAMILIES = {
    "dinov2": Family("Dinov2Model", "tokens", prefix=1),        # always interpolates
    "dinov2_with_registers": Family("Dinov2WithRegistersModel", "tokens", prefix=1),
    "vit": Family("ViTModel", "tokens", prefix=1, interpolate=True, mean=HALF, std=HALF),
    "clip": Family("CLIPVisionModel", "tokens", prefix=1, interpolate=True, mean=CLIP_MEAN,
                   std=CLIP_STD),
    "clip_vision_model": Family("CLIPVisionModel", "tokens", prefix=1, interpolate=True,
                                mean=CLIP_MEAN, std=CLIP_STD),
    "siglip": Family("SiglipVisionModel", "tokens", interpolate=True, mean=HALF, std=HALF),
    "siglip_vision_model": Family("SiglipVisionModel", "tokens", interpolate=True, mean=HALF,
                                  std=HALF),
    "resnet": Family("ResNetModel", "conv"),
    "convnext": Family("ConvNextModel", "conv"),
    "convnextv2": Family("ConvNextV2Model", "conv"),
    "sam": Family("SamVisionModel", "sam"),
    "sam_vision_model": Family("SamVisionModel", "sam"),
}


class BackboneLoadError(OSError):
    """A backbone name or folder that could not be loaded (offline, missing, unsupported)."""


def _load_config(name_or_path: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if os.path.isdir(name_or_path):
            hint = "the folder has no loadable config.json; pass the local path of a folder "
            hint += "written by save_pretrained (or downloaded from the hub)"
        elif os.path.isabs(name_or_path) or name_or_path.startswith("."):
            hint = "no such folder; pass the local path of a saved checkpoint"
        else:
            hint = ("it is not in the local cache and the hub cannot be reached (offline, "
                    "HF_HUB_OFFLINE=1). Download it on a machine with network access, e.g. "
                    f"`hf download {name_or_path} --local-dir DIR`, and pass the local path "
                    "DIR instead")
        raise BackboneLoadError(f"could not load backbone {name_or_path!r}: {hint} "
                                f"({reason})") from error


def _processor_stats(name_or_path: str, family: Family) -> tuple[tuple, tuple]:
    """image_mean / image_std from the checkpoint's preprocessor_config.json if it has one."""
    from transformers.image_processing_base import ImageProcessingMixin
    try:
        stats, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except OSError:
        stats = {}
    mean, std = stats.get("image_mean"), stats.get("image_std")
    if mean is None or std is None:
        logger.info("%s has no preprocessor mean/std; using the %s defaults", name_or_path,
                    family.model_class)
        return family.mean, family.std
    return tuple(mean), tuple(std)


def load_backbone(name_or_path: str, *, dtype: torch.dtype = torch.float32, device=None,
                  image_size=None, image_mean=None, image_std=None,
                  random_init: int | None = None) -> "Backbone":
    """Loads a frozen backbone (eval, requires_grad False) in `dtype` on `device`.

    random_init: instead of the checkpoint's weights, the same architecture with the
    initial weights of that seed (the global RNG is left as it was); the preprocessing
    still comes from the checkpoint. The control that shows what the training added."""
    name_or_path = str(name_or_path)
    config = _load_config(name_or_path)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise BackboneLoadError(f"unsupported backbone model_type {config.model_type!r} in "
                                f"{name_or_path!r}; supported: {sorted(FAMILIES)}")
    import transformers
    model_class = getattr(transformers, family.model_class)
    try:
        if random_init is None:
            model = model_class.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random_init)
                model = model_class(config).to(dtype)
    except OSError as error:
        raise BackboneLoadError(f"could not load the weights of {name_or_path!r}: {error}. "
                                f"Pass a local path that holds them.") from error
    model = model.eval().requires_grad_(False).to(device)
    mean, std = _processor_stats(name_or_path, family)
    return Backbone(model, family, mean=image_mean or mean, std=image_std or std,
                    image_size=image_size, dtype=dtype)


class Backbone:
    """A frozen model plus the preprocessing and token bookkeeping of its family."""

    def __init__(self, model, family: Family, *, mean, std, image_size=None, dtype=torch.float32):
        self.model, self.family, self.dtype = model, family, dtype
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.image_size = None if image_size is None else _size_pair(image_size)
        config = model.config
        self.patch_size = getattr(config, "patch_size", None)
        self.prefix = family.prefix + int(getattr(config, "num_register_tokens", 0) or 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "Backbone":
        self.model.to(device)
        return self

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, h, w) in [0, 1] -> features (B, N, D) fp32, grid (h_p, w_p)."""
        images = images.float()
        if self.image_size is not None:
            images = _resize(images, self.image_size)
        if self.family.layout == "sam":
            return self._sam(images)
        pixels = self._normalise(images).to(self.dtype)
        if self.family.layout == "conv":
            feature_map = self.model(pixel_values=pixels).last_hidden_state        # (B, D, h, w)
            return feature_map.flatten(2).mT.float(), tuple(feature_map.shape[-2:])
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        if min(grid) < 1:
            raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than the "
                             f"backbone's patch size {self.patch_size}")
        kwargs = {"interpolate_pos_encoding": True} if self.family.interpolate else {}
        tokens = self.model(pixel_values=pixels, **kwargs).last_hidden_state     # (B, L, D)
        expected = self.prefix + grid[0] * grid[1]
        if tokens.shape[1] != expected:
            raise RuntimeError(f"{self.family.model_class} returned {tokens.shape[1]} tokens; the "
                               f"config implies {self.prefix} prefix + {grid[0]}x{grid[1]} patches")
        return tokens[:, self.prefix:].float(), grid

    def _sam(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        # SAM's absolute position embedding fixes the input at image_size^2. Like SamProcessor:
        # resize the longest side to image_size (int(x * scale + 0.5)), normalise, zero-pad
        # bottom/right. Keep the patches that contain image pixels (ceil).
        side = self.model.config.image_size
        h, w = images.shape[-2:]
        scale = side / max(h, w)
        resized = (int(h * scale + 0.5), int(w * scale + 0.5))
        pixels = self._normalise(_resize(images, resized))
        pixels = F.pad(pixels, (0, side - resized[1], 0, side - resized[0])).to(self.dtype)
        feature_map = self.model(pixel_values=pixels).last_hidden_state          # (B, D, s, s)
        stride = side // feature_map.shape[-1]
        grid = (math.ceil(resized[0] / stride), math.ceil(resized[1] / stride))
        return feature_map[..., :grid[0], :grid[1]].flatten(2).mT.float(), grid


def _size_pair(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"image_size must be an int or (height, width), got {size!r}")
    return pair


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
