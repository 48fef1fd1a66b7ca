"""``python -m vipo.toy.measure {vae,evaluator,backbone,generator,all}``: the cards' figures.

Every figure is measured on held-out combinations (never trained on) and written to the
asset's ``figures.json``; ``vipo.toy.cards`` turns those and ``training.json`` into
``CARD.md``. The tests reload the shipped weights and check the same figures on a fixed
held-out batch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import models, world
from .cards import update_figures
from .evaluator import ToyEvaluator, map_top_iou


def mean_metrics(scores: dict) -> dict:
    return {k: round(float(v.float().mean()), 4) for k, v in scores.items()}


def heldout_renders(specs=None):
    specs = specs or world.heldout_specs()
    images, masks = world.render_batch(specs, models.IMAGE_SIZE)
    return specs, images, masks


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images through the VAE's encoder (posterior mean) and decoder."""
    latents = vae.encode(images * 2 - 1).latent_dist.mode()
    return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)


def measure_vae(vae_folder, evaluator: ToyEvaluator) -> dict:
    """The ceiling: the evaluator on held-out renders that went through the VAE and back."""
    from diffusers import AutoencoderKL

    specs, images, _ = heldout_renders()
    recon = vae_roundtrip(AutoencoderKL.from_pretrained(str(vae_folder)).eval(), images)
    out = mean_metrics(evaluator.score(recon, specs))
    out["pixel_mse_01"] = round(float(((recon - images) ** 2).mean()), 6)
    return out


def measure_evaluator(evaluator: ToyEvaluator) -> dict:
    specs, images, _ = heldout_renders()
    return mean_metrics(evaluator.score(images, specs))


def psm(folder=None):
    from ..psm import PerceptualStructuringModule

    return PerceptualStructuringModule.from_pretrained(str(folder or models.asset("backbone")))


def measure_backbone(folder=None, samples: torch.Tensor | None = None) -> dict:
    """Mean IoU of the top 30% of the PSM map with the object mask: on held-out renders, and
    (when given) on generator samples of the same held-out prompts, with the renderer's mask
    of the prompt's spec as an approximate mask. For scale: the ceiling (a map that is the
    mask itself) and the same architecture with random weights."""
    specs, images, masks = heldout_renders()
    out = _map_ious(psm(folder), images, masks, samples)
    area = masks.flatten(1).float().mean(1)
    out["ceiling_perfect_map"] = round(float((torch.minimum(area, torch.tensor(0.3)) /
                                               torch.maximum(area, torch.tensor(0.3))).mean()), 4)
    out["random_init_backbone"] = _map_ious(_random_backbone_psm(), images, masks, samples)
    return out


def _map_ious(module, images, masks, samples) -> dict:
    latent = (models.IMAGE_SIZE // 2,) * 2
    out = {"map_iou_renders": round(float(map_top_iou(module(images, latent), masks).mean()), 4)}
    if samples is not None:
        out["map_iou_generator_samples"] = round(float(
            map_top_iou(module(samples, latent), masks).mean()), 4)
    return out


def _random_backbone_psm():
    """The backbone's architecture and preprocessing with its seed-0 initial weights."""
    from ..psm import PerceptualStructuringModule

    return PerceptualStructuringModule.from_pretrained(str(models.asset("backbone")),
                                                       random_init=0)


TEST_BATCH = 48  # the fixed held-out batch the tests re-measure (evenly spread prompts)
PIPELINE_STEPS = 8


def test_batch() -> list:
    from ..prompts import spread

    return spread(world.heldout_specs(), TEST_BATCH)


@torch.no_grad()
def pipeline_samples(pipe, specs: list, seed: int = 0, batch: int = 49) -> torch.Tensor:
    """The plain diffusers call, defaults except steps and guidance: (N, 3, 32, 32)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [world.prompt(s) for s in specs]
    return torch.cat([pipe(prompts[i:i + batch], num_inference_steps=PIPELINE_STEPS,
                           guidance_scale=1.0, generator=gen, output_type="pt").images
                      for i in range(0, len(prompts), batch)])


@torch.no_grad()
def preset_samples(folder, specs: list, seed: int = 0) -> torch.Tensor:
    """Samples with the ``toy`` training preset's own sampler (its SDE, steps, shift and
    eta; decoded from the last step's x0 prediction), as rollouts see them."""
    from ..adapters import get_adapter
    from ..config import Config
    from ..rollout import Schedule, rollout

    cfg = Config.from_name("toy")
    cfg.model.path = str(folder)
    adapter = get_adapter("sd3")(cfg.model, torch.device("cpu"), torch.float32)
    schedule = Schedule.build(cfg.sample, torch.device("cpu"))
    roll = rollout(adapter, adapter.transformer, schedule, [world.prompt(s) for s in specs],
                   group_size=1, same_init_noise=True, batch_size=49, ratio_level="position",
                   decode_from=cfg.sample.decode_from,
                   generator=torch.Generator().manual_seed(seed))
    return roll.media


def measure_generator(folder, evaluator: ToyEvaluator) -> dict:
    """Fidelity on all held-out prompts with the plain pipeline call and with the preset's
    sampler, and on the fixed test batch (plain call)."""
    specs = world.heldout_specs()
    pipe = models.load_pipeline(folder)
    out = {"pipeline_call_ode_8_steps": mean_metrics(evaluator.score(
        pipeline_samples(pipe, specs), specs))}
    samples = preset_samples(folder, specs)
    out["toy_preset_sampler"] = mean_metrics(evaluator.score(samples, specs))
    batch = test_batch()
    out["test_batch_pipeline_call"] = mean_metrics(evaluator.score(
        pipeline_samples(pipe, batch), batch))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vipo.toy.measure")
    parser.add_argument("what", choices=list(MEASURES) + ["all"])
    parser.add_argument("--root", type=Path, default=models.ASSETS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for what in MEASURES if args.what == "all" else [args.what]:
        measure(what, args.root)


def measure(what: str, root: Path) -> None:
    """Measures one model's figures and writes them into its card."""
    start = time.perf_counter()
    evaluator = ToyEvaluator(root / "evaluator")
    if what == "vae":
        name, section = "generator", "VAE ceiling: evaluator on held-out renders through the VAE"
        result = measure_vae(root / "generator" / "vae", evaluator)
    elif what == "evaluator":
        name, section = "evaluator", "held-out renders (196)"
        result = measure_evaluator(evaluator)
    elif what == "backbone":
        name, section = "backbone", "PSM map, top-30% IoU with the object mask"
        result = measure_backbone(root / "backbone", preset_samples(
            root / "generator", world.heldout_specs()))
    else:
        name = "generator"
        result = measure_generator(root / "generator", evaluator)
        for section, values in result.items():
            update_figures(name, section, values, root)
        print(json.dumps(result), f"({time.perf_counter() - start:.1f} s)")
        return
    print(json.dumps(result), f"({time.perf_counter() - start:.1f} s)")
    update_figures(name, section, result, root)


MEASURES = ("evaluator", "vae", "generator", "backbone")


if __name__ == "__main__":
    main()
