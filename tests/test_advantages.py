"""Group advantages (docs/method.md 5), and the dense advantage A x M of every map_norm
(docs/method.md 4 and 6) as the loss sees it."""

from __future__ import annotations

import pytest
import torch

from vipo.advantages import group_advantages

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


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("map_norm", ["minmax", "mean_one", "floor"])
def test_dense_advantage_of_each_map_norm(backend, map_norm):
    """The map from the PSM with map_norm applied, and the raw advantage, go to the loss as
    they are; the loss's A x M is then clip(A, +-adv_clip) times docs/method.md 6's M: M,
    M / mean_p M or alpha + (1 - alpha) M, written out here from the min-max map. Checked
    against the reference fed that dense advantage directly (A = 1, map = A x M)."""
    from vipo_kernels import backends, vipo_loss
    from vipo_kernels.reference import vipo_loss_reference
    from vipo.psm import allocation_maps_from_features

    from .utils import make_loss_case

    if backend != "torch" and not backends.available(backend):
        pytest.skip(f"backend {backend!r} not built")
    case = make_loss_case((3, 4, 6, 5), clip_range=1e-2)
    features = torch.randn(3, 16, 8)
    floor = 0.25 if map_norm == "floor" else None
    maps = allocation_maps_from_features(features, (4, 4), (6, 5), normalize=map_norm,
                                         floor=floor)
    raw = allocation_maps_from_features(features, (4, 4), (6, 5))
    written = {"minmax": raw, "mean_one": raw / raw.mean(dim=(1, 2), keepdim=True),
               "floor": 0.25 + 0.75 * raw}[map_norm]
    torch.testing.assert_close(maps, written)
    dense = case.advantages.clamp(-5.0, 5.0)[:, None, None] * written
    assert case.advantages.abs().max() > 5.0  # the loss's own clip bites
    loss, _ = vipo_loss(*case.args()[:5], maps, **case.kwargs, backend=backend)
    kwargs = {k: (a.double() if torch.is_tensor(a) else a) for k, a in case.kwargs.items()}
    expected, _ = vipo_loss_reference(*(a.double() for a in case.args()[:4]),
                                      torch.ones(3, dtype=torch.float64), dense.double(),
                                      **dict(kwargs, adv_clip=1e9))
    assert abs(loss.item() - expected.item()) <= 1e-5 * dense.abs().mean().item()
