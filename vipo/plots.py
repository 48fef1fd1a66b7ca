"""Training curves as a PNG, drawn with Pillow (no plotting library needed).

    python -m vipo.plots RUN_DIR [KEY ...]     # writes RUN_DIR/curves.png

One panel per metric: the raw values in light grey, a moving average on top, the first
and last averaged values in the panel title. The trainer writes it when a run closes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .logging_utils import read_metrics

DEFAULT_KEYS = ("reward_mean", "loss", "approx_kl", "clip_frac_high", "map_mean")
PANEL_W, PANEL_H, MARGIN = 520, 170, 46


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` finite values (NaNs are skipped)."""
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
        kept = kept[-window:]
        out.append(sum(kept) / len(kept) if kept else math.nan)
    return out


def _panel(draw: ImageDraw.ImageDraw, top: int, key: str, xs: list[float], ys: list[float]):
    finite = [y for y in ys if math.isfinite(y)]
    left, right, bottom = MARGIN, PANEL_W - 12, top + PANEL_H - 24
    draw.rectangle([left, top + 22, right, bottom], outline=(160, 160, 160))
    if not finite:
        draw.text((left, top + 4), f"{key}: no finite values", fill=(0, 0, 0))
        return
    smooth = moving_average(ys, max(1, len(ys) // 20))
    lo, hi = min(finite), max(finite)
    hi = hi if hi > lo else lo + 1.0
    x_max = max(xs[-1], 1.0)

    def point(x, y):
        return (left + (right - left) * x / x_max,
                bottom - (bottom - top - 22) * (y - lo) / (hi - lo))

    for series, colour, width in ((ys, (200, 200, 200), 1), (smooth, (200, 30, 30), 2)):
        pts = [point(x, y) for x, y in zip(xs, series) if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=width)
    first, last = next(v for v in smooth if math.isfinite(v)), smooth[-1]
    draw.text((left, top + 4), f"{key}: {first:.4g} -> {last:.4g} (moving average)",
              fill=(0, 0, 0))
    draw.text((4, top + 22), f"{hi:.3g}", fill=(90, 90, 90))
    draw.text((4, bottom - 10), f"{lo:.3g}", fill=(90, 90, 90))
    draw.text((right - 60, bottom + 4), f"iter {int(x_max)}", fill=(90, 90, 90))


def plot_curves(metrics_csv, out_png, keys=DEFAULT_KEYS) -> Path:
    """Draws the ``keys`` columns of a run's metrics.csv that exist; returns the PNG path."""
    rows = read_metrics(metrics_csv)
    if not rows:
        raise ValueError(f"{metrics_csv} has no rows to plot")
    keys = [k for k in keys if k in rows[0]]
    if not keys:
        raise ValueError(f"none of the requested keys are columns of {metrics_csv}")
    image = Image.new("RGB", (PANEL_W, PANEL_H * len(keys)), "white")
    draw = ImageDraw.Draw(image)
    xs = [row["iteration"] for row in rows]
    for i, key in enumerate(keys):
        _panel(draw, i * PANEL_H, key, xs, [row[key] for row in rows])
    image.save(out_png)
    return Path(out_png)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    run_dir = Path(args[0])
    print(plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", args[1:] or DEFAULT_KEYS))


if __name__ == "__main__":
    main()
