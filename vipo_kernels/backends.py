"""Backend registry (after Liger-Kernel's): a backend named explicitly raises if it is
unavailable, saying how to get it; ``auto`` picks one per device and logs the choice once.

A kernel backend implements ``KernelBackend``, five primitives on (B, C, P) latents whose
positions have stride 1: the ``triton_backend`` module, and the ``compiled_backend``
objects for ``cpp`` and ``cuda``. ``torch`` is the reference and has no primitives: the
functional API calls ``reference.py`` directly for it.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Protocol, runtime_checkable

import torch

logger = logging.getLogger("vipo_kernels")


@runtime_checkable
class KernelBackend(Protocol):
    """The primitives of a kernel backend. Latents v (model output), z (sample), x (next
    sample) and ref are (B, C, P); cs, co, std and dlogp (B,) fp32; old, amap (B, P) fp32;
    adv (B, K) fp32 unclipped and weights (K,) fp32. Outputs are allocated by the primitive
    (``buffers.new_buffer``) unless passed in; ``grad`` (B, C, P) contiguous in v's dtype,
    or None. Each launcher checks its arguments, naming the one that is wrong."""

    def step(self, v, z, noise, cs, co, std, *, next_out=None, logp_out=None):
        """(next sample (B, C, P) in z's dtype, its (B, P) fp32 log-prob)."""

    def log_prob(self, v, z, x, cs, co, std, *, logp_out=None):
        """(B, P) fp32 channel-summed log-density of x."""

    def loss_position(self, v, z, x, old, adv, weights, amap, cs, co, std, ref, grad, *,
                      clip_range, adv_clip, kl_coef):
        """The position-level loss in one pass: dL/dv into ``grad``; returns (loss, the
        (N_STATS + K,) fp32 statistics of ``partials.STATS``), raising on a bad value. With
        ``grad`` the loss is differentiable in ``v``, and its backward scales ``grad``."""

    def grad_sample(self, v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef):
        """dlogp[b] dl/dv + the KL gradient into ``grad``; returns (B, n_blocks) KL sums."""

    def scale_grad(self, grad, dloss):
        """grad * dloss (in place), without reading dloss on the host."""


BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
# Module, and for the compiled ones the device type its ``load`` takes.
_MODULES = {
    "triton": ("vipo_kernels.triton_backend", None),
    "cpp": ("vipo_kernels.compiled_backend", "cpu"),
    "cuda": ("vipo_kernels.compiled_backend", "cuda"),
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
_resolved: dict[tuple, KernelBackend | None] = {}


def _import(name: str) -> KernelBackend:
    module, device_type = _MODULES[name]
    try:
        loaded = importlib.import_module(module)
        return loaded if device_type is None else loaded.load(device_type)
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


def resolve(backend: str, device: torch.device) -> KernelBackend | None:
    """The primitives for ``backend`` on ``device``, or None for the torch reference.
    Cached per (backend, device type): it runs on every kernel call (tests that change
    the registry clear ``_resolved``)."""
    key = (backend, device.type)
    if key not in _resolved:
        _resolved[key] = _resolve(backend, device)
    return _resolved[key]


def _resolve(backend: str, device: torch.device) -> KernelBackend | None:
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
