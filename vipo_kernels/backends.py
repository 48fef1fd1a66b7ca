"""Backend registry (after Liger-Kernel's): a backend named explicitly raises if it is
unavailable, saying how to get it; ``auto`` picks one per device and logs the choice once.

A kernel backend is a module with the four primitives of ``triton_backend``:
``step``, ``log_prob``, ``loss_position`` and ``grad_sample``, taking (B, C, P) latents
whose positions have stride 1. ``torch`` is the reference and has no primitives:
the functional API calls ``reference.py`` directly for it.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("vipo_kernels")

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
_MODULES = {
    "triton": "vipo_kernels.triton_backend",
    "cpp": "vipo_kernels.cpp_backend",
    "cuda": "vipo_kernels.cuda_backend",
}
_HOW_TO_GET = {
    "triton": "pip install triton (and numpy); on CPU tensors also set TRITON_INTERPRET=1 "
              "before triton is imported",
    "cpp": "build the compiled extension: MAX_JOBS=2 pip install --no-build-isolation -e .",
    "cuda": "build the compiled extension on a machine where torch has CUDA and nvcc is on "
            "PATH: pip install --no-build-isolation -e .",
}
_DEVICES = {"triton": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",)}
_auto_logged: set[tuple[str, str]] = set()
_resolved: dict[tuple, ModuleType | None] = {}


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as err:
        raise RuntimeError(f"backend={name!r} is unavailable ({err}); to get it: "
                           f"{_HOW_TO_GET[name]}") from err


def available(name: str) -> bool:
    try:
        _import(name)
    except RuntimeError:
        return False
    return True


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        for name in ("triton", "cuda"):
            if available(name):
                return name
        return "torch"
    if device.type == "cpu" and available("cpp"):
        return "cpp"
    return "torch"


def resolve(backend: str, device: torch.device) -> ModuleType | None:
    """The primitives module for ``backend`` on ``device``, or None for the torch reference.
    Cached per (backend, device type): it runs on every kernel call."""
    key = (backend, device.type, os.environ.get("TRITON_INTERPRET"), *_MODULES.values())
    if key not in _resolved:
        _resolved[key] = _resolve(backend, device)
    return _resolved[key]


def _resolve(backend: str, device: torch.device) -> ModuleType | None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _auto(device)
        if (backend, device.type) not in _auto_logged:
            _auto_logged.add((backend, device.type))
            logger.info("vipo_kernels: backend='auto' chose %r for %s tensors", backend,
                        device.type)
    if backend == "torch":
        return None
    if device.type not in _DEVICES[backend]:
        raise ValueError(f"backend={backend!r} does not run on {device.type} tensors "
                         f"(supported: {', '.join(_DEVICES[backend])})")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported; use backend='torch' or 'cpp' on the CPU")
    return _import(backend)
