"""PerceptualStructuringModule: decoded images or videos -> allocation maps at latent size."""

from __future__ import annotations

import logging

import torch

from .maps import (_int_tuple, _pair, allocation_maps_from_features, check_map_options,
                   video_maps_from_features)

logger = logging.getLogger(__name__)


def _check_pixels(images, name: str, rank: int, layout: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(images).__name__}")
    if images.ndim != rank or images.shape[-3] != 3:
        raise ValueError(f"{name} must be {layout} with 3 colour channels, got shape "
                         f"{tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got {images.dtype}")
    if images.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")
    lo, hi = images.aminmax()
    if not (lo >= 0 and hi <= 1):      # also false for NaN
        raise ValueError(f"{name} must hold values in [0, 1], got min {lo.item():.4g}, "
                         f"max {hi.item():.4g}")


class PerceptualStructuringModule:
    """Frozen backbone + batched PCA map stage (docs/method.md section 6).

    maps = psm(images, latent_size=(H, W))            # (B, 3, h, w) in [0, 1] -> (B, H, W)
    maps = psm.video(frames, latent_size=(T, H, W))   # (B, F, 3, h, w) -> (B, T, H, W)

    A backbone that raises, or returns non-finite features for a sample, gives that sample an
    all-ones map (plain GRPO weighting; unchanged by every map_norm) and adds one to
    `failures` per sample (docs/method.md 6).
    Input errors are not failures: they raise ValueError before the backbone runs.
    """

    def __init__(self, backbone, *, chunk_size: int | None = None, **map_options):
        """backbone: callable (B, 3, h, w) -> (features (B, N, D), grid (h_p, w_p)), usually
        from vipo.psm.backbones.load_backbone. chunk_size: images per backbone call (bounds
        memory for long videos); None runs the whole batch at once."""
        self.map_options = check_map_options(**map_options)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.backbone, self.chunk_size = backbone, chunk_size
        self.failures = 0

    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype: torch.dtype = torch.float32, device=None,
                        image_size=None, image_mean=None, image_std=None,
                        chunk_size: int | None = None, random_init: int | None = None,
                        **map_options):
        """Loads a backbone (hub id or local folder) with transformers' from_pretrained.

        Supported model_types: dinov2, dinov2_with_registers, vit, clip(_vision_model),
        siglip(_vision_model), resnet, convnext, convnextv2, sam(_vision_model); full CLIP,
        SigLIP and SAM checkpoints load their vision tower. Images run at native resolution
        unless image_size=(h, w) (or an int) is given; SAM always uses its fixed square input.
        image_mean / image_std override the checkpoint's processor statistics.
        random_init: the same architecture with that seed's initial weights instead of the
        checkpoint's (a control; see load_backbone).
        map_options: n_components, aggregation, sigma, normalize, floor, pca_solver.
        """
        from .backbones import load_backbone
        options = check_map_options(**map_options)     # fail fast, before loading weights
        backbone = load_backbone(name_or_path, dtype=dtype, device=device, image_size=image_size,
                                 image_mean=image_mean, image_std=image_std,
                                 random_init=random_init)
        return cls(backbone, chunk_size=chunk_size, **options)

    def to(self, device) -> "PerceptualStructuringModule":
        self.backbone.to(device)
        return self

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
        """Backbone features (B, N, D) fp32, or (None, None) if the backbone raised."""
        device = getattr(self.backbone, "device", images.device)
        if device != images.device:
            raise ValueError(f"images are on {images.device} but the backbone is on {device}; "
                             f"call psm.to({str(images.device)!r}) first")
        try:
            chunks = images.split(self.chunk_size or images.shape[0])
            outputs = [self.backbone(chunk) for chunk in chunks]
        except ValueError:
            raise                     # input errors (e.g. images smaller than a patch) propagate
        except Exception as error:  # noqa: BLE001 - docs/method.md 6: a failure falls back to ones
            logger.warning("PSM backbone failed on %d images (%s: %s); using all-ones maps",
                           images.shape[0], type(error).__name__, error)
            return None, None
        return torch.cat([features for features, _ in outputs]), outputs[0][1]

    def __call__(self, images: torch.Tensor, latent_size) -> torch.Tensor:
        """(B, 3, h, w) floats in [0, 1] -> (B, H, W) fp32 maps on the images' device."""
        _check_pixels(images, "images", 4, "(B, 3, h, w)")
        latent_size = _pair(latent_size, "latent_size")
        features, grid = self._features(images)
        if features is None:
            self.failures += images.shape[0]
            return torch.ones(images.shape[0], *latent_size, device=images.device)
        bad = self._mark_bad(features, (1, 2))
        maps = allocation_maps_from_features(features, grid, latent_size, **self.map_options)
        maps[bad] = 1.0     # zeroed features already give ones; kept explicit
        return maps

    def video(self, frames: torch.Tensor, latent_size, *, temporal_sigma: float = 0.3,
              joint_pca: bool = False) -> torch.Tensor:
        """(B, F, 3, h, w) floats in [0, 1] -> (B, T, H, W) fp32 maps (docs/method.md 6, Video)."""
        _check_pixels(frames, "frames", 5, "(B, F, 3, h, w)")
        latent_size = _int_tuple(latent_size, "latent_size", 3)
        batch, n_frames = frames.shape[:2]
        features, grid = self._features(frames.flatten(0, 1))
        if features is None:
            self.failures += batch
            return torch.ones(batch, *latent_size, device=frames.device)
        features = features.view(batch, n_frames, *features.shape[1:])       # (B, F, N, D)
        bad = self._mark_bad(features, (1, 2, 3))
        maps = video_maps_from_features(features, grid, latent_size, temporal_sigma=temporal_sigma,
                                        joint_pca=joint_pca, **self.map_options)
        maps[bad] = 1.0
        return maps

    def _mark_bad(self, features: torch.Tensor, dims) -> torch.Tensor:
        """Zeroes the samples (whole clips for video) with non-finite features, in place, so
        the map stage sees valid input, and counts them as failures."""
        bad = ~torch.isfinite(features).all(dim=dims)                         # (B,)
        if bad.any():
            count = int(bad.sum())
            logger.warning("PSM backbone gave non-finite features for %d samples; using "
                           "all-ones maps", count)
            self.failures += count
            features[bad] = 0.0
        return bad
