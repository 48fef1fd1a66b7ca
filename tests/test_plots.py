"""The training-curve PNG: real pixels where the curve is, and clear errors."""

import csv
import math

import pytest
from PIL import Image

from vipo.plots import PANEL_H, moving_average, plot_curves


def _write_metrics(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_curve_is_drawn(tmp_path):
    rows = [{"iteration": i, "reward_mean": -0.2 + 0.001 * i, "loss": math.sin(i)}
            for i in range(100)]
    rows[10]["loss"] = "nan"
    _write_metrics(tmp_path / "metrics.csv", rows)
    out = plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png",
                      keys=("reward_mean", "loss", "not_a_column"))
    image = Image.open(out).convert("RGB")
    assert image.height == 2 * PANEL_H  # the missing column is skipped
    pixels = image.load()
    red = sum(1 for x in range(image.width) for y in range(image.height)
              if pixels[x, y][0] > 150 and pixels[x, y][1] < 80 and pixels[x, y][2] < 80)
    assert red > 200, "the moving-average curve was not drawn"


def test_moving_average_skips_nan():
    assert moving_average([1.0, math.nan, 3.0], 2) == [1.0, 1.0, 2.0]


def test_errors(tmp_path):
    (tmp_path / "empty.csv").write_text("iteration,reward_mean\n")
    with pytest.raises(ValueError, match="no rows"):
        plot_curves(tmp_path / "empty.csv", tmp_path / "x.png")
    _write_metrics(tmp_path / "m.csv", [{"iteration": 0, "other": 1.0}])
    with pytest.raises(ValueError, match="none of the requested keys"):
        plot_curves(tmp_path / "m.csv", tmp_path / "x.png")
