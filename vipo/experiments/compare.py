"""``python -m vipo.experiments.compare [--quick] [--out DIR] [--seeds N]``: GRPO against ViPO
on the toy world's redness experiment (METHOD.md 10), at equal compute.

Methods (all from the ``toy`` preset; only the named settings differ):
  grpo              algorithm=grpo ratio_level=sample        (DanceGRPO / Flow-GRPO)
  vipo_minmax       algorithm=vipo map_norm=minmax           (the paper)
  vipo_mean_one     algorithm=vipo map_norm=mean_one         (credit assignment without the
                                                              smaller step, METHOD.md 11.3)
  uniform_position  algorithm=grpo ratio_level=position      (the per-position ratio alone)

Every method runs the same iterations, samples and trained steps for each seed, and is
judged on the held-out prompts by the evaluator (never by the PSM backbone): in-domain
redness, out-of-domain prompt fidelity (shape, colour, position, background) and structure
(the evaluator's object mask against the rendered one). It writes to ``--out``:
``results.md`` and ``results.csv`` (mean +- std over seeds at the last evaluation, plus the
training statistics that explain them), ``curves.png`` (eval metrics against iterations,
mean +- std band per method), ``tradeoff.png`` (fidelity and structure against redness, one
point per evaluation) and ``grids.png`` (the same held-out prompts, before training
and after each method, seed 0). A finished run leaves ``result.json`` in its folder and is
skipped next time, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path

METHODS = {
    "grpo": {"algorithm": "grpo", "ratio_level": "sample"},
    "vipo_minmax": {"algorithm": "vipo", "ratio_level": "position", "map_norm": "minmax"},
    "vipo_mean_one": {"algorithm": "vipo", "ratio_level": "position", "map_norm": "mean_one"},
    "uniform_position": {"algorithm": "grpo", "ratio_level": "position"},
}
# What --quick changes: a smoke run for CI (minutes), not a result.
QUICK = {"iterations": 4, "eval_every": 2, "eval_samples": 8, "image_every": 0}
FULL = {"image_every": 0}
EVAL_KEYS = ("eval_redness", "eval_toy_fidelity", "eval_shape_acc", "eval_colour_acc",
             "eval_position_acc", "eval_background_acc", "eval_structure_iou")
TRAIN_KEYS = ("clip_frac_low", "clip_frac_high", "approx_kl", "map_mean", "grad_norm")


def run_one(method: str, seed: int, out: Path, overrides: dict) -> dict:
    """One seeded training run (or its saved result)."""
    folder = out / "runs" / f"{method}-seed{seed}"
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    import shutil

    from ..config import Config
    from ..distributed import reset_accelerate_state
    from ..run_loop import RunLoop

    shutil.rmtree(folder, ignore_errors=True)  # an interrupted run restarts from scratch
    reset_accelerate_state()  # each Trainer builds its own Accelerator
    cfg = Config.from_name("toy")
    cfg.update({**METHODS[method], **overrides, "seed": seed, "output_dir": str(folder.parent),
                "run_name": folder.name, "checkpoint_every": -1, "progress": False})
    result = RunLoop(cfg.validate()).run()
    summary = {"method": method, "seed": seed, "seconds": result["seconds"],
               "eval": result["eval"],
               "train": {k: _mean([row.get(k, math.nan) for row in result["history"]])
                         for k in TRAIN_KEYS}}
    done.write_text(json.dumps(summary, indent=1))
    return summary


def _mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _mean_std(values) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows: per method, mean and std over seeds of the first and last eval
    metrics and of the mean training statistics."""
    header = ["method", "seeds"]
    header += [f"{k}_{w}" for k in EVAL_KEYS for w in ("before", "after", "after_std")]
    header += [f"{k}_{w}" for k in TRAIN_KEYS for w in ("mean", "std")]
    rows = []
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        row = [method, len(runs)]
        for key in EVAL_KEYS:
            before = _mean_std([r["eval"][0].get(key, math.nan) for r in runs])[0]
            after, after_std = _mean_std([r["eval"][-1].get(key, math.nan) for r in runs])
            row += [before, after, after_std]
        for key in TRAIN_KEYS:
            row += list(_mean_std([r["train"][key] for r in runs]))
        rows.append(row)
    return header, rows


MATCHED_REDNESS = (0.2, 0.3, 0.4)
MATCHED_KEYS = ("eval_toy_fidelity", "eval_structure_iou", "eval_colour_acc",
                "eval_background_acc")


def at_redness(run: dict, key: str, level: float) -> float:
    """``key`` where the run's eval redness first reaches ``level``, interpolated linearly
    between the two evaluations around it (NaN if it never does): the comparison at equal
    in-domain gain rather than at equal iterations."""
    rows = run["eval"]
    for before, after in zip(rows, rows[1:]):
        r0, r1 = before["eval_redness"], after["eval_redness"]
        if r0 < level <= r1:
            w = (level - r0) / (r1 - r0)
            return before[key] + w * (after[key] - before[key])
    return math.nan


def matched_table(results: list[dict]) -> list[str]:
    """Markdown rows: per method and redness level, mean +- std over seeds of MATCHED_KEYS
    (seeds that never reach the level are left out and counted)."""
    lines = ["| method | redness | seeds reaching it | " +
             " | ".join(k[5:] for k in MATCHED_KEYS) + " | iteration |",
             "|---|---|---|" + "---|" * (len(MATCHED_KEYS) + 1)]
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        for level in MATCHED_REDNESS if runs else ():
            reached = [r for r in runs if math.isfinite(at_redness(r, "iteration", level))]
            cells = []
            for key in MATCHED_KEYS + ("iteration",):
                m, sd = _mean_std([at_redness(r, key, level) for r in reached])
                cells.append(f"{m:.3f} ± {sd:.3f}" if key != "iteration" else f"{m:.0f}")
            lines.append(f"| {method} | {level} | {len(reached)}/{len(runs)} | "
                         + " | ".join(cells) + " |")
    return lines


def write_tables(results: list[dict], out: Path, note: str) -> None:
    header, rows = table(results)
    with (out / "results.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    short = {"eval_redness": "redness (in-domain)", "eval_toy_fidelity": "fidelity",
             "eval_shape_acc": "shape", "eval_colour_acc": "colour",
             "eval_position_acc": "position", "eval_background_acc": "background",
             "eval_structure_iou": "structure IoU"}
    lines = [note, "", "| method | seeds | " + " | ".join(short.values()) + " |",
             "|---|---|" + "---|" * len(short)]
    before = rows[0] if rows else None
    if before:
        cells = [f"{before[2 + 3 * i]:.3f}" for i in range(len(EVAL_KEYS))]
        lines.append("| before training | – | " + " | ".join(cells) + " |")
    for row in rows:
        cells = [f"{row[3 + 3 * i]:.3f} ± {row[4 + 3 * i]:.3f}" for i in range(len(EVAL_KEYS))]
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cells) + " |")
    lines += ["", "At equal in-domain gain: each metric where a run's eval redness first reaches "
              "the level (linear interpolation between evaluations), mean ± std over the "
              "seeds that reach it:", ""] + matched_table(results)
    lines += ["", "Training statistics (mean over iterations, then mean ± std over seeds):", "",
              "| method | " + " | ".join(TRAIN_KEYS) + " |", "|---|" + "---|" * len(TRAIN_KEYS)]
    start = 2 + 3 * len(EVAL_KEYS)
    for row in rows:
        cells = [f"{row[start + 2 * i]:.4g} ± {row[start + 2 * i + 1]:.2g}"
                 for i in range(len(TRAIN_KEYS))]
        lines.append(f"| {row[0]} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def curves(results: list[dict]) -> dict:
    """{key: {method: (iterations, means, stds)}} over seeds, per evaluation."""
    out = {}
    for key in ("eval_redness", "eval_toy_fidelity", "eval_structure_iou", "eval_colour_acc",
                "eval_background_acc"):
        out[key] = {}
        for method in METHODS:
            runs = [r for r in results if r["method"] == method]
            if not runs:
                continue
            xs = [row["iteration"] for row in runs[0]["eval"]]
            stats = [_mean_std([r["eval"][i][key] for r in runs]) for i in range(len(xs))]
            out[key][method] = (xs, [m for m, _ in stats], [s for _, s in stats])
    return out


def tradeoff(bands: dict) -> dict:
    """Out-of-domain metrics against the in-domain reward, one point per evaluation (mean
    over seeds): which method keeps more of the picture for the same redness."""
    red = bands["eval_redness"]
    return {f"{title} against redness": {m: (red[m][1], bands[key][m][1]) for m in red}
            for key, title in (("eval_toy_fidelity", "fidelity"),
                               ("eval_structure_iou", "structure IoU"))}


def grids(out: Path, seed: int) -> None:
    """grids.png: the held-out evaluation prompts before training (shared by all methods:
    same weights, same noise) and after each method, one labelled panel each."""
    from PIL import Image

    from ..logging_utils import save_labelled_pictures

    panels = []
    for i, method in enumerate(METHODS):
        folder = out / "runs" / f"{method}-seed{seed}" / "eval"
        files = sorted(folder.glob("iter*.png"))
        if not files:
            continue
        if i == 0:
            panels.append(("before training (all methods)", Image.open(files[0])))
        panels.append((f"after: {method} (seed {seed})", Image.open(files[-1])))
    if panels:
        save_labelled_pictures(panels, out / "grids.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vipo.experiments.compare",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few iterations (CI smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/compare or runs/compare-quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method "
                        "(default 3; 2 with --quick)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    from ..config import Config

    out = args.out or Path("runs") / ("compare-quick" if args.quick else "compare")
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or (2 if args.quick else 3)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    overrides = dict(QUICK if args.quick else FULL)
    probe = Config.from_name("toy")
    probe.apply_overrides(args.overrides)  # errors name the field before any run starts
    overrides.update({k: v for k, v in (o.split("=", 1) for o in args.overrides)})
    start, results = time.perf_counter(), []
    jobs = [(m, s) for s in range(seeds) for m in methods]
    for method, seed in tqdm(jobs, desc="compare", unit="run"):
        results.append(run_one(method, seed, out, overrides))
    from ..plots import plot_bands, plot_xy

    cfg = Config.from_name("toy")
    cfg.update(overrides)
    note = (f"Toy-world redness experiment, {seeds} seeds per method, "
            f"{cfg.train.iterations} iterations x {cfg.samples_per_iter} samples x "
            f"{cfg.train_steps_per_sample} trained steps each; evaluated on "
            f"{cfg.eval.eval_samples} held-out prompts (ODE, {cfg.sample.num_steps} steps). "
            f"Values after training: mean ± std over seeds. The runs' own wall times sum "
            f"to {sum(r['seconds'] for r in results):.0f} s; this call took "
            f"{time.perf_counter() - start:.0f} s.")
    write_tables(results, out, note)
    bands = curves(results)
    plot_bands(bands, out / "curves.png")
    plot_xy(tradeoff(bands), out / "tradeoff.png", "mean eval redness")
    grids(out, seed=0)
    print((out / "results.md").read_text())
    print(f"compare: wrote {out / 'results.md'}, results.csv, curves.png, grids.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
