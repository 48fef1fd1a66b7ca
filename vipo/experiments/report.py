"""An experiment's report from its runs' results: ``results.md`` (tables), ``results.csv``
(every evaluation, mean and std over seeds), ``curves.png``, ``tradeoff.png``, ``grids.png``
and, for a sweep, ``sweep.png``. Every figure is a mean +- std over the seeds of a variant.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from .specs import ARMS, Experiment, clip_label

SHORT = {"eval_redness": "redness", "eval_object_redness": "object redness",
         "eval_background_redness": "background redness", "eval_toy_fidelity": "fidelity",
         "eval_structure_iou": "structure IoU"}
DETAIL_KEYS = ("eval_shape_acc", "eval_colour_acc", "eval_position_acc", "eval_background_acc")
AT_ITERATIONS = (30, 60, 100)


def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample std (0 for one value) and count of the finite values."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan, 0
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
            len(values))


def cell(values, digits: int = 3) -> str:
    m, s, n = mean_std(values)
    return "–" if n == 0 else f"{m:.{digits}f} ± {s:.{digits}f}"


def at_iteration(run: dict, key: str, iteration: int) -> float:
    rows = [r for r in run["eval"] if r["iteration"] == iteration]
    return rows[0].get(key, math.nan) if rows else math.nan


def at_level(run: dict, key: str, target: str, level: float) -> float:
    """``key`` where ``target`` first reaches ``level``, interpolated linearly between the
    evaluations around it (NaN if it never does): the comparison at equal gain."""
    rows = run["eval"]
    if rows and rows[0][target] >= level:
        return rows[0][key]
    for before, after in zip(rows, rows[1:]):
        r0, r1 = before[target], after[target]
        if r0 < level <= r1:
            w = (level - r0) / (r1 - r0)
            return before[key] + w * (after[key] - before[key])
    return math.nan


def at_gain(run: dict, key: str, target: str, gain: float) -> float:
    return at_level(run, key, target, run["eval"][0][target] + gain)


def reached(runs: list, target: str, gain: float) -> list:
    """The runs whose ``target`` got to its value before training plus ``gain``."""
    return [r for r in runs if math.isfinite(at_gain(r, "iteration", target, gain))]


def iterations_cell(runs: list, target: str, gain: float, none: str = "–") -> str:
    """Iterations to the gain, mean ± std over the runs that got there; "(k/n)" where not
    all did, ``none`` where none did."""
    hit = reached(runs, target, gain)
    text = cell([at_gain(r, "iteration", target, gain) for r in hit], 0) if hit else none
    return text if len(hit) == len(runs) else f"{text} ({len(hit)}/{len(runs)})"


def by_label(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault(r["label"], []).append(r)
    return out


def metrics(experiment: Experiment) -> list[str]:
    """The columns: target, the other region, the whole image's redness, structure."""
    keys = [experiment.target]
    keys += [experiment.off_target] if experiment.off_target else \
        ["eval_object_redness", "eval_background_redness"]
    keys += [k for k in ("eval_redness",) if k not in keys]
    return keys + ["eval_toy_fidelity", "eval_structure_iou"]


# ---- tables ---------------------------------------------------------------------------------
def equal_iterations(experiment: Experiment, groups: dict, last: int) -> list[str]:
    keys = metrics(experiment) + list(DETAIL_KEYS)
    names = [SHORT.get(k, k[5:]) for k in keys]
    lines = [f"| variant | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(keys)]
    first = next(iter(groups.values()))
    lines.append("| before training | – | " + " | ".join(
        cell([r["eval"][0].get(k, math.nan) for r in first]) for k in keys) + " |")
    for label, runs in groups.items():
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(
            cell([at_iteration(r, k, last) for r in runs]) for k in keys) + " |")
    return lines


def target_over_time(experiment: Experiment, groups: dict, last: int) -> list[str]:
    its = [i for i in AT_ITERATIONS if i < last] + [last]
    keys = [experiment.target] + ([experiment.off_target] if experiment.off_target else [])
    heads = [f"{SHORT[k]}, it. {i}" for k in keys for i in its]
    lines = ["| variant | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for label, runs in groups.items():
        lines.append(f"| {label} | " + " | ".join(
            cell([at_iteration(r, k, i) for r in runs]) for k in keys for i in its) + " |")
    return lines


def summary(experiment: Experiment, groups: dict, last: int) -> list[str]:
    """One row per variant: the target at iteration 30 and at the end; at the headline gain
    the iterations it took, the other region's redness, fidelity and structure; the share
    of ratios clipped."""
    gain, target = experiment.headline_gain, experiment.target
    early = min(30, last)
    keys = ([experiment.off_target] if experiment.off_target else []) + \
        ["eval_toy_fidelity", "eval_structure_iou"]
    heads = [f"{SHORT[target]}, it. {early}", f"it. {last}", f"iterations to +{gain:g}"] + \
        [f"{SHORT[k]} at +{gain:g}" for k in keys] + ["clipped"]
    lines = ["| variant | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for label, runs in groups.items():
        hit = reached(runs, target, gain)
        cells = [cell([at_iteration(r, target, i) for r in runs]) for i in (early, last)]
        cells.append(iterations_cell(runs, target, gain))
        cells += [cell([at_gain(r, k, target, gain) for r in hit]) for k in keys]
        cells.append(_g([_clipped(r) for r in runs]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def equal_gain(experiment: Experiment, groups: dict) -> list[str]:
    keys = [k for k in metrics(experiment)[1:]]
    heads = ["iterations to reach it"] + [SHORT.get(k, k[5:]) for k in keys]
    lines = ["| variant | gain | seeds reaching it | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(heads)]
    for label, runs in groups.items():
        for gain in experiment.gains:
            reached = [r for r in runs
                       if math.isfinite(at_gain(r, "iteration", experiment.target, gain))]
            cells = [cell([at_gain(r, "iteration", experiment.target, gain) for r in reached],
                          0)]
            cells += [cell([at_gain(r, k, experiment.target, gain) for r in reached])
                      for k in keys]
            lines.append(f"| {label} | +{gain:g} | {len(reached)}/{len(runs)} | "
                         + " | ".join(cells) + " |")
    return lines


def training_stats(groups: dict) -> list[str]:
    """Mean over iterations, then mean +- std over seeds; rms log-ratio = sqrt(2 approx_kl),
    the typical size of the ratio's log at the level the run clips (position or sample)."""
    keys = ("clip_frac_low", "clip_frac_high", "approx_kl", "map_mean", "grad_norm")
    lines = ["| variant | " + " | ".join(keys) + " | rms log-ratio |",
             "|---|" + "---|" * (len(keys) + 1)]
    for label, runs in groups.items():
        means = {k: [_run_mean(r, k) for r in runs] for k in keys}
        rms = [math.sqrt(2 * v) if math.isfinite(v) else math.nan for v in means["approx_kl"]]
        cells = [_g(means[k]) for k in keys] + [_g(rms)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _clipped(run: dict) -> float:
    """The share of ratios outside the clip range, below or above, mean over iterations."""
    return _run_mean(run, "clip_frac_low") + _run_mean(run, "clip_frac_high")


def _run_mean(run: dict, key: str) -> float:
    return mean_std([row.get(key, math.nan) for row in run["history"]])[0]


def _g(values) -> str:
    m, s, n = mean_std(values)
    return "–" if n == 0 else f"{m:.3g} ± {s:.2g}"


def sweep_tables(experiment: Experiment, groups: dict, last: int) -> list[str]:
    """For a sweep: one row per arm and one column per clip range, in three tables: the
    iterations to the headline gain, structure IoU there, and the share of ratios clipped.
    The slowdown read at a glance; the tables above hold every variant's detail."""
    gain, target = experiment.headline_gain, experiment.target
    table: dict = {}
    for runs in groups.values():
        clip = runs[0]["variant_overrides"].get("clip_range", math.nan)
        table.setdefault(runs[0]["arm"], {})[clip] = runs
    clips = sorted({c for row in table.values() for c in row})
    heads = [clip_label(c) for c in clips]

    def pivot(title: str, fill) -> list[str]:
        out = [title, "", "| arm (level) | " + " | ".join(heads) + " |",
               "|---|" + "---|" * len(heads)]
        for arm, row in table.items():
            level = ARMS[arm]["ratio_level"]
            out.append(f"| {arm} ({level}) | " + " | ".join(
                fill(row[c]) if c in row else "" for c in clips) + " |")
        return out + [""]

    return [*pivot(f"Iterations to {SHORT[target]} +{gain:g} (of {last}; seeds reaching it "
                   "in brackets where not all did):",
                   lambda runs: iterations_cell(runs, target, gain)),
            *pivot(f"Structure IoU at {SHORT[target]} +{gain:g}:",
                   lambda runs: cell([at_gain(r, "eval_structure_iou", target, gain)
                                      for r in reached(runs, target, gain)])),
            *pivot(f"{SHORT[target].capitalize()} at iteration {last}:",
                   lambda runs: cell([at_iteration(r, target, last) for r in runs])),
            *pivot("Share of ratios clipped, mean over iterations:",
                   lambda runs: _g([_clipped(r) for r in runs]))]


def write_csv(experiment: Experiment, groups: dict, path: Path) -> None:
    keys = sorted({k for runs in groups.values() for r in runs for row in r["eval"] for k in row
                   if k != "iteration"})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "iteration", "seeds"] +
                        [f"{k}_{w}" for k in keys for w in ("mean", "std")])
        for label, runs in groups.items():
            for row in runs[0]["eval"]:
                it = row["iteration"]
                cells = []
                for k in keys:
                    m, s, _ = mean_std([at_iteration(r, k, it) for r in runs])
                    cells += [f"{m:.6g}", f"{s:.6g}"]
                writer.writerow([label, it, len(runs)] + cells)


# ---- plots ----------------------------------------------------------------------------------
def bands(experiment: Experiment, groups: dict) -> dict:
    """{metric: {variant: (iterations, means, stds)}} for plots.plot_bands."""
    out = {}
    for key in metrics(experiment):
        out[key] = {}
        for label, runs in groups.items():
            its = [row["iteration"] for row in runs[0]["eval"]]
            stats = [mean_std([at_iteration(r, key, i) for r in runs]) for i in its]
            out[key][label] = (its, [m for m, _, _ in stats], [s for _, s, _ in stats])
    return out


def tradeoff(experiment: Experiment, panels: dict) -> dict:
    """The other metrics against the target, one point per evaluation (mean over seeds)."""
    x = panels[experiment.target]
    return {f"{SHORT[k]} against {SHORT[experiment.target]}":
            {label: (x[label][1], panels[k][label][1]) for label in x}
            for k in metrics(experiment)[1:] if k != "eval_redness"}


def grids(groups: dict, path: Path, seed: int = 0) -> None:
    """The held-out evaluation prompts before training (the same for every variant: same
    weights, same noise) and after each variant, seed 0."""
    from PIL import Image

    from ..logging_utils import save_labelled_pictures

    panels = []
    for label, runs in groups.items():
        run = next((r for r in runs if r["seed"] == seed), None)
        if run is None:
            continue
        folder = Path(run["folder"]) / "eval"
        last = folder / f"iter{run['eval'][-1]['iteration']:06d}.png"
        if not last.is_file():
            continue
        if not panels:
            panels.append(("before training (every variant)",
                           Image.open(folder / "iter000000.png")))
        panels.append((f"after {run['eval'][-1]['iteration']} iterations: {label} "
                       f"(seed {seed})", Image.open(last)))
    if panels:
        save_labelled_pictures(panels, path)


def sweep_panels(experiment: Experiment, groups: dict, last: int) -> dict:
    """For the clip sweep: target at the last iteration and structure at the first gain,
    against log10 of the clip range (no clip drawn at 100), one line per arm."""
    arms: dict = {}
    for label, runs in groups.items():
        clip = runs[0]["variant_overrides"].get("clip_range", math.nan)
        arms.setdefault(runs[0]["arm"], []).append((math.log10(clip), runs))
    gain = experiment.gains[0]
    panels = {f"{SHORT[experiment.target]} at iteration {last}": {},
              f"structure IoU at {SHORT[experiment.target]} +{gain:g}": {}}
    titles = list(panels)
    for arm, points in arms.items():
        points.sort(key=lambda p: p[0])
        xs = [x for x, _ in points]
        panels[titles[0]][arm] = (xs, [mean_std([at_iteration(r, experiment.target, last)
                                                 for r in runs])[0] for _, runs in points])
        panels[titles[1]][arm] = (xs, [mean_std([at_gain(r, "eval_structure_iou",
                                                         experiment.target, gain)
                                                 for r in runs])[0] for _, runs in points])
    return panels


def _is_sweep(experiment: Experiment) -> bool:
    return any("clip_range" in v.overrides for v in experiment.variants)


def write_report(experiment: Experiment, results: list[dict], folder: Path, note: str) -> Path:
    from ..plots import plot_bands, plot_xy

    folder.mkdir(parents=True, exist_ok=True)
    groups = by_label(results)
    last = min(r["eval"][-1]["iteration"] for r in results)
    lines = [f"# Toy-world experiment `{experiment.name}`: {experiment.about}", "", note, "",
             "## Summary", "", "Mean ± std over seeds; a gain is counted from the value "
             "before training; fidelity and structure are the evaluator's; clipped is the "
             "share of ratios outside the clip range, mean over iterations (the level the run "
             "trains at: positions or samples).", "", *summary(experiment, groups, last), "",
             *(["## The clip range at a glance", "", *sweep_tables(experiment, groups, last)]
               if _is_sweep(experiment) else []),
             f"## At equal iterations ({last})", "", *equal_iterations(experiment, groups, last),
             "", "Over time:", "", *target_over_time(experiment, groups, last), "",
             "## At equal gain", "",
             f"Each metric where a run's {SHORT[experiment.target]} first reaches its value "
             "before training plus the gain (linear interpolation between evaluations), "
             "mean ± std over the seeds that reach it; the iterations it took are the sample "
             "efficiency.", "", *equal_gain(experiment, groups), "",
             "## Training statistics", "", *training_stats(groups), ""]
    path = folder / "results.md"
    path.write_text("\n".join(lines))
    write_csv(experiment, groups, folder / "results.csv")
    panels = bands(experiment, groups)
    plot_bands(panels, folder / "curves.png")
    plot_xy(tradeoff(experiment, panels), folder / "tradeoff.png",
            f"mean {SHORT[experiment.target]}")
    if _is_sweep(experiment):
        plot_xy(sweep_panels(experiment, groups, last), folder / "sweep.png",
                "log10 clip range")
    grids(_grid_groups(experiment, groups), folder / "grids.png")
    return path


def _grid_groups(experiment: Experiment, groups: dict) -> dict:
    """The variants drawn in grids.png: all of them, but for a sweep only `vipo` at every
    clip range and GRPO at the preset's, so that the picture stays small enough to read
    (and to ship)."""
    if not _is_sweep(experiment):
        return groups
    keep = {label: runs for label, runs in groups.items() if runs[0]["arm"] == "vipo"}
    keep.update({label: runs for label, runs in groups.items() if runs[0]["arm"] == "grpo"
                 and runs[0]["variant_overrides"].get("clip_range") == 0.2})
    return keep or groups
