"""One seeded training run of an experiment variant, saved as it finishes and skipped when
done: ``<out>/runs/<experiment>/<variant>-seed<k>/result.json`` holds its evaluations (every
``eval_every`` iterations) and its per-iteration training statistics. A finished run with
at least the iterations asked for is reused, read up to them: nothing of the first n
iterations depends on the total (constant learning rate, per-iteration random streams), so
the clip sweep's 60 iterations can be read off the 100-iteration runs of its base.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from .specs import ARMS, Experiment, Variant, experiment_config

TRAIN_KEYS = ("reward_mean", "clip_frac_low", "clip_frac_high", "approx_kl", "map_mean",
              "grad_norm")


def run_name(experiment: Experiment, variant: Variant, seed: int) -> str:
    """The arm, then each override that changes the arm's value in this experiment
    (iterations aside). Names are relative to the experiment's settings, not the preset's,
    so that a change of the preset does not rename (or silently alias) saved runs."""
    arm = experiment_config(experiment, Variant(variant.arm, variant.arm), False)
    base = _resolved(arm)
    parts = [variant.arm]
    for key, value in sorted(variant.overrides.items()):
        if key != "iterations" and _resolved({**arm, key: value}) != base:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return "_".join(parts) + f"-seed{seed}"


def toy_config(overrides: dict):
    """The `toy` preset with these overrides."""
    from ..config import Config

    cfg = Config.from_name("toy")
    cfg.update(overrides)
    return cfg


def _flat(cfg) -> dict:
    """{"section.field": value} of a config."""
    return {f"{section}.{key}": value for section, fields in cfg.to_dict().items()
            if isinstance(fields, dict) for key, value in fields.items()}


def _resolved(overrides: dict) -> dict:
    """The full config these overrides give on the toy preset, flattened, iterations
    aside (a longer run is reused up to fewer iterations)."""
    flat = _flat(toy_config(overrides))
    flat.pop("train.iterations")
    return flat


# Set per run by run_one itself, or not about training.
_PER_RUN = {"train.seed", "run.output_dir", "run.run_name", "run.checkpoint_every",
            "run.progress"}


def check_same_settings(folder: Path, overrides: dict) -> None:
    """Raises if the saved run in ``folder`` trained with other settings than these: a run
    is reused only for exactly its own config, never for one that merely shares its name."""
    from ..config import Config
    from ..errors import ConfigError

    flat = _flat(Config.from_yaml(folder / "config.yaml"))
    differ = [f"{k} {flat.get(k)!r} (wanted {v!r})" for k, v in _resolved(overrides).items()
              if k not in _PER_RUN and flat.get(k) != v]
    if differ:
        raise ConfigError(f"{folder}: this saved run trained with other settings: "
                          f"{'; '.join(differ)}. Delete the folder or use another --out.")


def run_one(experiment: Experiment, variant: Variant, seed: int, out: Path, quick: bool,
            extra: dict, train: bool = True) -> dict:
    """The run's result (trained now, or the saved one), read up to its iterations. With
    ``train=False`` a run that is not saved is an error naming its folder."""
    overrides = {**experiment_config(experiment, variant, quick), **extra}
    folder = out / "runs" / experiment.folder / run_name(experiment, variant, seed)
    wanted = toy_config(overrides).train.iterations
    done = folder / "result.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved["iterations"] >= wanted:
            check_same_settings(folder, overrides)
            return truncate(saved, wanted, variant, folder)
    if not train:
        from ..errors import ConfigError
        raise ConfigError(f"{folder}: no saved run of {wanted} iterations (nothing is trained "
                          f"here; `python -m vipo.experiments.compare {experiment.name} "
                          f"--out {out}` trains the missing runs)")
    from ..distributed import reset_accelerate_state
    from ..run_loop import RunLoop

    shutil.rmtree(folder, ignore_errors=True)   # an interrupted run restarts from scratch
    reset_accelerate_state()                    # each RunLoop builds its own Accelerator
    cfg = toy_config({**overrides, "seed": seed, "output_dir": str(folder.parent),
                      "run_name": folder.name, "checkpoint_every": -1, "progress": False})
    result = RunLoop(cfg.validate()).run()
    saved = {"arm": variant.arm, "seed": seed, "iterations": cfg.train.iterations,
             "commit": commit(),
             "overrides": dict(overrides),
             "seconds": result["seconds"], "eval": result["eval"],
             "history": [{k: row.get(k, math.nan) for k in TRAIN_KEYS}
                         for row in result["history"]]}
    done.write_text(json.dumps(saved, indent=1))
    return truncate(saved, wanted, variant, folder)


def commit() -> str:
    """The code's git commit (``-dirty`` with local changes), or ``unknown``."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                              capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def truncate(saved: dict, iterations: int, variant: Variant, folder: Path) -> dict:
    """The result as a run of ``iterations`` iterations would have left it, with the
    variant that asked for it and the run's folder."""
    return {**saved, "label": variant.label, "variant_overrides": dict(variant.overrides),
            "folder": str(folder), "iterations": iterations,
            "eval": [row for row in saved["eval"] if row["iteration"] <= iterations],
            "history": saved["history"][:iterations]}
