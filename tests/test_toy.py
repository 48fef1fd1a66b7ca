"""The toy world: the renderer's contract, the shipped models against their cards' figures
(re-measured here on the fixed held-out batch, offline, through the real from_pretrained),
the exactness of the SD3 zero-token shortcut, and the evaluation phase's determinism."""

from __future__ import annotations

import json
import random

import pytest
import torch

from vipo.toy import models, world
from vipo.toy.evaluator import ToyEvaluator, iou, map_top_iou


# ---- world ----------------------------------------------------------------------------------
def test_render_is_deterministic_and_in_range():
    spec = world.sample_spec(random.Random(3))
    assert spec == world.sample_spec(3)  # a seed and a Random of that seed agree
    a, mask_a = world.render(spec, 32)
    b, mask_b = world.render(spec, 32)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and mask_a.dtype == torch.bool
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_splits_are_disjoint_and_cover_every_attribute_value():
    train, heldout = set(world.train_specs()), set(world.heldout_specs())
    assert not train & heldout
    assert len(train) + len(heldout) == 5 * 6 * 4 * 9 * 2
    assert 150 <= len(heldout) <= 260  # about 10%
    for name, values in world.ATTRIBUTES.items():
        for split in (train, heldout):
            assert {getattr(s, name) for s in split} == set(values)
    rng = random.Random(0)
    assert all(world.sample_spec(rng) in train for _ in range(200))
    assert all(world.sample_spec(rng, "heldout") in heldout for _ in range(50))


def test_object_pixels_have_the_object_colour_and_the_rest_the_background():
    spec = world.Spec("square", "blue", "white", "centre", "large")
    image, mask = world.render(spec, 32)
    blue, white = torch.tensor(world.COLOURS["blue"]), torch.tensor(world.BACKGROUNDS["white"])
    # Fully covered and fully uncovered pixels are exact; only the edge is blended.
    assert torch.allclose(image[:, 16, 16], blue) and torch.allclose(image[:, 0, 0], white)
    edge = ~(torch.isclose(image, blue.view(3, 1, 1)).all(0)
             | torch.isclose(image, white.view(3, 1, 1)).all(0))
    assert 0 < int(edge.sum()) < 0.25 * int(mask.sum())  # anti-aliased, not blurred
    coverage = (image[2] - white[2]) / (blue[2] - white[2])  # the blend weight per pixel
    assert abs(float(coverage.mean()) - world.SIZES["large"]) < 0.005
    assert abs(float(mask.float().mean()) - world.SIZES["large"]) < 0.04


def test_positions_move_the_object_and_sizes_scale_it():
    def centre(position, size="small"):
        _, mask = world.render(world.Spec("circle", "red", "grey", position, size), 32)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        return float(xs.float().mean()), float(ys.float().mean()), int(mask.sum())

    left, top, _ = centre("top left")
    right, bottom, _ = centre("bottom right")
    assert right - left > 8 and bottom - top > 8
    assert centre("centre", "large")[2] > 1.4 * centre("centre", "small")[2]


def test_prompt_round_trip_and_errors():
    for spec in world.heldout_specs()[:20]:
        assert world.parse_prompt(world.prompt(spec)) == spec
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.parse_prompt("a cat on a sofa")
    with pytest.raises(ValueError, match="Spec.shape"):
        world.Spec("hexagon", "red", "grey", "top", "small")
    with pytest.raises(ValueError, match="split"):
        world.sample_spec(0, "test")


def test_tokenizer_fits_every_prompt_with_eos_not_2():
    tok = models.tokenizer()
    assert tok.eos_token_id != 2  # else the legacy argmax path (docs/toy_world.md)
    longest = max((world.prompt(s) for s in world.all_specs()), key=len)
    ids = tok(longest)["input_ids"]
    assert len(ids) <= models.TEXT_LENGTH and tok.unk_token_id not in ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_iou_helpers():
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    assert float(iou(a, a)) == 1.0 and float(iou(a, ~a)) == 0.0
    maps = a.float()
    assert float(map_top_iou(maps, a, top=0.5)) == 1.0


# ---- shipped models -------------------------------------------------------------------------
def figures(name: str) -> dict:
    return json.loads((models.asset(name) / "figures.json").read_text())


@pytest.fixture(scope="module")
def evaluator():
    return ToyEvaluator()


def test_assets_are_small_safetensors_with_cards():
    total = 0
    for name in ("generator", "backbone", "evaluator"):
        folder = models.asset(name)
        assert (folder / "CARD.md").read_text().count("Measured figures") == 1
        assert list(folder.rglob("*.safetensors"))
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
        total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total <= 20e6


def test_evaluator_reaches_its_card_on_heldout_renders(evaluator):
    from vipo.toy.measure import measure_evaluator

    card = figures("evaluator")["held-out renders (196)"]
    measured = measure_evaluator(evaluator)
    for key in ("shape_acc", "colour_acc", "position_acc", "background_acc", "size_acc"):
        assert measured[key] >= card[key] - 0.01 and measured[key] >= 0.95, key
    assert measured["structure_iou"] >= card["structure_iou"] - 0.01


def test_backbone_maps_cover_the_object(evaluator):
    from vipo.toy.measure import measure_backbone

    card = figures("backbone")["PSM map, top-30% IoU with the object mask"]
    measured = measure_backbone()
    assert measured["map_iou_renders"] >= 0.5
    assert abs(measured["map_iou_renders"] - card["map_iou_renders"]) < 0.01


def test_plain_pipeline_call_is_faithful(evaluator):
    """DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=8,
    guidance_scale=1.0) on the fixed held-out batch: the card's figure, within rounding."""
    from vipo.toy.measure import mean_metrics, pipeline_samples, test_batch

    card = figures("generator")["test_batch_pipeline_call"]
    batch = test_batch()
    measured = mean_metrics(evaluator.score(pipeline_samples(models.load_pipeline(), batch),
                                            batch))
    for key in ("shape_acc", "colour_acc", "fidelity"):
        assert abs(measured[key] - card[key]) <= 2 / len(batch) + 1e-6, key
    assert measured["shape_acc"] >= 0.8 and measured["colour_acc"] >= 0.8


def test_adapter_shortcut_matches_the_plain_pipeline_velocity():
    """The SD3 adapter's one-token stand-in for 256 zero T5 tokens is exact: the velocity
    equals the stock transformer's on the pipeline's own full-length embeddings."""
    from vipo.adapters import get_adapter
    from vipo.config import Config

    cfg = Config.from_name("toy")
    cfg.model.path = str(models.asset("generator"))
    adapter = get_adapter("sd3")(cfg.model, torch.device("cpu"), torch.float32)
    prompts = [world.prompt(s) for s in world.heldout_specs()[:3]]
    cond = adapter.encode_prompts(prompts)
    assert cond["prompt_embeds"].shape[1] == models.TEXT_LENGTH + 1
    z = torch.randn(3, *adapter.latent_shape())
    t = torch.tensor([900.0, 500.0, 100.0])
    fast = adapter.forward(adapter.transformer, z, t, cond)
    pipe = models.load_pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None,
                                              do_classifier_free_guidance=False)
    assert embeds.shape[1] == models.TEXT_LENGTH + 256
    full = pipe.transformer(hidden_states=z, timestep=t, encoder_hidden_states=embeds,
                            pooled_projections=pooled, return_dict=False)[0]
    # fp32 rounding of a 17- against a 272-key softmax: relative to the output's scale.
    error = float((fast - full).abs().max() / full.abs().max())
    assert error < 2e-5, error


def test_toy_fidelity_reward_and_its_details(evaluator):
    from vipo.rewards import build_reward

    specs = world.heldout_specs()[:6]
    images = world.render_batch(specs)[0]
    fn = build_reward("toy_fidelity", None, "cpu")
    prompts = [world.prompt(s) for s in specs]
    assert torch.equal(fn(images, prompts), torch.ones(6))
    wrong = [world.prompt(world.Spec(s.shape, s.colour, s.background, s.position, s.size))
             for s in specs[1:] + specs[:1]]
    assert float(fn(images, wrong).mean()) < 1.0
    details = fn.details(images, prompts)
    assert set(details) >= {"shape_acc", "colour_acc", "structure_iou"}
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        fn(images[:1], ["a cat"])


# ---- the evaluation phase -------------------------------------------------------------------
def test_evaluation_phase_is_deterministic(tmp_path):
    from vipo.config import Config
    from vipo.distributed import reset_accelerate_state
    from vipo.run_loop import RunLoop

    reset_accelerate_state()
    cfg = Config.from_name("toy")
    cfg.update({"iterations": 1, "eval_samples": 4, "output_dir": str(tmp_path),
                "run_name": "eval", "progress": False, "tensorboard": False})
    trainer = RunLoop(cfg.validate())
    first = trainer.eval(trainer.trainer.model, 0)
    second = trainer.eval(trainer.trainer.model, 0)
    assert first == second
    assert {"eval_redness", "eval_toy_fidelity", "eval_shape_acc",
            "eval_structure_iou"} <= set(first)
    assert (tmp_path / "eval" / "eval" / "iter000000.png").is_file()


def test_pretrain_trains_every_model_through_the_one_loop(tmp_path):
    """Two steps of each toy model's training (the one ``fit`` loop): weights, log and card
    data are written, and the loss is finite."""
    import json

    from vipo.toy import pretrain

    for name in ("evaluator", "backbone", "vae"):
        pretrain.TRAINERS[name](tmp_path / name, pretrain.Limit(0, steps=2), 0)
    pretrain.train_generator(tmp_path / "generator", pretrain.Limit(0, steps=2), 0,
                             tmp_path / "vae")
    for folder in ("evaluator", "backbone", "vae", "generator"):
        info = json.loads((tmp_path / folder / "training.json").read_text())
        assert info["steps"] == 2, folder
    log = (tmp_path / "evaluator" / "train_log.csv").read_text().splitlines()
    assert log[0] == "iteration,loss,seconds" and float(log[-1].split(",")[1]) > 0
    assert (tmp_path / "generator" / "transformer" / "config.json").is_file()
