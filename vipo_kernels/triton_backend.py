"""Triton kernels and launchers for the SDE step, the log-prob and the fused loss.

Every kernel sees latents as (B, C, P): P is the flattened image or video grid and
must have stride 1 (the launchers copy otherwise); batch and channel strides are
free. One program owns one sample and BLOCK_P positions with *all* C channels in a
(BLOCK_C, BLOCK_P) register tile, so the channel sum of a position's log-density,
its ratio, its clip decision and its gradient come out of one read of memory.

All arithmetic is fp32 (inputs are converted on load, which is also what lets bf16
run under the Triton interpreter). Offsets are int64. Per-run hyperparameters are
constexpr (STYLE.md section 6); the 1/(B|P|) scale changes with the shape, so it is
a runtime fp32 argument.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .buffers import new_buffer

# A constexpr: compiled Triton refuses plain Python globals inside kernels (the interpreter
# does not, which is why vipo_kernels/triton_compile_check.py exists).
HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))
N_STATS = 8  # columns of the loss partials, see loss_position
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
def _vipo_loss_position_kernel(
    partials_ptr,  # (B, n_blocks, N_STATS) fp32 per-program sums, see loss_position
    grad_ptr,  # (B, C, P) contiguous, dtype of v; written only if WRITE_GRAD
    v_ptr, z_ptr, x_ptr, r_ptr,  # model output, sample, next sample, reference model output
    old_ptr, map_ptr,  # (B, P) fp32 old log-prob and allocation map
    adv_ptr, cs_ptr, co_ptr, std_ptr,  # (B,) fp32, advantages already clipped to +-adv_clip
    stride_vb, stride_vc, stride_zb, stride_zc, stride_xb, stride_xc, stride_rb, stride_rc,
    C, P, n_blocks, grad_scale,  # grad_scale = 1 / (B |P|), the mean's factor
    CLIP_RANGE: tl.constexpr, KL_COEF: tl.constexpr,
    HAS_MAP: tl.constexpr, HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, offs_c, offs_p, mask_p, mask = _program_tile(n_blocks, C, P, BLOCK_C, BLOCK_P)

    adv = tl.load(adv_ptr + b)
    cs = tl.load(cs_ptr + b)
    co = tl.load(co_ptr + b)
    std = tl.load(std_ptr + b)
    inv_var = 1.0 / (std * std)
    v = _load_tile(v_ptr, b, stride_vb, stride_vc, offs_c, offs_p, mask)
    z = _load_tile(z_ptr, b, stride_zb, stride_zc, offs_c, offs_p, mask)
    x = _load_tile(x_ptr, b, stride_xb, stride_xc, offs_c, offs_p, mask)
    mean = cs * z + co * v
    diff = tl.where(mask, x - mean, 0.0)

    # Log-ratio per position (METHOD.md 2-3). l(p) and old are O(C) while their difference
    # is O(eps), so this per-position chain runs in fp64: in fp32 the rounding of the
    # constant alone shifts every ratio of a sample alike, by ~1e-5 at C = 64.
    old = tl.load(old_ptr + b * P + offs_p, mask=mask_p, other=0.0).to(tl.float64)
    std64 = std.to(tl.float64)
    sq = tl.sum((diff * diff).to(tl.float64), axis=0)
    log_ratio = -0.5 * sq / (std64 * std64) - C * (tl.log(std64) + HALF_LOG_2PI) - old
    log_ratio = tl.where(mask_p, log_ratio, 0.0).to(tl.float32)
    ratio = tl.exp(log_ratio)
    if HAS_MAP:
        dense_adv = adv * tl.load(map_ptr + b * P + offs_p, mask=mask_p, other=0.0)
    else:
        dense_adv = tl.where(mask_p, adv, 0.0)

    # PPO clip (METHOD.md 4). The unclipped branch carries the gradient where it is the
    # max, and inside the clip range where both branches coincide.
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - CLIP_RANGE), 1.0 + CLIP_RANGE)
    unclipped_term = -dense_adv * ratio
    clipped_term = -dense_adv * clipped
    inside = (ratio >= 1.0 - CLIP_RANGE) & (ratio <= 1.0 + CLIP_RANGE)
    active = (unclipped_term > clipped_term) | inside
    term = tl.maximum(unclipped_term, clipped_term)

    kl_pos = tl.zeros([BLOCK_P], dtype=tl.float32)
    if HAS_REF:
        r = _load_tile(r_ptr, b, stride_rb, stride_rc, offs_c, offs_p, mask)
        dmean = co * (v - r)  # mu - mu_ref: the sample term cancels
        kl_pos = 0.5 * inv_var * tl.sum(dmean * dmean, axis=0)
    if WRITE_GRAD:
        # dL/dl(p) = -A^p rho / (B|P|) where unclipped is active; dl(p)/dv = co (x - mu) / std^2.
        dlogp = tl.where(active, unclipped_term, 0.0) * grad_scale
        g = (co * inv_var) * diff * dlogp[None, :]
        if HAS_REF:
            g += (KL_COEF * grad_scale * co * inv_var) * dmean
        tl.store(grad_ptr + b * C * P + offs_c[:, None] * P + offs_p[None, :],
                 g.to(grad_ptr.dtype.element_ty), mask=mask)

    out = partials_ptr + tl.program_id(0).to(tl.int64) * 8  # row (b, block) of (B, n_blocks, 8)
    tl.store(out + 0, tl.sum(tl.where(mask_p, term, 0.0), axis=0))
    tl.store(out + 1, tl.sum(kl_pos, axis=0))
    tl.store(out + 2, tl.sum((mask_p & (ratio < 1.0 - CLIP_RANGE)).to(tl.float32), axis=0))
    tl.store(out + 3, tl.sum((mask_p & (ratio > 1.0 + CLIP_RANGE)).to(tl.float32), axis=0))
    tl.store(out + 4, tl.sum(log_ratio * log_ratio, axis=0))
    tl.store(out + 5, tl.sum(tl.where(mask_p, ratio, 0.0), axis=0))
    tl.store(out + 6, tl.min(tl.where(mask_p, ratio, float("inf")), axis=0))
    tl.store(out + 7, tl.max(tl.where(mask_p, ratio, float("-inf")), axis=0))


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


def loss_position(v, z, x, old, adv, amap, cs, co, std, ref, grad, *, clip_range, kl_coef,
                  grad_scale, partials_out=None):
    """Per-program sums (B, n_blocks, 8): [surrogate term, KL, #rho<1-eps, #rho>1+eps,
    sum log(rho)^2, sum rho, min rho, max rho]; writes dL/dv into ``grad`` if given."""
    B, C, P = z.shape
    block_c, block_p, num_warps = _block_sizes(C, P, z.device)
    n_blocks, grid = _grid(P, B, block_p)
    if partials_out is None:
        partials_out = new_buffer((B, n_blocks, N_STATS), torch.float32, z.device)
    has_ref = ref is not None
    ref, stride_rb, stride_rc = _ref_args(ref, v)
    with _device_guard(z.device):
        _vipo_loss_position_kernel[grid](
            partials_out, grad if grad is not None else v, v, z, x, ref, old,
            amap if amap is not None else old, adv, cs, co, std,
            v.stride(0), v.stride(1), z.stride(0), z.stride(1), x.stride(0), x.stride(1),
            stride_rb, stride_rc, C, P, n_blocks, grad_scale,
            CLIP_RANGE=float(clip_range), KL_COEF=float(kl_coef), HAS_MAP=amap is not None,
            HAS_REF=has_ref, WRITE_GRAD=grad is not None,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return partials_out


def grad_sample(v, z, x, dlogp, cs, co, std, ref, grad, *, kl_coef, grad_scale, kl_out=None):
    """Writes dlogp[b] * dl/dv (+ the KL gradient) into ``grad``; returns (B, n_blocks) KL sums."""
    B, C, P = z.shape
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
            stride_rb, stride_rc, C, P, n_blocks, grad_scale,
            KL_COEF=float(kl_coef), HAS_REF=has_ref, WRITE_GRAD=grad is not None,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return kl_out
