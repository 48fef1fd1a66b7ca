"""The toy-world experiments: the region rewards, the map sources (psm.map_source), and
every experiment's --quick mode end to end, with the reuse of finished runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vipo.config import Config, ConfigError, PSMConfig
from vipo.psm.maps import minmax
from vipo.psm.sources import MAP_SOURCES, MapSource, load_map_source, oracle_maps
from vipo.rewards import build_reward
from vipo.toy import models, world

SPECS = [world.Spec("star", "red", "black", "top left", "large"),
         world.Spec("circle", "blue", "white", "centre", "small"),
         world.Spec("cross", "green", "brown", "bottom right", "large")]
PROMPTS = [world.prompt(s) for s in SPECS]


# ---- region rewards -------------------------------------------------------------------------
def test_region_rewards_split_the_image_redness_by_the_prompts_mask():
    images, masks = world.render_batch(SPECS, 32)
    obj = build_reward("object_redness", None, "cpu")(images, PROMPTS)
    back = build_reward("background_redness", None, "cpu")(images, PROMPTS)
    whole = build_reward("redness", None, "cpu")(images, PROMPTS)
    share = masks.flatten(1).float().mean(1)
    # The two regions partition the pixels: their area-weighted mean is the whole image's.
    torch.testing.assert_close(share * obj + (1 - share) * back, whole, rtol=0, atol=1e-6)
    # A red star on black: the object is red, the background is not.
    assert obj[0] > 0.6 and abs(float(back[0])) < 0.05
    assert obj[1] < 0  # a blue circle


def test_region_rewards_use_the_prompt_not_the_picture():
    """The mask is where the prompt puts the object, whatever the image shows."""
    images = torch.zeros(2, 3, 32, 32)
    images[:, 0] = 1.0                                    # all red
    obj = build_reward("object_redness", None, "cpu")(images, PROMPTS[:2])
    torch.testing.assert_close(obj, torch.ones(2))


def test_region_rewards_errors():
    fn = build_reward("object_redness", None, "cpu")
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        fn(torch.rand(1, 3, 32, 32), ["a photo of a cat"])
    with pytest.raises(ValueError, match="square"):
        fn(torch.rand(1, 3, 32, 48), PROMPTS[:1])


# ---- map sources ----------------------------------------------------------------------------
def _psm_cfg(source: str) -> PSMConfig:
    return dataclasses.replace(PSMConfig(), map_source=source)


def _source(source: str) -> MapSource:
    return load_map_source(_psm_cfg(source), str(models.asset("backbone")), "cpu", PROMPTS)


def test_map_source_choices_match_the_config():
    field = {f.name: f for f in dataclasses.fields(PSMConfig)}["map_source"]
    assert field.metadata["choices"] == MAP_SOURCES
    cfg = Config.from_name("toy")
    cfg.apply_overrides(["map_source=mask"])
    with pytest.raises(ConfigError, match="psm.map_source"):
        cfg.validate()


def test_uniform_and_oracle_maps():
    images, masks = world.render_batch(SPECS, 32)
    ones = _source("uniform")(images, PROMPTS, (16, 16))
    assert torch.equal(ones, torch.ones(3, 16, 16))
    oracle = _source("oracle")(images, PROMPTS, (16, 16))
    # The share of each 2 x 2 pixel cell that the rendered object covers.
    cells = masks.float().view(3, 16, 2, 16, 2).mean(dim=(2, 4))
    torch.testing.assert_close(oracle, cells / cells.amax(dim=(1, 2), keepdim=True))
    assert oracle.amax(dim=(1, 2)).eq(1).all() and oracle.amin(dim=(1, 2)).eq(0).all()
    assert torch.equal(oracle_maps(PROMPTS, 32, (16, 16)), oracle)


def test_inverted_and_random_backbone_maps():
    images, masks = world.render_batch(SPECS, 32)
    psm = _source("psm")(images, PROMPTS, (16, 16))
    inverted = _source("inverted")(images, PROMPTS, (16, 16))
    torch.testing.assert_close(inverted, minmax(1 - psm, (1, 2)), rtol=0, atol=1e-6)
    on_object = masks.float().view(3, 16, 2, 16, 2).mean(dim=(2, 4)) > 0.5
    # The PSM map weighs the object more than the background, the inverted map less.
    assert ((psm * on_object).sum((1, 2)) / on_object.sum((1, 2)) >
            (psm * ~on_object).sum((1, 2)) / (~on_object).sum((1, 2))).all()
    assert ((inverted * on_object).sum((1, 2)) / on_object.sum((1, 2)) <
            (inverted * ~on_object).sum((1, 2)) / (~on_object).sum((1, 2))).all()
    state = torch.get_rng_state()
    random_source = _source("random_backbone")
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched
    trained = _source("psm").psm.backbone.model.state_dict()
    fresh = random_source.psm.backbone.model.state_dict()
    assert not torch.equal(trained["embeddings.patch_embeddings.projection.weight"],
                           fresh["embeddings.patch_embeddings.projection.weight"])
    maps = random_source(images, PROMPTS, (16, 16))
    assert maps.shape == (3, 16, 16) and torch.isfinite(maps).all()
    assert not torch.allclose(maps, psm)


def test_oracle_needs_toy_prompts_and_names_the_field():
    with pytest.raises(ConfigError, match="psm.map_source=oracle"):
        load_map_source(_psm_cfg("oracle"), None, "cpu", ["a photo of a cat"])
    with pytest.raises(ValueError, match="needs"):
        MapSource("psm")


# ---- the experiments ------------------------------------------------------------------------
def test_every_experiment_quick_mode_writes_its_report(tmp_path):
    from vipo.experiments import compare
    from vipo.experiments.specs import EXPERIMENTS

    for name in ("object", "background", "redness", "clip"):
        assert compare.main([name, "--quick", "--out", str(tmp_path)]) == 0
        report = (tmp_path / name / "results.md").read_text()
        for variant in EXPERIMENTS[name].quick_variants:
            assert f"| {variant.label} |" in report
        assert "| before training |" in report and "iterations to reach it" in report
        for picture in ("curves.png", "tradeoff.png", "grids.png"):
            assert (tmp_path / name / picture).stat().st_size > 1000
        rows = (tmp_path / name / "results.csv").read_text().splitlines()
        assert len(rows) == 1 + 2 * len(EXPERIMENTS[name].quick_variants)  # evals at 0 and 2
    assert (tmp_path / "clip" / "sweep.png").is_file()
    glance = (tmp_path / "clip" / "results.md").read_text()
    assert "## The clip range at a glance" in glance
    assert "| arm (level) | 0.2 | none |" in glance and "| uniform_position (position) |" in glance
    from vipo.experiments import overview
    assert overview.main(["--quick", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "overview.md").read_text()
    assert "| background | inverted |" in table and "| redness | vipo |" in table
    assert (tmp_path / "overview.png").stat().st_size > 1000
    # Every map source ran in the object experiment, and the clip sweep's clip=0.2 variant
    # is the object experiment's run (the preset's clip range), not a new one.
    runs = tmp_path / "runs" / "object"
    saved = json.loads((runs / "oracle-seed0" / "result.json").read_text())
    assert [row["iteration"] for row in saved["eval"]] == [0, 2]
    assert {"eval_object_redness", "eval_background_redness", "eval_toy_fidelity",
            "eval_structure_iou"} <= set(saved["eval"][-1])
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        [f"{arm}-seed0" for arm in ("grpo", "vipo", "vipo_sample", "uniform_position",
                                    "oracle", "inverted", "random_backbone")]
        + ["uniform_position_clip_range=100-seed0"])
    # --report-only trains nothing: a missing run is a one-line error naming its folder.
    assert compare.main(["object", "--quick", "--out", str(tmp_path / "empty"),
                         "--report-only"]) == 2
    assert not (tmp_path / "empty" / "runs").exists() or not any(
        (tmp_path / "empty" / "runs").rglob("result.json"))
    # A finished run is skipped: a second call trains nothing.
    stamp = (runs / "oracle-seed0" / "result.json").stat().st_mtime_ns
    assert compare.main(["object", "--quick", "--out", str(tmp_path)]) == 0
    assert (runs / "oracle-seed0" / "result.json").stat().st_mtime_ns == stamp


def test_a_run_read_up_to_n_iterations_is_the_run_of_n_iterations(tmp_path):
    """What the reuse of longer runs rests on: nothing in the first n iterations depends on
    the total."""
    from vipo.experiments.runner import run_one
    from vipo.experiments.specs import EXPERIMENTS, Variant

    experiment, variant = EXPERIMENTS["redness"], Variant("vipo", "vipo")
    longer = run_one(experiment, variant, 0, tmp_path / "a", True, {"eval_every": "1"})
    shorter = run_one(experiment, variant, 0, tmp_path / "b", True,
                      {"eval_every": "1", "iterations": "1"})
    reused = run_one(experiment, variant, 0, tmp_path / "a", True,
                     {"eval_every": "1", "iterations": "1"})
    assert [r["iteration"] for r in longer["eval"]] == [0, 1, 2]
    assert shorter["eval"] == longer["eval"][:2] == reused["eval"]
    assert shorter["history"] == longer["history"][:1] == reused["history"]
    assert reused["seconds"] == longer["seconds"]  # read from the saved run, not trained


def test_a_saved_run_is_reused_only_for_its_own_settings(tmp_path, capsys):
    """Runs are found by name; a saved run whose config differs from the one asked for is
    refused in one line naming the field, and the folder is left as it was."""
    from vipo.experiments import compare

    assert compare.main(["redness", "--quick", "--out", str(tmp_path),
                         "--variants", "grpo"]) == 0
    saved = tmp_path / "runs" / "redness" / "grpo-seed0" / "result.json"
    before = saved.read_bytes()
    capsys.readouterr()
    assert compare.main(["redness", "--quick", "--out", str(tmp_path), "--variants", "grpo",
                         "kl_coef=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress bar
    assert err.startswith("compare: config error: ")
    assert "grpo-seed0" in err and "train.kl_coef 0.0 (wanted 0.5)" in err
    assert saved.read_bytes() == before


def test_run_names_do_not_follow_the_preset(monkeypatch):
    """The experiments fix their own clip range, so a change of the preset's neither renames
    saved runs nor lets one clip range's run stand for another's."""
    from vipo import config
    from vipo.experiments.runner import run_name
    from vipo.experiments.specs import EXPERIMENTS, Variant

    clip = EXPERIMENTS["clip"]
    at = {v.label: v for v in clip.variants}
    names = [run_name(EXPERIMENTS["object"], Variant("vipo", "vipo"), 0),
             run_name(clip, at["vipo clip=0.2"], 0), run_name(clip, at["vipo clip=1"], 0)]
    assert names == ["vipo-seed0", "vipo-seed0", "vipo_clip_range=1-seed0"]
    toy = {**config.PRESETS["toy"], "train": {**config.PRESETS["toy"]["train"],
                                              "clip_range": 0.5}}
    monkeypatch.setitem(config.PRESETS, "toy", toy)
    assert [run_name(EXPERIMENTS["object"], Variant("vipo", "vipo"), 0),
            run_name(clip, at["vipo clip=0.2"], 0), run_name(clip, at["vipo clip=1"], 0)] == names
