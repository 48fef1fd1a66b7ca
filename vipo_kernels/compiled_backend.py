"""``backend="cpp"`` and ``backend="cuda"``: the compiled ``torch.ops.vipo`` ops of csrc/
(OpenMP kernels for CPU tensors, CUDA kernels for CUDA tensors), as ``KernelBackend``s.

The ops write into outputs allocated here (``new_buffer``, so the test suite's NaN
poisoning reaches them) and take ``block_p``, the positions one task (CPU) or one thread
block (CUDA) owns. The two devices differ in three things only: the block size, the
reduction of the loss partials (a compiled op on the CPU, ``partials.reduce_partials`` on
CUDA, which needs no host sync), and the dtype mixes the CUDA kernels are instantiated for.
Importing this module loads the extension, so an unbuilt extension is an ImportError, which
``backends`` turns into an error that says how to build it.
"""

from __future__ import annotations

import abc

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.vipo)
from .autograd import with_gradient
from .buffers import new_buffer
from .partials import N_COLUMNS, N_STATS, reduce_partials

ops = torch.ops.vipo


def _blocks(P: int, block_p: int) -> int:
    return -(-P // block_p)


class CompiledBackend(abc.ABC):
    """The primitives of ``backends.KernelBackend`` over ``torch.ops.vipo``."""

    @abc.abstractmethod
    def block_positions(self, B: int, C: int, P: int, device: torch.device) -> int:
        """Positions per task (CPU) or thread block (CUDA)."""

    @abc.abstractmethod
    def _reduce(self, partials, adv, weights, std, positions, adv_clip, kl_coef):
        """The loss partials -> the (N_STATS + K,) statistics, raising on bad values."""

    def _inputs(self, v, z, x, ref):
        """(x, ref) as the kernels take them."""
        return x, ref

    def step(self, v, z, noise, cs, co, std, *, next_out=None, logp_out=None):
        B, C, P = z.shape
        if next_out is None:
            next_out = new_buffer((B, C, P), z.dtype, z.device)
        if logp_out is None:
            logp_out = new_buffer((B, P), torch.float32, z.device)
        noise, _ = self._inputs(v, z, noise, None)
        ops.step(v, z, noise, cs, co, std, next_out, logp_out,
                 self.block_positions(B, C, P, z.device))
        return next_out, logp_out

    def log_prob(self, v, z, x, cs, co, std, *, logp_out=None):
        B, C, P = z.shape
        if logp_out is None:
            logp_out = new_buffer((B, P), torch.float32, z.device)
        x, _ = self._inputs(v, z, x, None)
        ops.log_prob(v, z, x, cs, co, std, logp_out, self.block_positions(B, C, P, z.device))
        return logp_out

    def loss_position(self, v, z, x, old, adv, weights, amap, cs, co, std, ref, grad, *,
                      clip_range, adv_clip, kl_coef, partials_out=None):
        """(loss, the (N_STATS + K,) statistics of ``partials``); dL/dv into ``grad`` if
        given, and then the loss is differentiable in ``v``."""
        B, C, P = z.shape
        block_p = self.block_positions(B, C, P, z.device)
        if partials_out is None:
            partials_out = new_buffer((B, _blocks(P, block_p), N_COLUMNS), torch.float32,
                                      z.device)
        x, ref = self._inputs(v, z, x, ref)
        with torch.no_grad():
            ops.loss_position(v, z, x, old, adv, weights, amap, cs, co, std, ref, grad,
                              partials_out, clip_range, adv_clip, kl_coef, block_p)
            stats = self._reduce(partials_out, adv, weights, std, P, adv_clip, kl_coef)
        return with_gradient(v, stats, grad, self.scale_grad)

    def grad_sample(self, v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef, kl_out=None):
        """(B, n_blocks) KL sums; dlogp[b] * dl/dv (+ the KL gradient) into ``grad``."""
        B, C, P = z.shape
        block_p = self.block_positions(B, C, P, z.device)
        if kl_out is None:
            kl_out = new_buffer((B, _blocks(P, block_p)), torch.float32, z.device)
        x, ref = self._inputs(v, z, x, ref)
        with torch.no_grad():
            ops.grad_sample(v, z, x, dlogp, cs, co, std, ref, grad, kl_out, kl_coef, block_p)
        return kl_out

    def scale_grad(self, grad, dloss):
        ops.scale_grad(grad, dloss.detach().to(torch.float32))
        return grad


class CpuBackend(CompiledBackend):
    """Threads follow ``torch.set_num_threads``; the result does not depend on their
    number, since every block of positions is summed by one thread in a fixed order."""

    def block_positions(self, B: int, C: int, P: int, device=None) -> int:
        """Positions per task. Long blocks: each task streams C rows of block_p contiguous
        values per tensor, and short rows (a few KB) starve the hardware prefetcher. Measured
        on the development machine (2 threads, fused loss and step, the block_p giving the
        lowest time): 4096 at the Flux size (P = 4096) and 8192 at the Wan size (P = 21840);
        1024, the earlier choice, was 1.1x (Flux loss) to 2x (Wan step) slower. So about 128k
        elements per task, halved while there are fewer than 8 tasks to share out; a
        multiple of 16 for the vector loops; at most P. It never depends on the thread count,
        so neither does the result (the blocks' partial sums are what rounding depends on)."""
        block_p = max(16, (131072 // max(C, 1)) // 16 * 16)
        while block_p > 256 and B * -(-P // block_p) < 8:
            block_p //= 2
        return max(1, min(block_p, P))

    def _reduce(self, partials, adv, weights, std, positions, adv_clip, kl_coef):
        stats = new_buffer((N_STATS + adv.shape[-1],), torch.float32, partials.device)
        ops.reduce_partials(partials, adv, weights, std, stats, positions, adv_clip, kl_coef)
        return stats

    def loss_position(self, v, z, x, old, adv, weights, amap, cs, co, std, ref, grad, *,
                      clip_range, adv_clip, kl_coef, partials_out=None):
        """With a gradient to write, one op whose autograd is C++ (``vipo::fused_loss``): the
        Python wrapper around the kernel cost about a third of the kernel's time here."""
        if grad is None:
            return super().loss_position(v, z, x, old, adv, weights, amap, cs, co, std, ref,
                                         grad, clip_range=clip_range, adv_clip=adv_clip,
                                         kl_coef=kl_coef, partials_out=partials_out)
        B, C, P = z.shape
        block_p = self.block_positions(B, C, P, z.device)
        if partials_out is None:
            partials_out = new_buffer((B, _blocks(P, block_p), N_COLUMNS), torch.float32,
                                      z.device)
        stats = new_buffer((N_STATS + adv.shape[-1],), torch.float32, z.device)  # op checks adv
        loss = ops.fused_loss(v, z, x, old, adv, weights, amap, cs, co, std, ref, grad,
                              partials_out, stats, clip_range, adv_clip, kl_coef, block_p)
        return loss, stats


VEC = 4  # positions per CUDA thread (csrc/cuda/vipo_cuda.h kVecPositions)


class CudaBackend(CompiledBackend):
    """The kernels are compiled for two dtypes each launch: the model's (v and ref) and the
    latents' (z and x / noise), so 9 instantiations cover every realistic mix. A rarer mix
    (x or noise not in z's dtype, ref not in v's) is converted here first, at the cost of
    one copy of that tensor."""

    def __init__(self):
        self._sms: dict[int, int] = {}

    def block_positions(self, B: int, C: int, P: int, device: torch.device) -> int:
        """Positions per thread block: VEC per thread, 32 to 256 threads. The largest block
        that still gives about 4 blocks per SM, so small latents fill the GPU. A heuristic,
        not tuned on hardware (benchmarks/gpu_table.py times it)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._sms:
            self._sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        for threads in (256, 128, 64):
            if B * -(-P // (threads * VEC)) >= 4 * self._sms[index]:
                return threads * VEC
        return 32 * VEC

    def _inputs(self, v, z, x, ref):
        return _like(x, z.dtype), _like(ref, v.dtype)

    def _reduce(self, partials, adv, weights, std, positions, adv_clip, kl_coef):
        return reduce_partials(partials, adv, weights, std, positions=positions,
                               adv_clip=adv_clip, kl_coef=kl_coef)


def _like(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def load(device_type: str) -> CompiledBackend:
    """The backend for ``"cpu"`` or ``"cuda"``; ImportError where the extension was built
    without CUDA kernels (torch without CUDA, or no nvcc at build time)."""
    if device_type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("vipo::step", "CUDA"):
            raise ImportError("vipo_kernels._C was built without CUDA kernels (torch "
                              f"{torch.__version__} without CUDA, or no nvcc at build time)")
        return _BACKENDS.setdefault("cuda", CudaBackend())
    return _BACKENDS.setdefault("cpu", CpuBackend())


_BACKENDS: dict[str, CompiledBackend] = {}
