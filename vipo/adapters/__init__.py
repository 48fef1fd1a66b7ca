"""Diffusers model adapters (one file per model family); see base.py for the interface."""

from .base import Adapter

ARCHS = ("sd3", "flux", "wan")


def get_adapter(arch: str) -> type[Adapter]:
    """The adapter class for ``arch``; imported lazily so that only its model code loads."""
    if arch == "sd3":
        from .sd3 import SD3Adapter as cls
    elif arch == "flux":
        from .flux import FluxAdapter as cls
    elif arch == "wan":
        from .wan import WanAdapter as cls
    else:
        raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    return cls


__all__ = ["ARCHS", "Adapter", "get_adapter"]
