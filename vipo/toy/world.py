"""The toy world: one object on a plain background, rendered in code (no data download).

    from vipo.toy import world
    spec = world.sample_spec(rng)            # rng: random.Random or a seed -> Spec
    text = world.prompt(spec)                # "a large blue triangle on a grey background, top left"
    image, mask = world.render(spec, size)   # (3, size, size) float32 in [0, 1]; (size, size) bool
    specs = world.heldout_specs()            # the fixed held-out evaluation set

Attributes: 5 shapes x 6 colours x 4 backgrounds x 9 positions (a 3 x 3 grid) x 2 sizes =
2160 combinations. About 10% of the combinations (chosen by a fixed hash, so every run and
every model agrees) form the held-out split: no model is trained on them, though each
attribute value on its own is seen in training.

Objects are large on purpose (about 17% and 28% of the image): a 30%-of-the-image map can
then cover them (the PSM's IoU metric), and a small autoencoder keeps their shape
(docs/toy_world.md, "Facts from the feasibility run": objects 7-10 px across in 32 px
blurred into blobs).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass, fields

import torch

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (0.86, 0.12, 0.12), "green": (0.13, 0.68, 0.20), "blue": (0.15, 0.30, 0.92),
           "yellow": (0.96, 0.84, 0.12), "purple": (0.56, 0.20, 0.76),
           "cyan": (0.10, 0.80, 0.86)}
BACKGROUNDS = {"grey": (0.50, 0.50, 0.50), "black": (0.07, 0.07, 0.07),
               "white": (0.94, 0.94, 0.94), "brown": (0.45, 0.30, 0.17)}
# Row-major 3 x 3 grid; the prompt says where the object's bounding box is centred.
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
             "bottom right")
SIZES = {"small": 0.17, "large": 0.28}  # object area as a fraction of the image
GRID = (0.3, 0.5, 0.7)                  # bounding-box centres, as fractions of the side
HELDOUT_PERCENT = 10
SUPERSAMPLE = 4                          # anti-aliasing: 4 x 4 samples per pixel

ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS),
              "position": POSITIONS, "size": tuple(SIZES)}


@dataclass(frozen=True)
class Spec:
    shape: str
    colour: str
    background: str
    position: str
    size: str

    def __post_init__(self):
        for name, allowed in ATTRIBUTES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Spec.{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")

    def labels(self) -> dict:
        """Class index of each attribute, in ATTRIBUTES order."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def all_specs() -> list[Spec]:
    """All 2160 combinations in a fixed order."""
    out = [Spec(s, c, b, p, z) for s in SHAPES for c in COLOURS for b in BACKGROUNDS
           for p in POSITIONS for z in SIZES]
    return out


def is_heldout(spec: Spec) -> bool:
    """The fixed split: a hash of the combination, not Python's salted hash()."""
    key = "|".join(getattr(spec, f.name) for f in fields(spec)).encode()
    return int(hashlib.sha256(key).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def train_specs() -> list[Spec]:
    return [s for s in all_specs() if not is_heldout(s)]


def heldout_specs() -> list[Spec]:
    """The held-out combinations (about 216), in a fixed order."""
    return [s for s in all_specs() if is_heldout(s)]


def _rng(rng) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def sample_spec(rng, split: str = "train") -> Spec:
    """One spec of the ``train`` (default) or ``heldout`` split, drawn with ``rng``."""
    pool = {"train": _TRAIN, "heldout": _HELDOUT}.get(split)
    if pool is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return _rng(rng).choice(pool)


def prompt(spec: Spec) -> str:
    return (f"a {spec.size} {spec.colour} {spec.shape} on a {spec.background} background, "
            f"{spec.position}")


def parse_prompt(text: str) -> Spec:
    """The inverse of ``prompt``; a ValueError names a text that is not a toy prompt."""
    spec = _PROMPTS.get(text.strip())
    if spec is None:
        raise ValueError(f"not a toy-world prompt: {text!r} (expected e.g. "
                         f"{prompt(_HELDOUT[0])!r})")
    return spec


# ---- rendering ------------------------------------------------------------------------------
def _polygon_inside(x: torch.Tensor, y: torch.Tensor, vertices: list) -> torch.Tensor:
    """Even-odd point-in-polygon test, vectorised over the sample grid."""
    inside = torch.zeros_like(x, dtype=torch.bool)
    n = len(vertices)
    for i in range(n):
        (x1, y1), (x2, y2) = vertices[i], vertices[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1 + 1e-12)
        inside ^= crosses & (x < x_at)
    return inside


def _star(points: int = 5, inner: float = 0.5) -> list:
    return [((1.0 if i % 2 == 0 else inner) * math.sin(math.pi * i / points),
             -(1.0 if i % 2 == 0 else inner) * math.cos(math.pi * i / points))
            for i in range(2 * points)]


# Unit outlines (y grows downwards), rescaled below to the same area as the unit circle.
_OUTLINES = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)],
    "star": _star(),
    "cross": [(-0.34, -1), (0.34, -1), (0.34, -0.34), (1, -0.34), (1, 0.34), (0.34, 0.34),
              (0.34, 1), (-0.34, 1), (-0.34, 0.34), (-1, 0.34), (-1, -0.34), (-0.34, -0.34)],
}


def _area(vertices: list) -> float:
    return 0.5 * abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2)
                         in zip(vertices, vertices[1:] + vertices[:1])))


def _unit_area_outline(shape: str) -> list:
    scale = math.sqrt(math.pi / _area(_OUTLINES[shape]))
    return [(x * scale, y * scale) for x, y in _OUTLINES[shape]]


_SCALED = {s: _unit_area_outline(s) for s in _OUTLINES}


def _extent(shape: str) -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) of the unit-area outline."""
    if shape == "circle":
        return -1.0, 1.0, -1.0, 1.0
    xs, ys = zip(*_SCALED[shape])
    return min(xs), max(xs), min(ys), max(ys)


def _inside(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if shape == "circle":
        return x * x + y * y <= 1.0
    return _polygon_inside(x, y, _SCALED[shape])


def render(spec: Spec, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, size, size) float32 image in [0, 1] (anti-aliased) and its (size, size) bool mask
    (pixels at least half covered by the object). Deterministic: no randomness at all."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    radius = size * math.sqrt(SIZES[spec.size] / math.pi)  # px: area = SIZES[...] * size^2
    x0, x1, y0, y1 = (v * radius for v in _extent(spec.shape))
    row, col = divmod(POSITIONS.index(spec.position), 3)
    # Centre the bounding box on the grid point, then shift it inside the frame (1 px margin).
    cx = _clamp(GRID[col] * size - (x0 + x1) / 2, 1 - x0, size - 1 - x1)
    cy = _clamp(GRID[row] * size - (y0 + y1) / 2, 1 - y0, size - 1 - y1)
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float64) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    inside = _inside(spec.shape, (x - cx) / radius, (y - cy) / radius)
    coverage = inside.double().view(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(dim=(1, 3))
    fg = torch.tensor(COLOURS[spec.colour], dtype=torch.float64).view(3, 1, 1)
    bg = torch.tensor(BACKGROUNDS[spec.background], dtype=torch.float64).view(3, 1, 1)
    image = bg + (fg - bg) * coverage
    return image.float(), coverage >= 0.5


def _clamp(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


@functools.lru_cache(maxsize=4096)
def _prompt_mask(text: str, size: int) -> torch.Tensor:
    return render(parse_prompt(text), size)[1]


def prompt_masks(prompts: list, size: int) -> torch.Tensor:
    """(N, size, size) bool: the rendered object mask of each toy prompt's spec, i.e. where
    the prompt says the object is (cached: the renderer is deterministic)."""
    return torch.stack([_prompt_mask(p, size) for p in prompts])


def render_batch(specs: list, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) images and (N, size, size) masks."""
    images, masks = zip(*(render(s, size) for s in specs))
    return torch.stack(images), torch.stack(masks)


_TRAIN = train_specs()
_HELDOUT = heldout_specs()
_PROMPTS = {prompt(s): s for s in all_specs()}
