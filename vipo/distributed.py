"""What changes when several processes train one model (``accelerate launch``).

* Prompts: one seeded global stream, cut into per-process shards without repeats; its
  state is two integers, so a resumed run continues the same order.
* Noise: each group's generator is seeded by (seed, iteration, global group index), so a
  group's samples do not depend on how many processes there are or where it sits.
* Advantages: rewards and group ids are gathered from every process and normalised
  together, so a group may sit on one process or be spread over several.
* Metrics: the training statistics are reduced over processes (min, max or mean).
"""

from __future__ import annotations

import random

import torch

from .advantages import Advantages, combine_rewards, group_advantages


class PromptSampler:
    """A seeded stream of prompt indices: epoch ``e`` is a permutation seeded by
    (seed, e). Each iteration takes ``per_process * num_processes`` consecutive items and
    process ``rank`` gets its own slice of them."""

    def __init__(self, num_prompts: int, seed: int, per_process: int, num_processes: int,
                 rank: int):
        self.num_prompts, self.seed = num_prompts, seed
        self.per_process, self.num_processes, self.rank = per_process, num_processes, rank
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(_mix(self.seed, "prompts", epoch))
        return torch.randperm(self.num_prompts, generator=gen).tolist()

    def next(self) -> tuple[list[int], list[int]]:
        """(prompt indices, global group indices within the iteration) of this process."""
        taken = []
        while len(taken) < self.per_process * self.num_processes:
            order = self._order(self.epoch)
            need = self.per_process * self.num_processes - len(taken)
            taken += order[self.position:self.position + need]
            self.position += need
            if self.position >= self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        first = self.rank * self.per_process
        mine = list(range(first, first + self.per_process))
        return [taken[i] for i in mine], mine

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _mix(*parts) -> int:
    """A 63-bit seed from its parts; Random(str) hashes with SHA-512, the same on every
    machine and run (unlike hash())."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def group_generator(seed: int, iteration: int, group: int, device) -> torch.Generator:
    """The noise generator of one group of one iteration."""
    return torch.Generator(device).manual_seed(_mix(seed, "noise", iteration, group))


def global_advantages(acc, rewards: torch.Tensor, groups: torch.Tensor, weights: list,
                      reward_cfg, prompts: list) -> tuple[Advantages, torch.Tensor]:
    """Group advantages over the samples of every process: (this process's rows, every
    process's rewards (P*N, K) on the CPU, gathered once for the advantages and the logs).

    rewards (N, K) and groups (N,) global group ids; every process holds the same N."""
    every = acc.gather(rewards.to(acc.device, torch.float32)).cpu()      # (P*N, K)
    every_groups = acc.gather(groups.to(acc.device)).cpu()               # (P*N,)
    combined, combined_weights = combine_rewards(every, weights, reward_cfg.multi_reward)
    batch_std = None
    if reward_cfg.std_scope == "batch":
        pooled = combined.double()
        batch_std = pooled[torch.isfinite(pooled).all(dim=1)].std(dim=0, unbiased=True)
    adv = group_advantages(every, every_groups, weights, mode=reward_cfg.multi_reward,
                           eps_std=reward_cfg.eps_std, nonfinite=reward_cfg.nonfinite_reward,
                           batch_std=batch_std, names=reward_cfg.reward,
                           prompts=_gather_list(acc, prompts))
    mine = slice(acc.process_index * len(rewards), (acc.process_index + 1) * len(rewards))
    return Advantages(adv.values[mine], adv.weights, adv.keep[mine], adv.zero_std_groups,
                      adv.dropped_groups, adv.total_groups), every


def _gather_list(acc, items: list) -> list:
    if acc.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


_LOWEST = ("ratio_min",)
_HIGHEST = ("ratio_max", "onpolicy_max_abs_log_ratio")


def reduce_stats(acc, stats: dict) -> dict:
    """Training statistics of this process (device scalars) -> host floats reduced over
    every process (min, max or mean), in one device-to-host transfer."""
    if not stats:
        return {}
    keys = sorted(stats)
    local = torch.stack([torch.as_tensor(stats[k], device=acc.device).double().reshape(())
                         for k in keys])
    if acc.num_processes > 1:
        every = acc.gather(local[None])                                  # (P, S)
        local = torch.stack([every[:, i].amin() if key in _LOWEST else
                             every[:, i].amax() if key in _HIGHEST else every[:, i].mean()
                             for i, key in enumerate(keys)])
    return dict(zip(keys, local.cpu().tolist()))


def reset_accelerate_state() -> None:
    """Forgets accelerate's process-wide singletons, so that a second Trainer in the same
    process (vipo.experiments.compare, the tests) builds a fresh Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
