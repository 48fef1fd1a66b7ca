"""Feature -> map stage of the PSM (docs/method.md section 6) against an independent float64
reference: scikit-learn PCA one image at a time, scipy's gaussian_filter, numpy elsewhere."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from sklearn.decomposition import PCA

from vipo.psm import allocation_maps_from_features, overlay, video_maps_from_features
import vipo.psm.maps as maps_module
from vipo.psm.maps import gaussian_matrix

ATOL = 1e-4   # the bar for fp32 maps against the float64 reference


# ----------------------------------------------------------------------------- reference

def _ref_minmax(x):
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 1e-8 else np.ones_like(x)


def _ref_reverse(x):
    span = x.max() - x.min()
    return (x.max() - x) / span if span > 1e-8 else np.full_like(x, 0.5)


def _ref_resize(x, size):
    # The spec names torch's resize (bilinear, align_corners=False, antialias=True); run in float64.
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0].numpy()


def reference_maps(features, grid, latent, k=3, aggregation="weighted", sigma=1.0):
    """features (F, N, D) float64 fitted as ONE PCA over all F*N rows (F=1 for an image).
    Returns (F, H, W), min-max over the whole group, as docs/method.md 6 steps 1-10."""
    frames, n, d = features.shape
    h, w = grid
    rows = features.reshape(frames * n, d)
    pca = PCA(n_components=k, svd_solver="full").fit(rows)
    y = pca.transform(rows)                                     # centred scores
    ratios = pca.explained_variance_ratio_                      # / total variance
    border = np.zeros((h, w), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    border = np.tile(border.ravel(), frames)
    for j in range(k):
        border_mean, extreme = y[border, j].mean(), y[np.abs(y[:, j]).argmax(), j]
        # Tie-break of vipo.psm.maps.orient: no usable border -> the extreme score is negative.
        tied = abs(border_mean) <= 1e-4 * np.abs(y[:, j]).max()
        if (extreme > 0) if tied else (border_mean < 0):
            y[:, j] = -y[:, j]
    if aggregation == "weighted":
        s = sum(ratios[j] * _ref_reverse(y[:, j]) for j in range(k))
    elif aggregation == "average":
        s = _ref_reverse(y.mean(axis=1))
    else:
        s = _ref_reverse(y[:, 0])
    s = np.clip(s, 0, 1).reshape(frames, h, w)
    if sigma > 0:
        s = np.stack([gaussian_filter(f, sigma, mode="reflect", truncate=4.0) for f in s])
    s = _ref_minmax(s)
    return _ref_minmax(_ref_resize(s, latent))


def structured_features(batch, grid, d, *, seed=0, rank=6):
    """Patch features with a clear subject: a rectangular block shifted by its own direction,
    plus a decaying low-rank background and noise, so the top components are well separated
    and the border sign is unambiguous (what DINOv2 features on a centred object look like)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    block = torch.zeros(h, w)
    block[h // 4: h - h // 4, w // 3: w - w // 3] = 1.0
    scale = torch.arange(1, rank + 1, dtype=torch.float64) ** -1.0
    coef = torch.randn(batch, h * w, rank, generator=g, dtype=torch.float64) * scale
    background = coef @ torch.randn(batch, rank, d, generator=g, dtype=torch.float64)
    subject = block.reshape(1, -1, 1).double() * 3 * torch.randn(batch, 1, d, generator=g,
                                                                 dtype=torch.float64)
    noise = 0.05 * torch.randn(batch, h * w, d, generator=g, dtype=torch.float64)
    offset = torch.randn(batch, 1, d, generator=g, dtype=torch.float64)
    return background + subject + noise + offset


# ----------------------------------------------------------------------------- reference match

CASES = {  # grid, D: both Gram sides, and sizes that take the eigh and the subspace paths
    "N>D small": ((16, 20), 48),
    "D>N small": ((7, 9), 200),
    "N>D large": ((24, 25), 160),
    "D>N large": ((12, 13), 300),
    "odd 1-row": ((1, 11), 8),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("solver", ["auto", "eigh", "subspace"])
def test_matches_float64_reference(case, solver):
    grid, d = CASES[case]
    features = structured_features(3, grid, d, seed=len(case))
    latent = (11, 6)
    got = allocation_maps_from_features(features.float(), grid, latent, pca_solver=solver)
    assert got.dtype == torch.float32 and got.shape == (3, *latent)
    want = np.stack([reference_maps(features[b:b + 1].numpy(), grid, latent)[0] for b in range(3)])
    err = np.abs(got.double().numpy() - want).max()
    print(f"{case} {solver}: max abs err {err:.2e}")
    assert err < ATOL


@pytest.mark.parametrize("aggregation", ["weighted", "average", "first_pc"])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_options_match_reference(aggregation, sigma, k):
    grid, d = (10, 14), 40
    features = structured_features(2, grid, d, seed=k)
    got = allocation_maps_from_features(features.float(), grid, (20, 9), n_components=k,
                                        aggregation=aggregation, sigma=sigma)
    want = np.stack([reference_maps(features[b:b + 1].numpy(), grid, (20, 9), k, aggregation,
                                    sigma)[0] for b in range(2)])
    assert np.abs(got.double().numpy() - want).max() < ATOL


def test_subspace_matches_eigh_on_a_dinov2_sized_grid():
    # A 37x37 grid (DINOv2 at 518 px); D kept at 384 so the exact eigh stays cheap on CPU.
    features = structured_features(2, (37, 37), 384, seed=3).float()
    exact = allocation_maps_from_features(features, (37, 37), (64, 64), pca_solver="eigh")
    fast = allocation_maps_from_features(features, (37, 37), (64, 64), pca_solver="subspace")
    assert (fast - exact).abs().max() < ATOL


def test_subspace_falls_back_to_eigh_on_degenerate_spectrum(monkeypatch):
    # Isotropic noise: eigenvalues 3 and 4 are nearly equal, so the iteration cannot reach
    # the residual tolerance; the fallback must run and give the exact eigh result.
    features = torch.randn(2, 300, 160)
    exact = allocation_maps_from_features(features, (15, 20), (8, 8), pca_solver="eigh",
                                          aggregation="first_pc")
    calls = []
    original = maps_module._top_eigh
    monkeypatch.setattr(maps_module, "_top_eigh",
                        lambda gram, k: calls.append(gram.shape[0]) or original(gram, k))
    fast = allocation_maps_from_features(features, (15, 20), (8, 8), pca_solver="subspace",
                                         aggregation="first_pc")
    assert calls == [2]
    torch.testing.assert_close(fast, exact, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- invariances

@pytest.mark.parametrize("solver", ["eigh", "subspace"])
def test_invariant_to_sign_permutation_and_offset(solver):
    grid, d = (14, 15), 160   # both solvers at their own sizes
    features = structured_features(3, grid, d, seed=7).float()
    base = allocation_maps_from_features(features, grid, (9, 9), pca_solver=solver)
    perm = torch.randperm(d)
    for name, variant in {"negated": -features, "permuted": features[..., perm],
                          "offset": features + 5.0}.items():
        got = allocation_maps_from_features(variant, grid, (9, 9), pca_solver=solver)
        err = (got - base).abs().max().item()
        assert err < 1e-5, f"{name}: {err}"


def test_block_is_high_and_border_low():
    h, w = 20, 24
    features = 0.1 * torch.randn(2, h * w, 64)
    block = torch.zeros(h, w, dtype=torch.bool)
    block[6:14, 8:16] = True
    features[:, block.flatten()] += torch.randn(2, 1, 64)
    maps = allocation_maps_from_features(features, (h, w), (h, w))        # latent = grid
    inner = torch.zeros(h, w, dtype=torch.bool)
    inner[8:12, 10:14] = True
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert maps[:, inner].min() > 0.9
    assert maps[:, border].max() < 0.1


def test_constant_features_give_ones():
    features = torch.ones(2, 30, 8) * torch.arange(8.0)
    for normalize, extra in [("minmax", {}), ("mean_one", {}), ("floor", {"floor": 0.3})]:
        maps = allocation_maps_from_features(features, (5, 6), (7, 4), normalize=normalize, **extra)
        assert torch.equal(maps, torch.ones(2, 7, 4))


def test_normalizations():
    features = structured_features(2, (8, 9), 20).float()
    base = allocation_maps_from_features(features, (8, 9), (16, 18))
    assert torch.allclose(base.amax((1, 2)), torch.ones(2)) and base.amin() == 0
    mean_one = allocation_maps_from_features(features, (8, 9), (16, 18), normalize="mean_one")
    torch.testing.assert_close(mean_one.mean((1, 2)), torch.ones(2))
    torch.testing.assert_close(mean_one, base / base.mean((1, 2), keepdim=True))
    floor = allocation_maps_from_features(features, (8, 9), (16, 18), normalize="floor", floor=0.25)
    torch.testing.assert_close(floor, 0.25 + 0.75 * base)


def test_gaussian_matrix_matches_scipy():
    for size in (1, 2, 3, 5, 37):
        for sigma in (0.3, 1.0, 2.5, 7.0):       # 7.0: the kernel is longer than the input
            x = np.random.default_rng(size).standard_normal((size, 4))
            want = gaussian_filter1d(x, sigma, axis=0, mode="reflect", truncate=4.0)
            got = gaussian_matrix(size, sigma, dtype=torch.float64).numpy() @ x
            np.testing.assert_allclose(got, want, atol=1e-12)


def test_maps_are_batched_on_the_features_device_and_deterministic():
    features = structured_features(4, (37, 37), 256, seed=1).float()
    first = allocation_maps_from_features(features, (37, 37), (64, 64))
    again = allocation_maps_from_features(features, (37, 37), (64, 64))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    one = allocation_maps_from_features(features[2:3], (37, 37), (64, 64))
    torch.testing.assert_close(one[0], first[2], atol=1e-5, rtol=0)
    assert first.device == features.device


# ----------------------------------------------------------------------------- video

def _reference_video(features, grid, latent, temporal_sigma, joint):
    frames = features.shape[0]
    t, h, w = latent
    if joint:
        maps = reference_maps(features, grid, (h, w))
    else:
        maps = np.stack([reference_maps(features[f:f + 1], grid, (h, w))[0] for f in range(frames)])
    resampled = F.interpolate(torch.from_numpy(maps)[None, None], size=(t, h, w),
                              mode="trilinear", align_corners=False)[0, 0].numpy()
    if temporal_sigma > 0:
        resampled = gaussian_filter1d(resampled, temporal_sigma, axis=0, mode="reflect",
                                      truncate=4.0)
    return _ref_minmax(resampled)


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("frames,latent", [(5, (2, 6, 7)), (9, (3, 5, 4)), (2, (4, 3, 3))])
def test_video_matches_reference(joint, frames, latent):
    grid = (6, 8)
    features = torch.stack([structured_features(frames, grid, 24, seed=s) for s in range(2)])
    got = video_maps_from_features(features.float(), grid, latent, joint_pca=joint)
    assert got.shape == (2, *latent) and got.dtype == torch.float32
    want = np.stack([_reference_video(features[b].numpy(), grid, latent, 0.3, joint)
                     for b in range(2)])
    assert np.abs(got.double().numpy() - want).max() < ATOL


def test_joint_pca_keeps_relative_frame_strength():
    grid = (10, 10)
    clip = structured_features(1, grid, 32, seed=4)[0]
    centre = clip.mean(0)
    weak = centre + 0.3 * (clip - centre)       # same layout, less structure
    features = torch.stack([clip, weak, clip])[None].float()   # (1, 3, N, D)
    per_frame = video_maps_from_features(features, grid, (3, 10, 10), temporal_sigma=0)
    joint = video_maps_from_features(features, grid, (3, 10, 10), temporal_sigma=0,
                                     joint_pca=True)
    # Per-frame PCA renormalises every frame; the joint basis keeps the weak frame weaker.
    torch.testing.assert_close(per_frame[0, 1], per_frame[0, 0], atol=1e-4, rtol=0)
    assert joint[0, 1].max() < 0.9 * joint[0, 0].max()
    torch.testing.assert_close(joint[0, 2], joint[0, 0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input

GOOD = dict(features=torch.randn(2, 12, 5), grid=(3, 4), latent_size=(4, 4))


@pytest.mark.parametrize("change,match", [
    (dict(features=torch.randn(12, 5)), "features"),
    (dict(features=torch.randn(1, 2, 12, 5)), "features"),
    (dict(features=torch.randint(0, 3, (2, 12, 5))), "features"),
    (dict(features=torch.full((2, 12, 5), float("nan"))), "features"),
    (dict(grid=(4, 4)), "grid"),
    (dict(grid=(3, 4, 1)), "grid"),
    (dict(grid=(3.0, 4)), "grid"),
    (dict(latent_size=(4,)), "latent_size"),
    (dict(latent_size=(0, 4)), "latent_size"),
    (dict(aggregation="max"), "aggregation"),
    (dict(normalize="zscore"), "normalize"),
    (dict(normalize="floor"), "floor"),
    (dict(normalize="floor", floor=1.5), "floor"),
    (dict(floor=0.2), "floor"),
    (dict(sigma=-1.0), "sigma"),
    (dict(n_components=0), "n_components"),
    (dict(n_components=6), "n_components"),
    (dict(pca_solver="lobpcg"), "pca_solver"),
])
def test_bad_input_raises_value_error(change, match):
    kwargs = {**GOOD, **change}
    args = [kwargs.pop(name) for name in ("features", "grid", "latent_size")]
    with pytest.raises(ValueError, match=match):
        allocation_maps_from_features(*args, **kwargs)


@pytest.mark.parametrize("change,match", [
    (dict(features=torch.randn(2, 12, 5)), "features"),
    (dict(latent_size=(4, 4)), "latent_size"),
    (dict(temporal_sigma=-0.3), "temporal_sigma"),
    (dict(aggregation="mean"), "aggregation"),
])
def test_video_bad_input_raises_value_error(change, match):
    kwargs = {"features": torch.randn(1, 3, 12, 5), "grid": (3, 4), "latent_size": (2, 4, 4),
              **change}
    args = [kwargs.pop(name) for name in ("features", "grid", "latent_size")]
    with pytest.raises(ValueError, match=match):
        video_maps_from_features(*args, **kwargs)


# ----------------------------------------------------------------------------- overlay

def test_overlay_is_a_png_ready_heat_map(tmp_path):
    from PIL import Image
    images = torch.full((2, 3, 30, 40), 0.5)
    maps = torch.zeros(2, 6, 8)
    maps[:, :, 4:] = 1.0
    out = overlay(images, maps)
    assert out.dtype == torch.uint8 and out.shape == (2, 30, 40, 3)
    # High map -> red end, low map -> blue end of the ramp.
    assert out[0, 15, 35, 0] > out[0, 15, 35, 2] and out[0, 15, 2, 2] > out[0, 15, 2, 0]
    Image.fromarray(out[0].numpy()).save(tmp_path / "o.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), out[0].numpy())
    ones = overlay(images, torch.ones(2, 6, 8))        # the failure fallback shows as "high"
    assert torch.equal(ones[:, :, :], ones[:1, :1, :1].expand_as(ones))
    assert ones[0, 0, 0, 0] > ones[0, 0, 0, 2]
    with pytest.raises(ValueError, match="maps"):
        overlay(images, maps[:1])


def test_import_is_light():
    code = "import sys, vipo.psm; print('transformers' in sys.modules, 'sklearn' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False"]
