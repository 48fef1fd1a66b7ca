"""The fused loss's two tables, by name: the columns of the per-block partial sums that
every position-level kernel writes (Triton, csrc/cpu, csrc/cuda), and the statistics
vector that every reduction of them returns (``reduce_partials`` here, and the C++ one in
csrc/cpu/loss_cpu.cpp). csrc/partials.h states the same two tables as C++ enums;
tests/test_partials.py checks that they agree with these, so each is stated once.

Partials are (B, n_blocks, len(COLUMNS)) fp32, one row per (sample, block of positions).
With M the allocation map (1 without one), rho the position ratio and eps the clip range:

- ``surrogate_upper`` = sum_p M(p) min(rho, 1 + eps) and ``surrogate_lower`` =
  sum_p M(p) max(rho, 1 - eps). Because M >= 0, max(-A M rho, -A M clip(rho)) is
  -A M min(rho, 1 + eps) for A > 0 and -A M max(rho, 1 - eps) for A < 0, so these two
  sums give every reward's surrogate, whatever the number of rewards (docs/method.md 4-5).
- ``kl`` = sum_p sum_c (mu - mu_ref)^2 / (2 std^2), 0 without a reference.
- ``n_low``, ``n_high``: positions with rho < 1 - eps, rho > 1 + eps.
- ``log_ratio_sq``, ``ratio_sum``, ``ratio_min``, ``ratio_max``: sum log(rho)^2, sum rho,
  min rho, max rho.
- ``bad_old``, ``bad_map``: positions whose old log-prob is not finite, whose map value is
  negative or not finite: the value checks, made in the pass that reads the values.
"""

from __future__ import annotations

import torch

from .validation import MESSAGES, require

COLUMNS = ("surrogate_upper", "surrogate_lower", "kl", "n_low", "n_high", "log_ratio_sq",
           "ratio_sum", "ratio_min", "ratio_max", "bad_old", "bad_map")
COLUMN = {name: i for i, name in enumerate(COLUMNS)}
N_COLUMNS = len(COLUMNS)
# Columns summed over blocks (the others are extrema).
SUMMED = tuple(i for i, name in enumerate(COLUMNS) if name not in ("ratio_min", "ratio_max"))

# The reduced statistics, then one unweighted clip loss per reward: (len(STATS) + K,) fp32.
STATS = ("loss", "loss_clip", "loss_kl", "clip_frac_low", "clip_frac_high", "approx_kl",
         "ratio_mean", "ratio_min", "ratio_max")
STAT = {name: i for i, name in enumerate(STATS)}
N_STATS = len(STATS)


def reduce_partials(partials: torch.Tensor, adv: torch.Tensor, weights: torch.Tensor,
                    std: torch.Tensor, *, positions: int, adv_clip: float,
                    kl_coef: float) -> torch.Tensor:
    """(B, n_blocks, N_COLUMNS) partials -> the (N_STATS + K,) float32 statistics, for the
    backends without a compiled reduction (Triton, CUDA). Torch ops on the partials' device
    only, so no host sync: a bad input is reported by ``require`` (at once on the CPU,
    asynchronously on CUDA). ``adv`` (B, K) unclipped, ``weights`` (K,), ``std`` (B,),
    ``positions`` = |P|."""
    count = partials.shape[0] * positions
    per_sample = partials.sum(dim=1, dtype=torch.float64)  # (B, N_COLUMNS); extrema unused
    totals = per_sample.sum(dim=0)
    a = adv.to(torch.float64).clamp(-adv_clip, adv_clip)  # (B, K)
    upper = per_sample[:, COLUMN["surrogate_upper"], None]
    lower = per_sample[:, COLUMN["surrogate_lower"], None]
    # The surrogate of reward k, by the sign of A_k (see the table above).
    per_reward = (-a * torch.where(a > 0, upper, lower)).sum(dim=0) / count  # (K,)
    loss_clip = (per_reward * weights.to(torch.float64)).sum()
    loss_kl = totals[COLUMN["kl"]] * (kl_coef / count)
    stats = torch.stack([
        loss_clip + loss_kl, loss_clip, loss_kl, totals[COLUMN["n_low"]] / count,
        totals[COLUMN["n_high"]] / count, totals[COLUMN["log_ratio_sq"]] * (0.5 / count),
        totals[COLUMN["ratio_sum"]] / count,
        partials[..., COLUMN["ratio_min"]].amin().to(torch.float64),
        partials[..., COLUMN["ratio_max"]].amax().to(torch.float64)])
    require(torch.isfinite(std).all() & (std > 0).all(), MESSAGES["std"])
    require(torch.isfinite(adv).all(), MESSAGES["advantages"])
    require(totals[COLUMN["bad_old"]] == 0, MESSAGES["old_log_prob"])
    require(totals[COLUMN["bad_map"]] == 0, MESSAGES["allocation_map"])
    return torch.cat([stats, per_reward]).to(torch.float32)
