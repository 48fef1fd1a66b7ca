"""Feature -> allocation-map stage of the Perceptual Structuring Module (docs/method.md section 6).

Everything here is batched over images in torch, fp32, on the features' device: no per-image
Python loop, no scikit-learn. Shapes: B images, N = h*w patches, D feature channels, K
components, (H, W) latent grid, F frames, T latent frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AGGREGATIONS = ("weighted", "average", "first_pc")
NORMALIZATIONS = ("minmax", "mean_one", "floor")
PCA_SOLVERS = ("auto", "eigh", "subspace")
CONSTANT_SPAN = 1e-8  # docs/method.md 6: max - min <= 1e-8 counts as a constant map

# Subspace iteration (pca_solver="subspace"): block size, residual tolerance (relative to the
# largest eigenvalue) and iteration cap. Items still above the tolerance at the cap are
# recomputed with the exact eigh, so the cap bounds the time, never the accuracy.
_EXTRA_VECTORS = 13     # block = K + 13, as scikit-learn's randomized SVD oversamples by 10
_RESIDUAL_TOL = 2e-6
_MAX_ITERS = 32
_EIGH_MAX_SIZE = 128    # auto: for min(N, D) up to this the exact eigh is already cheap
# A border mean below this fraction of max|y_j| is round-off (fp32 scores are good to ~1e-6
# relative), so the border cannot decide the sign; see orient().
_SIGN_TIE = 1e-4


# ----------------------------------------------------------------------------- validation

def _pair(value, name: str) -> tuple[int, ...]:
    return _int_tuple(value, name, 2)


def _int_tuple(value, name: str, length: int) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of {length} positive ints, "
                         f"got {value!r}") from None
    if len(items) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                       for v in items):
        raise ValueError(f"{name} must be a tuple of {length} positive ints, got {value!r}")
    return items


def check_map_options(*, n_components=3, aggregation="weighted", sigma=1.0, normalize="minmax",
                      floor=None, pca_solver="auto") -> dict:
    """Validates the map options shared by images and video; returns them as a dict."""
    if not isinstance(n_components, int) or isinstance(n_components, bool) or n_components < 1:
        raise ValueError(f"n_components must be a positive int, got {n_components!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0 (patch units), got {sigma!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "floor":
        if not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
            raise ValueError(f"normalize='floor' needs floor= in [0, 1], got floor={floor!r}")
    elif floor is not None:
        raise ValueError(f"floor= is only used with normalize='floor', got normalize={normalize!r}")
    if pca_solver not in PCA_SOLVERS:
        raise ValueError(f"pca_solver must be one of {PCA_SOLVERS}, got {pca_solver!r}")
    return dict(n_components=n_components, aggregation=aggregation, sigma=float(sigma),
                normalize=normalize, floor=floor, pca_solver=pca_solver)


def _check_features(features, rank: int, layout: str) -> None:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch.Tensor {layout}, got {type(features).__name__}")
    if features.ndim != rank:
        raise ValueError(f"features must be {layout}, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if 0 in features.shape:
        raise ValueError(f"features must not be empty, got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")


def _check_grid(grid, n_patches: int) -> tuple[int, int]:
    grid = _pair(grid, "grid")
    if grid[0] * grid[1] != n_patches:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches but features have "
                         f"N={n_patches}")
    return grid


# ----------------------------------------------------------------------------- PCA (steps 1-2)

def _top_eigh(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(gram)                             # ascending
    return values.flip(-1)[..., :k], vectors.flip(-1)[..., :k]


def _top_subspace(operand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of A = operand^T operand (B, m, m) without forming A: block subspace
    iteration with Rayleigh-Ritz (Golub & Van Loan, Matrix Computations, 4th ed., 8.2.4).

    Each iteration is two skinny batched matmuls, O(N D (k + 13)), where forming A costs
    O(N D min(N, D)) and its eigh O(min(N, D)^3); applying A twice also avoids squaring the
    condition number in fp32. The residual test reuses A Q, so it costs no extra pass."""
    batch, _, m = operand.shape
    block = min(m, k + _EXTRA_VECTORS)
    # A fixed seed keeps the maps deterministic without touching the global RNG.
    generator = torch.Generator(device=operand.device).manual_seed(0)
    basis = torch.randn(batch, m, block, generator=generator, device=operand.device,
                        dtype=operand.dtype)
    basis = torch.linalg.qr(basis).Q                                        # (B, m, block)
    for _ in range(_MAX_ITERS):
        image = operand.mT @ (operand @ basis)                              # A Q
        projected = basis.mT @ image
        values, small = torch.linalg.eigh(0.5 * (projected + projected.mT))
        top_values, small = values.flip(-1)[:, :k], small.flip(-1)[..., :k]
        top_vectors = basis @ small                                         # Ritz vectors
        residual = torch.linalg.vector_norm(image @ small - top_vectors * top_values[:, None],
                                            dim=-2).amax(-1)                # (B,)
        # Relative to the largest Ritz value; all-zero input has residual 0 and converges.
        unconverged = residual > _RESIDUAL_TOL * top_values[:, 0]
        if not unconverged.any():
            return top_values, top_vectors
        basis = torch.linalg.qr(image).Q
    gram = operand[unconverged].mT @ operand[unconverged]
    top_values[unconverged], top_vectors[unconverged] = _top_eigh(gram, k)
    return top_values, top_vectors


def principal_scores(features: torch.Tensor, n_components: int, pca_solver: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2: PCA scores y_j = S_j U_j (B, N, K) and explained-variance ratios
    lambda_j = S_j^2 / ||F~||_F^2 (B, K), relative to the total variance.

    The eigenproblem is solved on the smaller side, m = min(N, D): the right singular vectors
    V from F~^T F~ when N >= D, the left ones U from F~ F~^T when D > N; both have
    eigenvalues S_j^2."""
    centred = features.float() - features.float().mean(dim=1, keepdim=True)   # (B, N, D)
    n, d = centred.shape[-2:]
    operand = centred if n >= d else centred.mT                    # (B, max, m)
    use_eigh = pca_solver == "eigh" or (pca_solver == "auto" and min(n, d) <= _EIGH_MAX_SIZE)
    if use_eigh:
        values, vectors = _top_eigh(operand.mT @ operand, n_components)
    else:
        values, vectors = _top_subspace(operand, n_components)
    values = values.clamp_min(0.0)                 # round-off can make a zero eigenvalue < 0
    if n >= d:
        scores = centred @ vectors                         # F~ V = U S
    else:
        scores = vectors * values.sqrt()[:, None]          # eigenvectors of F~ F~^T are U
    total = torch.linalg.vector_norm(centred, dim=(1, 2))[:, None] ** 2   # ||F~||_F^2
    ratios = torch.where(total > 0, values / total.clamp_min(torch.finfo(total.dtype).tiny),
                         torch.zeros_like(values))
    return scores, ratios


# ----------------------------------------------------------------------------- steps 3-6

def border_mask(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(h*w,) bool: the outer ring of the patch grid."""
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask.flatten()


def orient(scores: torch.Tensor, border: torch.Tensor) -> torch.Tensor:
    """Step 3: flip each component whose mean over the border patches is negative, so the
    background scores positive and the subject negative, whatever the solver's sign.

    Tie-break (beyond docs/method.md): when the border mean is zero up to round-off, the sign is
    set so that the largest-magnitude score is negative (the subject is the outlier). This
    always happens on grids with no interior (h <= 2 or w <= 2), where every patch is on the
    border and centred scores average to exactly zero. The rule is sign-invariant too."""
    magnitude = scores.abs()
    border_mean = scores[:, border].mean(dim=1, keepdim=True)                # (B, 1, K)
    extreme = scores.gather(1, magnitude.argmax(dim=1, keepdim=True))         # (B, 1, K)
    tied = border_mean.abs() <= _SIGN_TIE * magnitude.amax(dim=1, keepdim=True)
    flip = torch.where(tied, extreme > 0, border_mean < 0)
    return torch.where(flip, -scores, scores)


def _reverse_minmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(max - x) / (max - min) along dim; a constant slice gives 0.5 (step 4)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    span = hi - lo
    out = (hi - x) / span.clamp_min(CONSTANT_SPAN)
    return torch.where(span > CONSTANT_SPAN, out, torch.full_like(x, 0.5))


def minmax(x: torch.Tensor, dims) -> torch.Tensor:
    """(x - min) / (max - min) over dims; a constant slice becomes all ones (docs/method.md 6:
    plain GRPO weighting, where the authors' normaliser silently zeroed the sample)."""
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    span = hi - lo
    out = (x - lo) / span.clamp_min(CONSTANT_SPAN)
    return torch.where(span > CONSTANT_SPAN, out, torch.ones_like(x))


def aggregate(scores: torch.Tensor, ratios: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Steps 4-6 on oriented scores (B, N, K): reverse min-max, aggregation, clip -> (B, N)."""
    if aggregation == "weighted":
        combined = (_reverse_minmax(scores, dim=1) * ratios[:, None]).sum(-1)
    elif aggregation == "average":
        combined = _reverse_minmax(scores.mean(-1), dim=1)
    else:  # first_pc
        combined = _reverse_minmax(scores[..., 0], dim=1)
    return combined.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- smoothing

def gaussian_matrix(size: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(size, size) matrix G with G @ x == scipy.ndimage.gaussian_filter1d(x, sigma) along the
    first axis: mode="reflect" (d c b a | a b c d, repeated for kernels longer than the input),
    kernel truncated at 4 sigma with radius int(4 sigma + 0.5), weights normalised to sum 1.
    Written from the scipy documentation of gaussian_filter1d; the matrix form makes a 2-D
    filter two small batched matmuls and handles any radius."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    index = torch.arange(size, device=device)[:, None] + offsets.long()[None]   # (size, 2r+1)
    index = index.remainder(2 * size)
    index = torch.where(index < size, index, 2 * size - 1 - index)             # half-sample reflect
    matrix = torch.zeros(size, size, device=device, dtype=torch.float64)
    matrix.scatter_add_(1, index, weights.expand(size, -1).contiguous())
    return matrix.to(dtype)


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Step 7 on (..., h, w): 2-D Gaussian in patch units; sigma=0 is the no-smoothing ablation."""
    if sigma == 0:
        return maps
    h, w = maps.shape[-2:]
    rows = gaussian_matrix(h, sigma, device=maps.device, dtype=maps.dtype)
    cols = gaussian_matrix(w, sigma, device=maps.device, dtype=maps.dtype)
    return rows @ maps @ cols.mT


def normalize_maps(maps: torch.Tensor, dims, normalize: str, floor) -> torch.Tensor:
    """docs/method.md 6 map_norm, applied per sample to min-max maps."""
    if normalize == "mean_one":
        return maps / maps.mean(dims, keepdim=True)       # mean > 0 because max == 1
    if normalize == "floor":
        return floor + (1.0 - floor) * maps
    return maps


# ----------------------------------------------------------------------------- pipeline

def _maps_per_group(features: torch.Tensor, grid: tuple[int, int], latent_size: tuple[int, int],
                    frames: int, opts: dict) -> torch.Tensor:
    """Steps 1-10 where one PCA is fitted per row of features (B, frames*N, D) and every
    min-max runs over that row's frames together. Returns (B, frames, H, W), min-max."""
    batch = features.shape[0]
    h, w = grid
    scores, ratios = principal_scores(features, opts["n_components"], opts["pca_solver"])
    border = border_mask(grid, features.device).repeat(frames)               # (frames*N,)
    combined = aggregate(orient(scores, border), ratios, opts["aggregation"])   # (B, frames*N)
    patch_maps = smooth(combined.view(batch, frames, h, w), opts["sigma"])
    patch_maps = minmax(patch_maps, (1, 2, 3))                                # step 8
    latent = F.interpolate(patch_maps, size=latent_size, mode="bilinear",      # step 9
                           align_corners=False, antialias=True)
    return minmax(latent, (1, 2, 3))                                          # step 10


def allocation_maps_from_features(features: torch.Tensor, grid, latent_size, *,
                                  n_components: int = 3,
                                  aggregation: str = "weighted", sigma: float = 1.0,
                                  normalize: str = "minmax", floor: float | None = None,
                                  pca_solver: str = "auto") -> torch.Tensor:
    """Allocation maps M from patch features (docs/method.md section 6, steps 1-10 + map_norm).

    Args:
        features: (B, N, D) patch features, any float dtype; N = h*w in row-major grid order.
        grid: (h, w) patch grid.
        latent_size: (H, W) latent grid of the generator.
        n_components: K principal components (1 <= K <= min(N, D)).
        aggregation: "weighted" (sum of lambda_j y'_j), "average" or "first_pc".
        sigma: Gaussian smoothing in patch units; 0 disables it.
        normalize: "minmax" (M as is), "mean_one" (M / mean M) or "floor" (floor + (1-floor) M).
        floor: alpha in [0, 1], only with normalize="floor".
        pca_solver: "auto", "eigh" (exact, O(min(N,D)^3)) or "subspace" (block subspace
            iteration, exact eigh fallback for items that do not converge).

    Returns:
        (B, H, W) fp32 maps on the features' device; "minmax" maps lie in [0, 1] with max 1.
    """
    opts = check_map_options(n_components=n_components, aggregation=aggregation, sigma=sigma,
                             normalize=normalize, floor=floor, pca_solver=pca_solver)
    _check_features(features, 3, "(B, N, D)")
    grid = _check_grid(grid, features.shape[1])
    latent_size = _pair(latent_size, "latent_size")
    _check_components(n_components, features.shape[1], features.shape[2])
    maps = _maps_per_group(features, grid, latent_size, 1, opts)[:, 0]        # (B, H, W)
    return normalize_maps(maps, (1, 2), normalize, floor)


def _check_components(n_components: int, n: int, d: int) -> None:
    if n_components > min(n, d):
        raise ValueError(f"n_components={n_components} exceeds min(N, D) = min({n}, {d})")


def video_maps_from_features(features: torch.Tensor, grid, latent_size, *,
                             temporal_sigma: float = 0.3,
                             joint_pca: bool = False, **map_options) -> torch.Tensor:
    """Video allocation maps (docs/method.md 6, Video) from per-frame patch features.

    Args:
        features: (B, F, N, D) patch features of F decoded frames.
        grid: (h, w) patch grid of each frame.
        latent_size: (T, H, W) latent frames and grid.
        temporal_sigma: 1-D Gaussian along the T latent frames, in frames; 0 disables it.
        joint_pca: fit one PCA basis, lambda and sign per clip on the stacked patches of all
            frames (beyond the paper). Every min-max of steps 4-10 then spans the whole clip,
            so no step renormalises single frames (that is what stops the flicker).
        **map_options: as allocation_maps_from_features.

    Returns:
        (B, T, H, W) fp32 maps, one global min-max per clip, then map_options["normalize"].
    """
    opts = check_map_options(**map_options)
    _check_features(features, 4, "(B, F, N, D)")
    if not isinstance(temporal_sigma, (int, float)) or not math.isfinite(temporal_sigma) \
            or temporal_sigma < 0:
        raise ValueError(f"temporal_sigma must be a finite number >= 0, got {temporal_sigma!r}")
    batch, frames, n, d = features.shape
    grid = _check_grid(grid, n)
    t, h, w = _int_tuple(latent_size, "latent_size", 3)
    _check_components(opts["n_components"], frames * n if joint_pca else n, d)
    if joint_pca:
        maps = _maps_per_group(features.reshape(batch, frames * n, d), grid, (h, w), frames, opts)
    else:
        maps = _maps_per_group(features.reshape(batch * frames, n, d), grid, (h, w), 1, opts)
        maps = maps.view(batch, frames, h, w)
    maps = temporal_resample(maps, t, temporal_sigma)
    maps = minmax(maps, (1, 2, 3))
    return normalize_maps(maps, (1, 2, 3), opts["normalize"], opts["floor"])


def temporal_resample(maps: torch.Tensor, frames: int, sigma: float) -> torch.Tensor:
    """(B, F, H, W) -> (B, T, H, W): trilinear (align_corners=False; linear in time since H, W
    are unchanged) to T frames, then a 1-D reflected Gaussian of sigma frames along time."""
    batch, _, h, w = maps.shape
    maps = F.interpolate(maps[:, None], size=(frames, h, w), mode="trilinear",
                         align_corners=False)[:, 0]
    if sigma == 0:
        return maps
    kernel = gaussian_matrix(frames, sigma, device=maps.device, dtype=maps.dtype)
    return torch.einsum("st,bthw->bshw", kernel, maps)
