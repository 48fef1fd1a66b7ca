"""PSM feature -> map stage: batched torch against a per-image scikit-learn loop.

Shape: 12 images (one Flux group, G = 12) of DINOv2-L features at 518 px, a 37x37 grid of
D = 1024, mapped to a 64x64 latent grid (Flux at 512 px). The loop is the authors' release
structure (fastvideo/train_vipo_flux.py, compute_dinov2_feature_map: one sklearn
PCA(n_components=3).fit_transform per image on fp32 numpy features, scipy gaussian_filter,
torch interpolate), with docs/method.md 6's sign rule and normalisation so both compute the same
maps. Results are checked against each other and against a float64 exact PCA before timing.

    PYTHONPATH=. python -m pytest benchmarks/bench_psm.py --benchmark-only
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vipo.psm import allocation_maps_from_features

BATCH, GRID, DIM, LATENT = 12, (37, 37), 1024, (64, 64)


def dinov2_like_features(seed=0):
    """A centred subject block over a background with a decaying spectrum (top-3 explained
    variance ~0.85, like DINOv2 patch features of an object-centric image), plus noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = GRID
    block = torch.zeros(h, w)
    block[h // 4: h - h // 4, w // 3: w - w // 3] = 1.0
    rank = 32
    coef = torch.randn(BATCH, h * w, rank, generator=g) * torch.arange(1, rank + 1) ** -1.0
    background = coef @ torch.randn(BATCH, rank, DIM, generator=g)
    subject = block.reshape(1, -1, 1) * 3 * torch.randn(BATCH, 1, DIM, generator=g)
    return background + subject + 0.05 * torch.randn(BATCH, h * w, DIM, generator=g)


def sklearn_loop(features: np.ndarray, svd_solver="auto") -> np.ndarray:
    """One image at a time, as the release does; steps follow docs/method.md 6."""
    from scipy.ndimage import gaussian_filter
    from sklearn.decomposition import PCA

    h, w = GRID
    border = np.zeros((h, w), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    border = border.ravel()
    maps = []
    for image in features:
        pca = PCA(n_components=3, svd_solver=svd_solver)
        scores = pca.fit_transform(image)
        scores *= np.where(scores[border].mean(0) < 0, -1.0, 1.0)           # sign rule
        span = scores.max(0) - scores.min(0)
        reverse = (scores.max(0) - scores) / span
        weights = (reverse * pca.explained_variance_ratio_).sum(1)
        patch = gaussian_filter(np.clip(weights, 0, 1).reshape(h, w), sigma=1.0)
        patch = (patch - patch.min()) / (patch.max() - patch.min())
        latent = F.interpolate(torch.from_numpy(patch).float()[None, None], size=LATENT,
                               mode="bilinear", align_corners=False, antialias=True)[0, 0]
        maps.append(((latent - latent.min()) / (latent.max() - latent.min())).numpy())
    return np.stack(maps)


@pytest.fixture(scope="module")
def features():
    """The benchmark input, checked before anything is timed (--benchmark-only skips plain
    tests, so the check lives in the fixture both benchmarks use)."""
    data = dinov2_like_features()
    batched = allocation_maps_from_features(data, GRID, LATENT).numpy()
    loop = sklearn_loop(data.numpy())
    exact = sklearn_loop(data.double().numpy(), svd_solver="full")
    print(f"\nmax |batched - float64 full PCA| = {np.abs(batched - exact).max():.2e}, "
          f"max |sklearn loop - float64 full PCA| = {np.abs(loop - exact).max():.2e}")
    assert np.abs(batched - exact).max() < 1e-4
    assert np.abs(batched - loop).max() < 1e-4
    return data


def _machine_info(benchmark):
    benchmark.extra_info.update(shape=f"B={BATCH}, grid={GRID}, D={DIM}, latent={LATENT}",
                                torch=torch.__version__, threads=torch.get_num_threads())


def test_batched_torch(benchmark, features):
    _machine_info(benchmark)
    result = benchmark.pedantic(allocation_maps_from_features, args=(features, GRID, LATENT),
                                rounds=5, iterations=1, warmup_rounds=1)
    assert result.shape == (BATCH, *LATENT)


def test_sklearn_loop(benchmark, features):
    _machine_info(benchmark)
    array = features.numpy()
    result = benchmark.pedantic(sklearn_loop, args=(array,), rounds=5, iterations=1,
                                warmup_rounds=1)
    assert result.shape == (BATCH, *LATENT)
