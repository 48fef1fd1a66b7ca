"""Triton kernels and launchers for the SDE step, the log-prob and the fused loss.

Every kernel sees latents as (B, C, P): P is the flattened image or video grid and
must have stride 1 (the launchers copy otherwise); batch and channel strides are
free. One program owns one sample and BLOCK_P positions with *all* C channels in a
(BLOCK_C, BLOCK_P) register tile, so the channel sum of a position's log-density,
its ratio, its clip decision and its gradient come out of one read of memory.

All arithmetic is fp32 (inputs are converted on load, which is also what lets bf16
run under the Triton interpreter). Offsets are int64. Per-run hyperparameters are
constexpr (a recompile per new value, and the values are fixed for a run); the 1/(B|P|)
scale changes with the shape, so it is a runtime fp32 argument.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .autograd import with_gradient
from .buffers import new_buffer
from .partials import COLUMN, N_COLUMNS, reduce_partials

# Constexprs: compiled Triton refuses plain Python globals inside kernels (the interpreter
# does not, which is why vipo_kernels/triton_compile_check.py exists).
HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))
# The loss partials' row (partials.COLUMNS), by name.
ROW = tl.constexpr(N_COLUMNS)
SURROGATE_UPPER = tl.constexpr(COLUMN["surrogate_upper"])
SURROGATE_LOWER = tl.constexpr(COLUMN["surrogate_lower"])
KL = tl.constexpr(COLUMN["kl"])
N_LOW = tl.constexpr(COLUMN["n_low"])
N_HIGH = tl.constexpr(COLUMN["n_high"])
LOG_RATIO_SQ = tl.constexpr(COLUMN["log_ratio_sq"])
RATIO_SUM = tl.constexpr(COLUMN["ratio_sum"])
RATIO_MIN = tl.constexpr(COLUMN["ratio_min"])
RATIO_MAX = tl.constexpr(COLUMN["ratio_max"])
BAD_OLD = tl.constexpr(COLUMN["bad_old"])
BAD_MAP = tl.constexpr(COLUMN["bad_map"])
FLOAT_MAX = tl.constexpr(3.4028234663852886e38)
LATENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per (BLOCK_C, BLOCK_P) tile; tests shrink the CPU budget to force many blocks.
TILE_BUDGET = {"cpu": 1 << 16, "gpu": 2048}


@triton.jit
def _program_tile(n_blocks, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's sample b, its channel and position offsets and their masks.

    A 1-D grid, because the second grid dimension of a CUDA launch stops at 65535 and the
    batch must not."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_blocks
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = (pid % n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    mask = (offs_c[:, None] < C) & mask_p[None, :]
    return b, offs_c, offs_p, mask_p, mask


@triton.jit
def _load_tile(ptr, b, stride_b, stride_c, offs_c, offs_p, mask):
    """(BLOCK_C, BLOCK_P) fp32 tile of sample b; positions have stride 1."""
    ptrs = ptr + b * stride_b + offs_c[:, None] * stride_c + offs_p[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gaussian_step_kernel(
    next_ptr, logp_ptr,  # outputs: (B, C, P) next sample (written only if SAMPLE_NOISE), (B, P) fp32
    v_ptr, z_ptr, x_ptr,  # model output, sample, and the noise (SAMPLE_NOISE) or the next sample
    cs_ptr, co_ptr, std_ptr,  # (B,) fp32 step coefficients
    stride_vb, stride_vc, stride_zb, stride_zc, stride_xb, stride_xc, stride_nb, stride_nc,
    C, P, n_blocks,
    SAMPLE_NOISE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, offs_c, offs_p, mask_p, mask = _program_tile(n_blocks, C, P, BLOCK_C, BLOCK_P)

    cs = tl.load(cs_ptr + b)
    co = tl.load(co_ptr + b)
    std = tl.load(std_ptr + b)
    v = _load_tile(v_ptr, b, stride_vb, stride_vc, offs_c, offs_p, mask)
    z = _load_tile(z_ptr, b, stride_zb, stride_zc, offs_c, offs_p, mask)
    x = _load_tile(x_ptr, b, stride_xb, stride_xc, offs_c, offs_p, mask)
    mean = cs * z + co * v
    if SAMPLE_NOISE:
        nxt = (mean + std * x).to(next_ptr.dtype.element_ty)
        tl.store(next_ptr + b * stride_nb + offs_c[:, None] * stride_nc + offs_p[None, :], nxt,
                 mask=mask)
        # The log-prob is of the stored (rounded) value, so a later recompute matches it.
        x = nxt.to(tl.float32)
    diff = tl.where(mask, x - mean, 0.0)
    sq = tl.sum(diff * diff, axis=0)  # (BLOCK_P,)
    logp = -sq / (2.0 * std * std) - C * (tl.log(std) + HALF_LOG_2PI)
    tl.store(logp_ptr + b * P + offs_p, logp, mask=mask_p)


@triton.jit
def _signed_advantage(adv_ptr, w_ptr, b, K, ADV_CLIP: tl.constexpr):
    """sum_k w_k clip(A_k) over the rewards with A_k > 0, and over those with A_k < 0: since
    M >= 0, reward k's clip branch depends only on the sign of A_k."""
    pos = 0.0
    neg = 0.0
    for k in range(K):
        a = tl.load(adv_ptr + b * K + k)
        a = tl.minimum(tl.maximum(a, -ADV_CLIP), ADV_CLIP)
        w = tl.load(w_ptr + k)
        pos += tl.where(a > 0, w * a, 0.0)
        neg += tl.where(a < 0, w * a, 0.0)
    return pos, neg


@triton.jit
def _vipo_loss_position_kernel(
    partials_ptr,  # (B, n_blocks, ROW) fp32 per-program sums, the columns of partials.py
    grad_ptr,  # (B, C, P) contiguous, dtype of v; written only if WRITE_GRAD
    v_ptr, z_ptr, x_ptr, r_ptr,  # model output, sample, next sample, reference model output
    old_ptr, map_ptr,  # (B, P) fp32 old log-prob and allocation map
    adv_ptr, w_ptr,  # (B, K) fp32 advantages (clipped here to +-ADV_CLIP), (K,) fp32 weights
    cs_ptr, co_ptr, std_ptr,  # (B,) fp32 step coefficients
    stride_vb, stride_vc, stride_zb, stride_zc, stride_xb, stride_xc, stride_rb, stride_rc,
    C, P, K, n_blocks, grad_scale,  # grad_scale = 1 / (B |P|), the mean's factor
    CLIP_RANGE: tl.constexpr, ADV_CLIP: tl.constexpr, KL_COEF: tl.constexpr,
    HAS_MAP: tl.constexpr, HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, offs_c, offs_p, mask_p, mask = _program_tile(n_blocks, C, P, BLOCK_C, BLOCK_P)

    a_pos, a_neg = _signed_advantage(adv_ptr, w_ptr, b, K, ADV_CLIP)
    cs = tl.load(cs_ptr + b)
    co = tl.load(co_ptr + b)
    std = tl.load(std_ptr + b)
    inv_var = 1.0 / (std * std)
    v = _load_tile(v_ptr, b, stride_vb, stride_vc, offs_c, offs_p, mask)
    z = _load_tile(z_ptr, b, stride_zb, stride_zc, offs_c, offs_p, mask)
    x = _load_tile(x_ptr, b, stride_xb, stride_xc, offs_c, offs_p, mask)
    mean = cs * z + co * v
    diff = tl.where(mask, x - mean, 0.0)

    # Log-ratio per position (docs/method.md 2-3). l(p) and old are O(C) while their difference
    # is O(eps), so this per-position chain runs in fp64: in fp32 the rounding of the
    # constant alone shifts every ratio of a sample alike, by ~1e-5 at C = 64.
    old32 = tl.load(old_ptr + b * P + offs_p, mask=mask_p, other=0.0)
    old = old32.to(tl.float64)
    std64 = std.to(tl.float64)
    sq = tl.sum((diff * diff).to(tl.float64), axis=0)
    log_ratio = -0.5 * sq / (std64 * std64) - C * (tl.log(std64) + HALF_LOG_2PI) - old
    log_ratio = tl.where(mask_p, log_ratio, 0.0).to(tl.float32)
    ratio = tl.exp(log_ratio)
    if HAS_MAP:
        m = tl.load(map_ptr + b * P + offs_p, mask=mask_p, other=0.0)
    else:
        m = tl.where(mask_p, 1.0, 0.0)
    lo = 1.0 - CLIP_RANGE
    hi = 1.0 + CLIP_RANGE

    kl_pos = tl.zeros([BLOCK_P], dtype=tl.float32)
    if HAS_REF:
        r = _load_tile(r_ptr, b, stride_rb, stride_rc, offs_c, offs_p, mask)
        dmean = co * (v - r)  # mu - mu_ref: the sample term cancels
        kl_pos = 0.5 * inv_var * tl.sum(dmean * dmean, axis=0)
    if WRITE_GRAD:
        # PPO clip (docs/method.md 4-5): reward k's unclipped branch carries the gradient for
        # rho <= 1 + eps if A_k > 0 and for rho >= 1 - eps if A_k < 0, so dL/dl(p) =
        # -M rho (sum of w A over the active rewards) / (B|P|); dl(p)/dv = co (x - mu) / std^2.
        coef = tl.where(ratio <= hi, a_pos, 0.0) + tl.where(ratio >= lo, a_neg, 0.0)
        dlogp = -m * ratio * coef * grad_scale
        g = (co * inv_var) * diff * dlogp[None, :]
        if HAS_REF:
            g += (KL_COEF * grad_scale * co * inv_var) * dmean
        tl.store(grad_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :],
                 g.to(grad_ptr.dtype.element_ty), mask=mask)

    out = partials_ptr + tl.program_id(0).to(tl.int64) * ROW  # row (b, block)
    tl.store(out + SURROGATE_UPPER, tl.sum(m * tl.minimum(ratio, hi), axis=0))
    tl.store(out + SURROGATE_LOWER, tl.sum(m * tl.maximum(ratio, lo), axis=0))
    tl.store(out + KL, tl.sum(kl_pos, axis=0))
    tl.store(out + N_LOW, tl.sum((mask_p & (ratio < lo)).to(tl.float32), axis=0))
    tl.store(out + N_HIGH, tl.sum((mask_p & (ratio > hi)).to(tl.float32), axis=0))
    tl.store(out + LOG_RATIO_SQ, tl.sum(log_ratio * log_ratio, axis=0))
    tl.store(out + RATIO_SUM, tl.sum(tl.where(mask_p, ratio, 0.0), axis=0))
    tl.store(out + RATIO_MIN, tl.min(tl.where(mask_p, ratio, float("inf")), axis=0))
    tl.store(out + RATIO_MAX, tl.max(tl.where(mask_p, ratio, float("-inf")), axis=0))
    # |NaN| <= max is false, as is NaN >= 0: non-finite values count as bad.
    bad_old = mask_p & ~(tl.abs(old32) <= FLOAT_MAX)
    tl.store(out + BAD_OLD, tl.sum(bad_old.to(tl.float32), axis=0))
    bad_map = mask_p & ~((m >= 0.0) & (m <= FLOAT_MAX))
    tl.store(out + BAD_MAP, tl.sum(bad_map.to(tl.float32), axis=0))


@triton.jit
def _vipo_grad_sample_kernel(
    kl_ptr,  # (B, n_blocks) fp32 per-program sum of (mu - mu_ref)^2 / (2 std^2)
    grad_ptr,  # (B, C, P) contiguous, dtype of v; written only if WRITE_GRAD
    v_ptr, z_ptr, x_ptr, r_ptr,
    dlogp_ptr, cs_ptr, co_ptr, std_ptr,  # (B,) fp32; dlogp = dL/dl(c, p), the same for all (c, p)
    stride_vb, stride_vc, stride_zb, stride_zc, stride_xb, stride_xc, stride_rb, stride_rc,
    C, P, n_blocks, grad_scale,
    KL_COEF: tl.constexpr, HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, offs_c, offs_p, mask_p, mask = _program_tile(n_blocks, C, P, BLOCK_C, BLOCK_P)

    co = tl.load(co_ptr + b)
    std = tl.load(std_ptr + b)
    inv_var = 1.0 / (std * std)
    v = _load_tile(v_ptr, b, stride_vb, stride_vc, offs_c, offs_p, mask)
    kl = 0.0
    dmean = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    if HAS_REF:
        r = _load_tile(r_ptr, b, stride_rb, stride_rc, offs_c, offs_p, mask)
        dmean = co * (v - r)
        kl = 0.5 * inv_var * tl.sum(tl.sum(dmean * dmean, axis=1), axis=0)
    if WRITE_GRAD:
        cs = tl.load(cs_ptr + b)
        z = _load_tile(z_ptr, b, stride_zb, stride_zc, offs_c, offs_p, mask)
        x = _load_tile(x_ptr, b, stride_xb, stride_xc, offs_c, offs_p, mask)
        diff = x - (cs * z + co * v)
        g = (tl.load(dlogp_ptr + b) * co * inv_var) * diff
        if HAS_REF:
            g += (KL_COEF * grad_scale * co * inv_var) * dmean
        tl.store(grad_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :],
                 g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(kl_ptr + tl.program_id(0).to(tl.int64), kl)  # element (b, block) of (B, n_blocks)


@triton.jit
def _scale_grad_kernel(grad_ptr, dloss_ptr, n, BLOCK: tl.constexpr):
    """grad *= dloss unless dloss == 1, read here on the device: backward never waits for
    the host to learn the upstream gradient, and the common case touches no gradient."""
    scale = tl.load(dloss_ptr)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- checks
# The launchers' argument checks, as csrc/ops_common.h makes them for the compiled ops.


def _check_latent(name, t, v):
    if t.dim() != 3 or t.shape != v.shape:
        raise ValueError(f"{name} must be (B, C, P) of v's shape {tuple(v.shape)}, got "
                         f"{tuple(t.shape)}")
    if t.device != v.device:
        raise ValueError(f"{name} is on {t.device} but v is on {v.device}")
    if t.shape[2] > 1 and t.stride(2) != 1:
        raise ValueError(f"{name} must have stride 1 along positions (dim 2), got strides "
                         f"{t.stride()}")
    if t.dtype not in LATENT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_fp32(name, t, v, shape):
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 tensor, got {t.dtype}")
    if t.device != v.device:
        raise ValueError(f"{name} is on {t.device} but v is on {v.device}")


def _check_step(v, z, x, cs, co, std):
    for name, t in (("v", v), ("z", z), ("x", x)):
        _check_latent(name, t, v)
    for name, t in (("cs", cs), ("co", co), ("std", std)):
        _check_fp32(name, t, v, (v.shape[0],))


def _check_optional(v, ref, grad):
    if ref is not None:
        _check_latent("ref", ref, v)
    if grad is not None:
        if grad.shape != v.shape or not grad.is_contiguous() or grad.dtype != v.dtype:
            raise ValueError(f"grad must be a contiguous tensor of v's shape {tuple(v.shape)} "
                             f"and dtype {v.dtype}, got {tuple(grad.shape)} {grad.dtype}")
        if grad.device != v.device:
            raise ValueError(f"grad is on {grad.device} but v is on {v.device}")


# ----------------------------------------------------------------------------- launchers


def _block_sizes(C: int, P: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps). All channels go in one tile.

    On a GPU a tile of about 2k elements per tensor keeps 4-5 tiles in registers;
    the interpreter costs about 1 ms per program whatever its size, so it gets
    tiles as large as memory allows.
    """
    block_c = triton.next_power_of_2(C)
    budget = TILE_BUDGET["cpu" if device.type == "cpu" else "gpu"]
    block_p = max(16, min(triton.next_power_of_2(P), budget // block_c))
    num_warps = 4 if block_c * block_p <= 2048 else 8
    return block_c, block_p, num_warps


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(P: int, B: int, block_p: int):
    """(number of position blocks, the 1-D launch grid)."""
    n_blocks = triton.cdiv(P, block_p)
    return n_blocks, (n_blocks * B,)


def gaussian_step(v, z, x, cs, co, std, *, sample_noise: bool, next_out=None, logp_out=None):
    """Shared launcher of sde_step (x = noise) and log_prob (x = next sample)."""
    _check_step(v, z, x, cs, co, std)
    B, C, P = z.shape
    block_c, block_p, num_warps = _block_sizes(C, P, z.device)
    if logp_out is None:
        logp_out = new_buffer((B, P), torch.float32, z.device)
    if sample_noise and next_out is None:
        next_out = new_buffer((B, C, P), z.dtype, z.device)
    nxt = next_out if sample_noise else logp_out  # any pointer; unused without SAMPLE_NOISE
    stride_nb, stride_nc = (next_out.stride(0), next_out.stride(1)) if sample_noise else (0, 0)
    with _device_guard(z.device):
        n_blocks, grid = _grid(P, B, block_p)
        _gaussian_step_kernel[grid](
            nxt, logp_out, v, z, x, cs, co, std,
            v.stride(0), v.stride(1), z.stride(0), z.stride(1), x.stride(0), x.stride(1),
            stride_nb, stride_nc, C, P, n_blocks,
            SAMPLE_NOISE=sample_noise, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return next_out, logp_out


def step(v, z, noise, cs, co, std, *, next_out=None, logp_out=None):
    return gaussian_step(v, z, noise, cs, co, std, sample_noise=True, next_out=next_out,
                         logp_out=logp_out)


def log_prob(v, z, x, cs, co, std, *, logp_out=None):
    return gaussian_step(v, z, x, cs, co, std, sample_noise=False, logp_out=logp_out)[1]


def _ref_args(ref, v):
    return (ref, ref.stride(0), ref.stride(1)) if ref is not None else (v, 0, 0)


def loss_position(v, z, x, old, adv, weights, amap, cs, co, std, ref, grad, *, clip_range,
                  adv_clip, kl_coef, partials_out=None):
    """The position-level loss: per-program partials (B, n_blocks, N_COLUMNS), reduced by
    ``partials.reduce_partials`` to the (N_STATS + K,) statistics; dL/dv into ``grad``, and
    then the loss is differentiable in ``v``. Returns (loss, statistics)."""
    _check_step(v, z, x, cs, co, std)
    _check_optional(v, ref, grad)
    B, C, P = z.shape
    _check_fp32("old", old, v, (B, P))
    if adv.dim() != 2:
        raise ValueError(f"adv must have shape ({B}, K), got {tuple(adv.shape)}")
    _check_fp32("adv", adv, v, (B, adv.shape[1]))
    _check_fp32("weights", weights, v, (adv.shape[1],))
    if amap is not None:
        _check_fp32("amap", amap, v, (B, P))
    block_c, block_p, num_warps = _block_sizes(C, P, z.device)
    n_blocks, grid = _grid(P, B, block_p)
    if partials_out is None:
        partials_out = new_buffer((B, n_blocks, N_COLUMNS), torch.float32, z.device)
    has_ref = ref is not None
    ref, stride_rb, stride_rc = _ref_args(ref, v)
    with _device_guard(z.device):
        _vipo_loss_position_kernel[grid](
            partials_out, grad if grad is not None else v, v, z, x, ref, old,
            amap if amap is not None else old, adv, weights, cs, co, std,
            v.stride(0), v.stride(1), z.stride(0), z.stride(1), x.stride(0), x.stride(1),
            stride_rb, stride_rc, C, P, adv.shape[1], n_blocks, 1.0 / (B * P),
            CLIP_RANGE=float(clip_range), ADV_CLIP=float(adv_clip), KL_COEF=float(kl_coef),
            HAS_MAP=amap is not None, HAS_REF=has_ref, WRITE_GRAD=grad is not None,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    stats = reduce_partials(partials_out, adv, weights, std, positions=P, adv_clip=adv_clip,
                            kl_coef=kl_coef)
    return with_gradient(v, stats, grad, scale_grad)


def grad_sample(v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef, kl_out=None):
    """Writes dlogp[b] * dl/dv (+ the KL gradient) into ``grad``; returns (B, n_blocks) KL sums."""
    _check_step(v, z, x, cs, co, std)
    _check_optional(v, ref, grad)
    B, C, P = z.shape
    _check_fp32("dlogp", dlogp, v, (B,))
    block_c, block_p, num_warps = _block_sizes(C, P, z.device)
    n_blocks, grid = _grid(P, B, block_p)
    if kl_out is None:
        kl_out = new_buffer((B, n_blocks), torch.float32, z.device)
    has_ref = ref is not None
    ref, stride_rb, stride_rc = _ref_args(ref, v)
    with _device_guard(z.device):
        _vipo_grad_sample_kernel[grid](
            kl_out, grad if grad is not None else v, v, z, x, ref, dlogp, cs, co, std,
            v.stride(0), v.stride(1), z.stride(0), z.stride(1), x.stride(0), x.stride(1),
            stride_rb, stride_rc, C, P, n_blocks, 1.0 / (B * P),
            KL_COEF=float(kl_coef), HAS_REF=has_ref, WRITE_GRAD=grad is not None,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return kl_out


def scale_grad(grad, dloss):
    """grad *= dloss in place, without reading dloss on the host."""
    if not grad.is_contiguous() or grad.dtype not in LATENT_DTYPES:
        raise ValueError(f"grad must be a contiguous float32, bfloat16 or float16 tensor, got "
                         f"{grad.dtype}")
    dloss = dloss.detach().to(torch.float32)
    if dloss.numel() != 1 or dloss.device != grad.device:
        raise ValueError(f"dloss must hold one value on grad's device {grad.device}, got "
                         f"{tuple(dloss.shape)} on {dloss.device}")
    block = TILE_BUDGET["cpu" if grad.device.type == "cpu" else "gpu"] * 2
    with _device_guard(grad.device):
        _scale_grad_kernel[(triton.cdiv(grad.numel(), block),)](grad, dloss, grad.numel(),
                                                                 BLOCK=block)
    return grad
