"""``python -m vipo.experiments.compare EXPERIMENT [--quick] [--seeds N] [key=value ...]``:
GRPO, ViPO and its controls trained from the same pretrained toy-world generator, compared
at equal iterations and at equal gain (docs/toy_world.md; the arms: docs/method.md).

Experiments (vipo/experiments/specs.py):
  object      the reward is the redness inside the prompt's rendered object mask
  background  the reward is the redness outside it
  redness     the reward is the redness of the whole image (the paper's Fig. 5)
  clip        the object reward with the PPO clip range swept (1e-4, 1e-3, 1e-2, 0.2,
              none) for every arm with a position ratio (uniform_position and vipo also
              at 0.5 and 1), GRPO from 1e-5 to none, the released form at 1e-4; 60
              iterations, its 0.2 runs are the object experiment's

Arms (each the `toy` preset plus config values; none is a code path of its own):
  grpo              algorithm=grpo ratio_level=sample            (DanceGRPO / Flow-GRPO)
  vipo              ratio_level=position map_source=psm          (the paper)
  vipo_sample       ratio_level=sample map_source=psm            (the released Flux script)
  uniform_position  ratio_level=position map_source=uniform      (the position ratio alone)
  oracle            ratio_level=position map_source=oracle       (the true object mask)
  inverted          ratio_level=position map_source=inverted     (1 - the PSM map)
  random_backbone   ratio_level=position map_source=random_backbone

Every run is judged on the held-out prompts by the toy evaluator (never by the PSM
backbone) and by both regions' redness. Runs are saved as they finish under
``<out>/runs/<experiment>/`` and skipped when done, so an interrupted call continues where
it stopped; the report (results.md, results.csv, curves.png, tradeoff.png, grids.png, and
sweep.png for the sweep) goes to ``<out>/<experiment>/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .specs import EXPERIMENTS, experiment_config


def _machine() -> str:
    import os
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{os.cpu_count()} cores, {name}"


def _note(experiment, results: list, seeds: int, quick: bool, overrides: dict) -> str:
    from .runner import toy_config

    cfg = toy_config({**experiment_config(experiment, experiment.variants[0], quick),
                      **overrides})
    when = f"every {cfg.eval.eval_every} iterations" if cfg.eval.eval_every > 0 else \
        "before and after training"
    kind = "A --quick smoke run (not a result)" if quick else "Toy world"
    extra = f"; overrides {overrides}" if overrides else ""
    commits = ", ".join(sorted({r.get("commit", "unknown") for r in results}))
    return (f"{kind}, runs trained at commit {commits}; {seeds} seed(s) per variant, "
            f"{cfg.train.iterations} iterations x {cfg.samples_per_iter} samples x "
            f"{cfg.train_steps_per_sample} trained steps, lr {cfg.train.lr:g}, otherwise the "
            f"`toy` preset (clip range {cfg.train.clip_range:g} where the variant does not "
            f"set it){extra}; evaluated {when} on {cfg.eval.eval_samples} held-out prompts "
            f"(ODE, {cfg.sample.num_steps} steps). "
            f"The runs' own wall times sum to {sum(r['seconds'] for r in results):.0f} s "
            f"({_machine()}, {cfg.run.cpu_threads or 'default'} torch thread(s); a run "
            f"read up to fewer iterations counts whole).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vipo.experiments.compare",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=list(EXPERIMENTS))
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 iterations, 1 seed, a few variants (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/compare or runs/compare-quick)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per variant (default 3; 1 with --quick)")
    parser.add_argument("--variants", default="",
                        help="comma-separated subset of the experiment's variant labels")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the saved runs; train nothing (a missing "
                             "run is an error)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep the libraries' own console output (loading bars, warnings)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run "
                        "(run folder names do not show them, and a saved run is reused only "
                        "for its own settings: give overrides a new --out)")
    args = parser.parse_intermixed_args(argv)  # options may sit between positionals
    from tqdm.auto import tqdm

    from ..config import Config
    from ..errors import ConfigError
    from ..train import quiet_libraries
    from .report import write_report
    from .runner import run_one

    if not args.verbose:
        quiet_libraries()

    experiment = EXPERIMENTS[args.experiment]
    out = args.out or Path("runs") / ("compare-quick" if args.quick else "compare")
    seeds = args.seeds or (1 if args.quick else 3)
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}")
    variants = experiment.quick_variants if args.quick else experiment.variants
    if args.variants:
        known = {v.label: v for v in experiment.variants + experiment.quick_variants}
        wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            parser.error(f"--variants: unknown {', '.join(unknown)}; known: "
                         f"{', '.join(v.label for v in experiment.variants)}")
        variants = tuple(known[name] for name in wanted)
    probe = Config.from_name("toy")
    probe.apply_overrides(args.overrides)  # errors name the field before any run starts
    overrides = dict(o.split("=", 1) for o in args.overrides)
    results = []
    jobs = [(v, s) for s in range(seeds) for v in variants]
    try:
        for variant, seed in tqdm(jobs, desc=experiment.name, unit="run"):
            results.append(run_one(experiment, variant, seed, out, args.quick, overrides,
                                   train=not args.report_only))
    except ConfigError as err:  # e.g. a saved run with other settings: one line, exit 2
        print(f"compare: config error: {err}", file=sys.stderr)
        return 2
    note = _note(experiment, results, seeds, args.quick, overrides)
    path = write_report(experiment, results, out / experiment.name, note)
    print(path.read_text())
    print(f"compare: wrote {path} and the plots beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
