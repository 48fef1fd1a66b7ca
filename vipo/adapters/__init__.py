"""Diffusers model adapters (one file per model family); see base.py for the interface."""

from .base import Adapter, get_adapter

__all__ = ["Adapter", "get_adapter"]
