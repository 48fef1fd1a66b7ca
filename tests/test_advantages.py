"""Group advantages (METHOD.md 5) and map normalisation (METHOD.md 6)."""

from __future__ import annotations

import pytest
import torch

from vipo.advantages import group_advantages, normalise_maps

GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_group_normalisation_uses_unbiased_std():
    r = torch.tensor([[1.0], [2.0], [3.0], [10.0], [10.0], [40.0]])
    adv = group_advantages(r, GROUPS, [1.0], eps_std=0.0)
    # group 0: mean 2, unbiased std 1; group 1: mean 20, std sqrt(300)
    expected = torch.tensor([-1.0, 0.0, 1.0, -10 / 300**0.5, -10 / 300**0.5, 20 / 300**0.5])
    torch.testing.assert_close(adv.values[:, 0], expected)
    assert adv.zero_std_groups == 0 and adv.dropped_groups == 0 and bool(adv.keep.all())


def test_equal_rewards_give_zero_advantage_and_are_counted():
    r = torch.tensor([[0.3], [0.3], [0.3], [1.0], [2.0], [4.0]])
    adv = group_advantages(r, GROUPS, [1.0])
    assert torch.equal(adv.values[:3, 0], torch.zeros(3))
    assert adv.zero_std_groups == 1
    assert bool((adv.values[3:, 0] != 0).all())


def test_nonfinite_reward_raises_naming_the_sample():
    r = torch.tensor([[1.0], [2.0], [3.0], [1.0], [float("nan")], [2.0]])
    with pytest.raises(ValueError, match=r"reward 'redness' of sample 4 \(group 1\) is nan"):
        group_advantages(r, GROUPS, [1.0], names=["redness"])


def test_nonfinite_reward_drop_group():
    r = torch.tensor([[1.0], [2.0], [3.0], [1.0], [float("inf")], [2.0]])
    adv = group_advantages(r, GROUPS, [1.0], nonfinite="drop_group")
    assert adv.dropped_groups == 1
    assert adv.keep.tolist() == [True] * 3 + [False] * 3
    assert torch.equal(adv.values[3:], torch.zeros(3, 1))
    torch.testing.assert_close(adv.values[:3, 0], torch.tensor([-1.0, 0.0, 1.0]))


def test_per_reward_and_sum_rewards():
    r = torch.tensor([[1.0, 0.0], [2.0, 5.0], [3.0, 1.0], [1.0, 1.0], [1.0, 2.0], [4.0, 3.0]])
    per = group_advantages(r, GROUPS, [1.0, 0.5], mode="per_reward", eps_std=0.0)
    assert per.values.shape == (6, 2) and per.weights == [1.0, 0.5]
    for col in range(2):
        single = group_advantages(r[:, col:col + 1], GROUPS, [1.0], eps_std=0.0)
        torch.testing.assert_close(per.values[:, col], single.values[:, 0])
    summed = group_advantages(r, GROUPS, [1.0, 0.5], mode="sum_rewards", eps_std=0.0)
    assert summed.values.shape == (6, 1) and summed.weights == [1.0]
    direct = group_advantages((r * torch.tensor([1.0, 0.5])).sum(1, keepdim=True), GROUPS, [1.0],
                              eps_std=0.0)
    torch.testing.assert_close(summed.values, direct.values)


def test_batch_std_replaces_group_std():
    r = torch.tensor([[1.0], [2.0], [3.0], [10.0], [20.0], [30.0]])
    adv = group_advantages(r, GROUPS, [1.0], eps_std=0.0, batch_std=torch.tensor([2.0]))
    torch.testing.assert_close(adv.values[:, 0], torch.tensor([-0.5, 0, 0.5, -5, 0, 5]))


def test_groups_need_two_samples():
    with pytest.raises(ValueError, match="group 1 has 1 sample"):
        group_advantages(torch.rand(3, 1), torch.tensor([0, 0, 1]), [1.0])


def test_map_norms():
    maps = torch.rand(3, 4, 5)
    maps[2] = 0.0
    same, scale = normalise_maps(maps, "minmax")
    assert same is maps and torch.equal(scale, torch.ones(3))
    floored, _ = normalise_maps(maps, "floor", 0.25)
    torch.testing.assert_close(floored, 0.25 + 0.75 * maps)
    unit, scale = normalise_maps(maps, "mean_one")
    assert float(unit.max()) <= 1 and float(unit.min()) >= 0  # the kernel's domain
    # A * M is unchanged: (M / max) * (max / mean) = M / mean, whose mean is 1.
    dense = unit * scale.view(3, 1, 1)
    torch.testing.assert_close(dense[:2].mean(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(dense[2], torch.ones(4, 5))  # an empty map counts as uniform
