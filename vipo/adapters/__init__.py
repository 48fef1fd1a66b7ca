"""Diffusers model adapters (one file per model family); see base.py for the interface."""

import importlib

from .base import Adapter

# arch -> (module, class), imported lazily so that only the chosen model's code loads.
# vipo.config.ARCHS lists the same names (config imports no model code).
_ADAPTERS = {"sd3": ("sd3", "SD3Adapter"), "flux": ("flux", "FluxAdapter"),
             "wan": ("wan", "WanAdapter"), "qwenimage": ("qwenimage", "QwenImageAdapter"),
             "flux2": ("flux2", "Flux2Adapter"), "zimage": ("zimage", "ZImageAdapter"),
             "wan22": ("wan22", "Wan22Adapter")}
ARCHS = tuple(_ADAPTERS)


def get_adapter(arch: str) -> type[Adapter]:
    """The adapter class for ``arch``."""
    if arch not in _ADAPTERS:
        raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    module, name = _ADAPTERS[arch]
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["ARCHS", "Adapter", "get_adapter"]
