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


BAND_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                (140, 86, 75), (227, 119, 194), (23, 190, 207), (127, 127, 127)]
LEGEND_ROW = 14


def plot_bands(panels: dict, out_png) -> Path:
    """One panel per metric with a mean line and a +-std band per method.

    panels: {metric: {method: (xs, means, stds)}}, as from vipo.experiments.compare."""
    keys = [k for k, series in panels.items() if series]
    if not keys:
        raise ValueError("plot_bands: nothing to plot")
    methods = list(next(iter(panels[k] for k in keys)))
    image = Image.new("RGB", (PANEL_W, PANEL_H * len(keys) + _legend_height(methods)), "white")
    draw = ImageDraw.Draw(image, "RGBA")
    for i, key in enumerate(keys):
        _band_panel(draw, i * PANEL_H, key, panels[key])
    _legend(draw, methods, PANEL_H * len(keys) + 4)
    image.save(out_png)
    return Path(out_png)


def _legend_rows(methods: list) -> list[list[tuple[int, str]]]:
    """(colour index, name) rows that fit the panel width."""
    rows, x = [[]], MARGIN
    for j, method in enumerate(methods):
        width = 8 + 7 * len(method)
        if rows[-1] and x + width > PANEL_W:
            rows.append([])
            x = MARGIN
        rows[-1].append((j, method))
        x += width
    return rows


def _legend_height(methods: list) -> int:
    return LEGEND_ROW * len(_legend_rows(methods)) + 6


def _legend(draw, methods: list, top: int) -> None:
    """Method names in their line colours, left to right, wrapped to the panel width."""
    for r, row in enumerate(_legend_rows(methods)):
        x = MARGIN
        for j, method in row:
            draw.text((x, top + r * LEGEND_ROW), method,
                      fill=BAND_COLOURS[j % len(BAND_COLOURS)])
            x += 8 + 7 * len(method)


def _band_panel(draw, top: int, key: str, series: dict) -> None:
    left, right, bottom = MARGIN, PANEL_W - 12, top + PANEL_H - 24
    draw.rectangle([left, top + 22, right, bottom], outline=(160, 160, 160))
    values = [v for xs, m, s in series.values() for a, b in zip(m, s) for v in (a - b, a + b)
              if math.isfinite(v)]
    if not values:
        draw.text((left, top + 4), f"{key}: no finite values", fill=(0, 0, 0))
        return
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    x_max = max(max(xs) for xs, _, _ in series.values()) or 1.0

    def point(x, y):
        return (left + (right - left) * x / x_max,
                bottom - (bottom - top - 22) * (y - lo) / (hi - lo))

    for j, (xs, means, stds) in enumerate(series.values()):
        colour = BAND_COLOURS[j % len(BAND_COLOURS)]
        upper = [point(x, m + s) for x, m, s in zip(xs, means, stds)]
        lower = [point(x, m - s) for x, m, s in zip(xs, means, stds)]
        if len(xs) > 1:
            draw.polygon(upper + lower[::-1], fill=colour + (50,))
            draw.line([point(x, m) for x, m in zip(xs, means)], fill=colour, width=2)
    draw.text((left, top + 4), f"{key} (mean +- std over seeds)", fill=(0, 0, 0))
    draw.text((4, top + 22), f"{hi:.3g}", fill=(90, 90, 90))
    draw.text((4, bottom - 10), f"{lo:.3g}", fill=(90, 90, 90))
    draw.text((right - 60, bottom + 4), f"iter {int(x_max)}", fill=(90, 90, 90))


def plot_xy(panels: dict, out_png, x_label: str) -> Path:
    """One panel per title, a line with dots per method: panels {title: {method: (xs, ys)}}
    (e.g. out-of-domain fidelity against in-domain reward, one point per evaluation)."""
    methods = list(dict.fromkeys(m for series in panels.values() for m in series))
    image = Image.new("RGB", (PANEL_W, PANEL_H * len(panels) + _legend_height(methods)), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, series) in enumerate(panels.items()):
        top = i * PANEL_H
        left, right, bottom = MARGIN, PANEL_W - 12, top + PANEL_H - 24
        draw.rectangle([left, top + 22, right, bottom], outline=(160, 160, 160))
        xs = [x for a, _ in series.values() for x in a if math.isfinite(x)]
        ys = [y for _, b in series.values() for y in b if math.isfinite(y)]
        if not xs or not ys:
            continue
        x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
        x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

        def point(x, y):
            return (left + (right - left) * (x - x_lo) / (x_hi - x_lo),
                    bottom - (bottom - top - 22) * (y - y_lo) / (y_hi - y_lo))

        for method, (a, b) in series.items():
            colour = BAND_COLOURS[methods.index(method) % len(BAND_COLOURS)]
            pts = [point(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for px, py in pts:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((left, top + 4), title, fill=(0, 0, 0))
        draw.text((4, top + 22), f"{y_hi:.3g}", fill=(90, 90, 90))
        draw.text((4, bottom - 10), f"{y_lo:.3g}", fill=(90, 90, 90))
        draw.text((left, bottom + 4), f"{x_label}: {x_lo:.3g}", fill=(90, 90, 90))
        draw.text((right - 60, bottom + 4), f"{x_hi:.3g}", fill=(90, 90, 90))
    _legend(draw, methods, PANEL_H * len(panels) + 4)
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
