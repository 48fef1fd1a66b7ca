"""Perceptual Structuring Module (docs/method.md section 6): per-pixel allocation maps for ViPO.

    from vipo.psm import allocation_maps_from_features, PerceptualStructuringModule, overlay

Importing this package loads only torch; transformers is imported when a backbone is loaded.
"""

from .maps import allocation_maps_from_features, video_maps_from_features
from .module import PerceptualStructuringModule
from .overlay import overlay

__all__ = ["allocation_maps_from_features", "video_maps_from_features",
           "PerceptualStructuringModule", "overlay"]
