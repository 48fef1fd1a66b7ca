"""Group advantages (docs/method.md 5). (map_norm, docs/method.md 6, is
``vipo.psm.maps.normalize_maps``.)

A_i = (r_i - mean_g) / (std_g + eps_std), std unbiased (divisor G - 1). A group whose
rewards are all equal gets A = 0 and is counted; a non-finite reward raises naming the
sample, or drops its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor       # (N, K) float32: one column per loss term
    weights: list              # K loss weights (per_reward: the reward weights; sum: [1])
    keep: torch.Tensor         # (N,) bool: samples whose group survived (others: A = 0)
    zero_std_groups: int       # groups whose rewards were all equal (their A = 0)
    dropped_groups: int        # groups dropped for a non-finite reward
    total_groups: int = 0      # groups in the batch


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, weights: list, *,
                     mode: str = "per_reward", eps_std: float = 1e-8,
                     nonfinite: str = "raise", batch_std: torch.Tensor | None = None,
                     names: list | None = None, prompts: list | None = None) -> Advantages:
    """Advantages of rewards (N, K) for samples in groups (N,) of equal size.

    ``mode``: ``per_reward`` normalises each reward column on its own (K loss terms weighted
    by ``weights``); ``sum_rewards`` normalises the weighted sum (one term).
    ``batch_std``: (K',) std to use instead of each group's (Flow-GRPO's std over the whole
    iteration); computed by the caller so that it can span processes.
    The statistics run in float64, so rewards up to float32's largest value (~3e38) give
    finite advantages (in float32 their squares overflow the std).
    """
    rewards = rewards.to(torch.float64)
    if rewards.dim() != 2 or rewards.shape[0] != groups.shape[0]:
        raise ValueError(f"rewards must have shape (N, K) with N = len(groups), got "
                         f"{tuple(rewards.shape)} for {groups.shape[0]} samples")
    keep, dropped = _finite_groups(rewards, groups, nonfinite, names, prompts)
    rewards, weights = combine_rewards(rewards, weights, mode)
    values = torch.zeros_like(rewards)
    zero_std = 0
    for g in torch.unique(groups[keep]):
        idx = (groups == g) & keep
        r = rewards[idx]  # (G, K)
        if r.shape[0] < 2:
            raise ValueError(f"group {int(g)} has {r.shape[0]} sample; advantages need >= 2")
        std = r.std(dim=0, unbiased=True) if batch_std is None else batch_std.double()
        # A reward that is equal across the group gives A = 0 whatever the std (docs/method.md 5);
        # exact comparison, since a float std of equal values may be a rounding residue.
        constant = (r == r[:1]).all(dim=0)  # (K,)
        zero_std += int(constant.any())
        values[idx] = torch.where(constant, 0.0, (r - r.mean(dim=0)) / (std + eps_std))
    return Advantages(values.to(torch.float32), list(weights), keep, zero_std, dropped,
                      int(torch.unique(groups).numel()))


def combine_rewards(rewards: torch.Tensor, weights: list, mode: str) -> tuple:
    """(rewards, loss weights) as the loss terms see them: ``per_reward`` keeps the K
    columns and their weights; ``sum_rewards`` is the one weighted column with weight 1.
    The one place the reward weights are applied before the loss."""
    if mode == "sum_rewards":
        summed = (rewards.double() * torch.tensor(weights, dtype=torch.float64)).sum(
            dim=1, keepdim=True)
        return summed, [1.0]
    if mode != "per_reward":
        raise ValueError(f"mode must be 'per_reward' or 'sum_rewards', got {mode!r}")
    return rewards, list(weights)


def _finite_groups(rewards, groups, nonfinite, names, prompts):
    finite = torch.isfinite(rewards).all(dim=1)  # (N,)
    if bool(finite.all()):
        return torch.ones_like(finite), 0
    bad = int(torch.nonzero(~finite)[0])
    column = int(torch.nonzero(~torch.isfinite(rewards[bad]))[0])
    what = f"reward {names[column]!r}" if names else f"reward column {column}"
    prompt = f", prompt {prompts[bad]!r}" if prompts else ""
    if nonfinite == "raise":
        raise ValueError(f"{what} of sample {bad} (group {int(groups[bad])}{prompt}) is "
                         f"{float(rewards[bad, column])}; set reward.nonfinite_reward="
                         f"drop_group to drop such groups instead")
    bad_groups = torch.unique(groups[~finite])
    keep = ~torch.isin(groups, bad_groups)
    return keep, int(bad_groups.numel())
