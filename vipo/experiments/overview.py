"""``python -m vipo.experiments.overview [--out DIR]``: where each arm changed the picture,
across the region experiments. For ``object``, ``background`` and ``redness`` it reads the
saved runs (never trains; run ``compare`` first) and writes ``overview.md`` (each arm's gain
in object and background redness after training, mean +- std over seeds) and
``overview.png`` (background against object redness over training, one line per arm and
one panel per experiment): does the change follow the reward, or the map?
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import SHORT, at_gain, at_iteration, cell, iterations_cell, mean_std, reached
from .specs import EXPERIMENTS

REGION_EXPERIMENTS = ("object", "background", "redness")
OBJECT, BACKGROUND = "eval_object_redness", "eval_background_redness"


def saved_runs(out: Path, experiment: str, seeds: int, quick: bool = False) -> dict:
    """{arm: [result, ...]} of an experiment's saved runs, read as ``compare --report-only``
    reads them (a missing run, or one saved with other settings, is an error naming it)."""
    from .runner import run_one

    spec = EXPERIMENTS[experiment]
    runs: dict = {}
    for variant in spec.quick_variants if quick else spec.variants:
        for seed in range(seeds):
            runs.setdefault(variant.label, []).append(
                run_one(spec, variant, seed, out, quick, {}, train=False))
    return runs


def gains_table(all_runs: dict) -> list[str]:
    lines = ["| experiment (reward on) | arm | object redness gain | background redness gain "
             "| iterations |", "|---|---|---|---|---|"]
    for experiment, runs in all_runs.items():
        for arm, group in runs.items():
            last = min(r["eval"][-1]["iteration"] for r in group)
            gains = {key: [at_iteration(r, key, last) - r["eval"][0][key] for r in group]
                     for key in (OBJECT, BACKGROUND)}
            lines.append(f"| {experiment} | {arm} | {cell(gains[OBJECT])} | "
                         f"{cell(gains[BACKGROUND])} | {last} |")
    return lines


def headline_table(all_runs: dict) -> list[str]:
    """One row per arm: in each experiment, the iterations its runs took to the headline
    gain of the reward and the structure IoU there (seeds that never got there in brackets)."""
    heads = []
    for name in all_runs:
        spec = EXPERIMENTS[name]
        heads += [f"{name}: iterations to {SHORT[spec.target]} +{spec.headline_gain:g}",
                  "structure IoU there"]
    lines = ["| arm | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    arms = list(dict.fromkeys(arm for runs in all_runs.values() for arm in runs))
    for arm in arms:
        cells = []
        for name, runs in all_runs.items():
            spec, group = EXPERIMENTS[name], runs.get(arm, [])
            target, gain = spec.target, spec.headline_gain
            cells += [iterations_cell(group, target, gain, none="never"),
                      cell([at_gain(r, "eval_structure_iou", target, gain)
                            for r in reached(group, target, gain)], 2)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def paths(all_runs: dict) -> dict:
    """{panel title: {arm: (object redness means, background redness means)}}, one point
    per evaluation."""
    panels = {}
    for experiment, runs in all_runs.items():
        title = f"reward: {SHORT[EXPERIMENTS[experiment].target]}; x {SHORT[OBJECT]}, " \
                f"y {SHORT[BACKGROUND]}"
        panels[title] = {}
        for arm, group in runs.items():
            its = [row["iteration"] for row in group[0]["eval"]]
            panels[title][arm] = tuple(
                [mean_std([at_iteration(r, key, i) for r in group])[0] for i in its]
                for key in (OBJECT, BACKGROUND))
    return panels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vipo.experiments.overview",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs") / "compare",
                        help="the --out of the compare runs (default runs/compare)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="read the --quick runs")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    from ..errors import ConfigError
    from ..plots import plot_xy

    try:
        all_runs = {name: saved_runs(args.out, name, args.seeds, args.quick)
                    for name in REGION_EXPERIMENTS}
    except ConfigError as err:
        print(f"overview: {err}", file=sys.stderr)
        return 2
    lines = ["# Where each arm changed the picture", "",
             "Gain over the value before training, after the last iteration, mean ± std over "
             f"{args.seeds} seeds, on the held-out evaluation prompts. The picture "
             "(overview.png) follows each arm from the start (every 10 iterations).", "",
             *gains_table(all_runs), "",
             "Speed and structure: the iterations each arm took to its experiment's headline "
             "gain of the reward, and the evaluator's structure IoU there (linear "
             "interpolation between evaluations; mean ± std over the seeds that got there).",
             "", *headline_table(all_runs), ""]
    (args.out / "overview.md").write_text("\n".join(lines))
    plot_xy(paths(all_runs), args.out / "overview.png", SHORT[OBJECT])
    print("\n".join(lines))
    print(f"overview: wrote {args.out / 'overview.md'} and overview.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
