"""The toy-world experiments as data: the arms (each a set of config values) and the named
experiments (a reward, the metric it moves, the other region's metric, the gains at which
arms are compared, and for the clip sweep the values swept). docs/method.md describes the
arms; docs/toy_world.md the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every arm is the `toy` preset plus these values: no arm is a code path of its own.
ARMS = {
    "grpo": {"algorithm": "grpo", "ratio_level": "sample"},
    "vipo": {"algorithm": "vipo", "ratio_level": "position", "map_source": "psm"},
    # The released ViPO Flux script: one ratio per sample, so the map acts as the per-sample
    # weight mean(M_i) on GRPO's loss.
    "vipo_sample": {"algorithm": "vipo", "ratio_level": "sample", "map_source": "psm"},
    "uniform_position": {"algorithm": "vipo", "ratio_level": "position",
                         "map_source": "uniform"},
    "oracle": {"algorithm": "vipo", "ratio_level": "position", "map_source": "oracle"},
    "inverted": {"algorithm": "vipo", "ratio_level": "position", "map_source": "inverted"},
    "random_backbone": {"algorithm": "vipo", "ratio_level": "position",
                        "map_source": "random_backbone"},
}
# Metrics every run's evaluation reports, whatever it trains on: both regions' redness, and
# the evaluator's fidelity and structure.
EVAL_REWARDS = ["toy_fidelity", "redness", "object_redness", "background_redness"]
# Settings of every experiment run. One torch thread: on 2 cores shared with other jobs, 2
# threads made a toy iteration about 13x slower (measured; docs/toy_world.md).
# The clip range is fixed here at the value every arm comparison was run with (0.2), so that
# the experiments do not follow a change of the preset's (chosen from the `clip` sweep).
COMMON = {"image_every": 0, "cpu_threads": 1, "eval_rewards": EVAL_REWARDS,
          "clip_range": 0.2}
# --quick: a smoke run of the whole pipeline for CI (seconds per run), not a result.
QUICK = {"iterations": 2, "eval_every": 0, "eval_samples": 4, "group_size": 4,
         "prompts_per_iter": 1, "sample_batch_size": 4}
CLIP_VALUES = (1e-4, 1e-3, 1e-2, 0.2, 100.0)   # 100: the ratio never reaches the clip
# Between 0.2 and no clip, for the arms the preset's choice is made from.
MORE_CLIP_VALUES = (1e-4, 1e-3, 1e-2, 0.2, 0.5, 1.0, 100.0)
# The sample level over the same values, plus the points that test the rule "a position
# clip range equals C*|P| (8*256 = 2048 on the toy world) times a sample one": 1e-5 against
# position 0.02 (RULE_CHECK), 5e-4 against position 1.
SAMPLE_CLIP_VALUES = (1e-5, 1e-4, 5e-4, 1e-3, 1e-2, 0.2, 100.0)
RULE_CHECK = 0.02


@dataclass(frozen=True)
class Variant:
    """One configuration an experiment trains (over seeds): an arm plus overrides."""
    label: str
    arm: str
    overrides: dict = field(default_factory=dict)

    def config(self) -> dict:
        return {**ARMS[self.arm], **self.overrides}


@dataclass(frozen=True)
class Experiment:
    name: str
    about: str
    reward: str                      # the training reward
    target: str                      # the eval metric the reward moves
    off_target: str | None           # the other region's metric (drift)
    gains: tuple                     # target gains over the start at which arms are compared
    variants: tuple
    quick_variants: tuple            # --quick trains these only
    summary_gain: float = 0.0        # the gain of the summary table (default gains[1])
    runs_under: str = ""             # the experiment whose run folders it shares (default own)
    iterations: int | None = None    # None: the toy preset's

    @property
    def headline_gain(self) -> float:
        return self.summary_gain or self.gains[min(1, len(self.gains) - 1)]

    @property
    def folder(self) -> str:
        return self.runs_under or self.name


def _arms(*names) -> tuple:
    return tuple(Variant(name, name) for name in names)


def _clip_variants(arms, values) -> tuple:
    return tuple(Variant(f"{arm} clip={clip_label(v)}", arm, {"clip_range": v})
                 for arm in arms for v in values)


def clip_label(value: float) -> str:
    return "none" if value >= 100 else f"{value:g}"


EXPERIMENTS = {e.name: e for e in (
    Experiment("object", "the reward is the redness inside the prompt's object mask",
               "object_redness", "eval_object_redness", "eval_background_redness",
               gains=(0.2, 0.4, 0.6), variants=_arms(*ARMS), quick_variants=_arms(*ARMS)),
    Experiment("background", "the reward is the redness outside the prompt's object mask",
               "background_redness", "eval_background_redness", "eval_object_redness",
               gains=(0.1, 0.2, 0.3), variants=_arms(*ARMS),
               quick_variants=_arms("grpo", "inverted")),
    Experiment("redness", "the reward is the redness of the whole image (the paper's Fig. 5)",
               "redness", "eval_redness", None, gains=(0.2, 0.3, 0.4), variants=_arms(*ARMS),
               quick_variants=_arms("grpo", "vipo")),
    # The PPO clip range at the position level, on the object reward. Its clip=0.2 runs are
    # the `object` experiment's (the preset's clip range), read up to `iterations`.
    Experiment("clip", "the object reward with the PPO clip range swept",
               "object_redness", "eval_object_redness", "eval_background_redness",
               gains=(0.2, 0.4), summary_gain=0.2, runs_under="object", iterations=60,
               variants=_clip_variants(("uniform_position", "vipo"), MORE_CLIP_VALUES)
               + _clip_variants(("oracle", "inverted", "random_backbone"), CLIP_VALUES)
               + _clip_variants(("grpo",), SAMPLE_CLIP_VALUES)
               + _clip_variants(("uniform_position",), (RULE_CHECK,))
               + _clip_variants(("vipo_sample",), (1e-4, 0.2)),
               quick_variants=_clip_variants(("uniform_position",), (0.2, 100.0))),
)}


def experiment_config(experiment: Experiment, variant: Variant, quick: bool) -> dict:
    """The overrides on the toy preset for one variant of one experiment."""
    out = {**COMMON, "reward": [experiment.reward], **variant.config()}
    if experiment.iterations is not None:
        out["iterations"] = experiment.iterations
    return {**out, **QUICK} if quick else out
