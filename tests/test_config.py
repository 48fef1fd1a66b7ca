"""Config: presets (docs/method.md 8), YAML files, key=value overrides, start-up validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vipo import config as C
from vipo.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
def test_every_field_has_help():
    for section, cls in C.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{section}.{f.name}"


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_presets_validate_and_match_their_yaml(name):
    cfg = Config.from_name(name).validate()
    path = ROOT / "configs" / f"{name}.yaml"
    # The files are generated from PRESETS (python -m vipo.config), not kept by hand.
    assert path.read_text(encoding="utf-8") == C.preset_yaml(name), \
        f"{path} is stale: run python -m vipo.config"
    assert Config.from_yaml(path).to_dict() == cfg.to_dict()
    assert cfg.preset == name


def test_method_section_8_defaults():
    flux = Config.from_name("flux_vipo")
    assert (flux.sample.num_steps, flux.sample.shift, flux.sample.eta) == (8, 3.0, 0.3)
    assert (flux.sample.group_size, flux.train.timestep_fraction, flux.train_steps_per_sample) \
        == (12, 0.6, 4)  # 4 of 7
    assert (flux.train.lr, flux.train.grad_accum, flux.model.guidance_scale) == (1e-5, 4, 3.5)
    assert flux.train.ratio_level == "position" and flux.reward.reward == ["hpsv2"]
    wan = Config.from_name("wan_vipo")
    assert (wan.model.height, wan.model.width, wan.model.num_frames) == (240, 416, 53)
    assert (wan.sample.num_steps, wan.sample.shift, wan.sample.eta) == (16, 8.0, 0.25)
    assert wan.train_steps_per_sample == 9 and wan.model.guidance_scale == 5.0  # 9 of 15
    sd = Config.from_name("sd35_flowgrpo")
    assert (sd.sample.sde, sd.sample.noise_level, sd.sample.sigma_schedule) == \
        ("flow", 0.7, "diffusers")
    assert (sd.train.ratio_level, sd.train.algorithm, sd.train.lora_rank) == \
        ("sample", "grpo", 32)
    assert sd.train_steps_per_sample == 9  # all but the last of 10, in order
    assert (sd.reward.eps_std, sd.train.ema_decay, sd.train.ema_every) == (1e-4, 0.9, 8)


def test_overrides_flat_and_dotted():
    cfg = Config.from_name("tiny")
    cfg.apply_overrides(["lr=2e-5", "train.grad_accum=16", "reward=redness,clip_score",
                         "reward_weights=1,0.5", "same_init_noise=false", "arch=flux"])
    assert cfg.train.lr == 2e-5 and cfg.train.grad_accum == 16
    assert cfg.reward.reward == ["redness", "clip_score"]
    assert cfg.reward.reward_weights == ["1", "0.5"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.sample.same_init_noise is False and cfg.model.arch == "flux"


@pytest.mark.parametrize("override, message", [
    ("nope=1", "unknown config field 'nope'"),
    ("train.height=64", "unknown config field 'train.height'"),
    ("foo.lr=1", "unknown config section 'foo'"),
    ("iterations=1.5", "train.iterations"),
    ("same_init_noise=maybe", "sample.same_init_noise"),
    ("lr", "not of the form key=value"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Config.from_name("tiny").apply_overrides([override])


@pytest.mark.parametrize("overrides, field", [
    (["num_steps=1"], "sample.num_steps"),
    (["group_size=1"], "sample.group_size"),
    (["timestep_fraction=0"], "train.timestep_fraction"),
    (["timestep_fraction=0.1"], "train.timestep_fraction"),
    (["clip_range=0"], "train.clip_range"),
    (["kl_coef=-1"], "train.kl_coef"),
    (["ratio_level=token"], "train.ratio_level"),
    (["height=50"], "model.height"),
    (["arch=wan", "num_frames=4"], "model.num_frames"),
    (["train_batch_size=3"], "train.grad_accum"),
    (["grad_accum=32"], "train.grad_accum"),
    (["reward_weights=1,2"], "reward.reward_weights"),
    (["reward_weights=-1"], "reward.reward_weights"),
    (["map_floor=2"], "psm.map_floor"),
    (["ema_decay=1"], "train.ema_decay"),
    (["reward=foo"], "reward.reward"),
])
def test_validation_names_the_field(overrides, field):
    cfg = Config.from_name("tiny")
    cfg.apply_overrides(overrides + ["algorithm=grpo"])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg.validate()


def test_yaml_with_flat_and_nested_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: flux_vipo\nlr: 3.0e-6\nsample:\n  group_size: 8\n"
                    "reward: [pickscore, clip_score]\n")
    cfg = Config.from_yaml(path)
    assert cfg.model.arch == "flux" and cfg.train.lr == 3e-6 and cfg.sample.group_size == 8
    assert cfg.reward.reward == ["pickscore", "clip_score"]


def test_parse_args_preset_yaml_and_overrides(tmp_path):
    from vipo.train import parse_args

    cfg = parse_args(["sd35_flowgrpo", "iterations=3"])
    assert cfg.preset == "sd35_flowgrpo" and cfg.train.iterations == 3
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\na red car\n")
    cfg = parse_args([f"prompts={prompts}", "algorithm=grpo"])
    from vipo.train import load_prompts

    assert load_prompts(cfg.sample.prompts) == ["a fox", "a red car"]
    with pytest.raises(ConfigError, match="sample.prompts"):
        parse_args(["prompts=/no/such/file.txt", "algorithm=grpo"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        parse_args(["nope"])


def test_help_shows_the_values_of_the_preset_that_would_run(capsys):
    from vipo.train import main

    assert main(["flux_vipo", "lr=7e-6", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  path (default 'black-forest-labs/FLUX.1-dev')" in out
    assert "  lr (default 7e-06)" in out and "preset 'flux_vipo'" in out
    assert main(["--help"]) == 0
    assert f"preset '{C.DEFAULT_PRESET}'" in capsys.readouterr().out


def test_bounds_sit_beside_every_numeric_field():
    """Every int/float field states its allowed range next to its default (seeds take any
    integer), and validate() enforces it, naming the field."""
    for name, (section, f) in C.all_fields().items():
        hint = C._field_types(C.SECTIONS[section])[name]
        if hint in (int, float) and name not in ("seed", "eval_seed"):
            assert f.metadata["bounds"], f"{section}.{name} has no bounds"
    cfg = Config.from_name("tiny")
    cfg.apply_overrides(["adam_beta2=1"])
    with pytest.raises(ConfigError, match=r"train\.adam_beta2 must lie in \[0, 1\); got 1\.0"):
        cfg.validate()
    cfg = Config.from_name("tiny")
    cfg.apply_overrides(["lr=nan"])
    with pytest.raises(ConfigError, match=r"train\.lr must be > 0; got nan"):
        cfg.validate()


def test_remote_code_is_off_in_every_preset():
    assert all(not Config.from_name(name).model.trust_remote_code for name in C.PRESETS)
