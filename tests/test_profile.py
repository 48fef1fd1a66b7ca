"""vipo.profile: the real architectures are what their configs say (built on the meta
device, no memory), and the profile's code runs end to end at tiny size on the CPU. The
full tiny run of both presets is part of the GPU check's dry run in CI."""

from __future__ import annotations

import json

import pytest
import torch

from vipo import profile
from vipo.config import Config

# Published parameter counts of the architectures the configs build.
REAL = {"flux": (11_901_408_320, 83_819_683), "wan": (1_418_996_800, 126_892_531)}


@pytest.mark.parametrize("arch,preset,latent", [("flux", "flux_vipo", (16, 64, 64)),
                                                ("wan", "wan_vipo", (16, 14, 30, 52))])
def test_real_architectures_from_their_configs(arch, preset, latent):
    """FLUX.1-dev (11.9B) with its VAE and Wan 2.1 1.3B with its VAE, through the project's
    adapter with the stood-in text encoders, on the meta device; the latent shape of the
    preset's resolution is the one the pipeline gives."""
    pipe = profile.build_pipeline(arch, "real", "meta", torch.bfloat16)
    count = (sum(p.numel() for p in pipe.transformer.parameters()),
             sum(p.numel() for p in pipe.vae.parameters()))
    assert count == REAL[arch]
    cfg = Config.from_name(preset)
    adapter = profile.standin_adapter(arch, pipe)(cfg.model, torch.device("meta"),
                                                  torch.bfloat16)
    assert adapter.latent_shape() == latent and adapter.transformer is pipe.transformer
    cond = adapter.encode_prompts(["a red cube", "a blue ball", "a red cube"])
    assert cond["prompt_embeds"].shape == (3, cfg.model.max_sequence_length, 4096)
    if arch == "flux":
        assert cond["pooled"].shape == (3, 768)
    else:
        assert cond["neg_prompt_embeds"].shape == cond["prompt_embeds"].shape


def test_backbone_and_reward_standin_sizes():
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config,
                              Dinov2Model)

    with torch.device("meta"):
        dino = Dinov2Model(Dinov2Config(**profile.DINOV2_LARGE))
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**profile.CLIP_H_VISION))
    assert sum(p.numel() for p in dino.parameters()) == 304_368_640  # DINOv2 ViT-L/14
    assert sum(p.numel() for p in clip.parameters()) == 632_076_800  # ViT-H/14 image tower


def test_stood_in_embeddings_are_one_draw_per_prompt():
    class Holder:
        device, weight_dtype = torch.device("cpu"), torch.float32

    a = profile._embeddings(["x", "y", "x"], (4, 8), Holder())
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])


def test_tiny_profile_side_by_side(tmp_path):
    """GRPO and ViPO on the tiny Flux world through the Trainer's own phases: every phase
    timed, the PSM only for ViPO, the report written as JSON and markdown."""
    js, md = tmp_path / "profile.json", tmp_path / "profile.md"
    assert profile.main(["flux_vipo", "--size", "tiny", "--warmup", "0", "--json", str(js),
                         "--md", str(md)]) == 0
    result = json.loads(js.read_text())["presets"]["flux_vipo"]
    algos = result["algorithms"]
    assert set(algos) == {"grpo", "vipo"}
    for name, algo in algos.items():
        (row,) = algo["measured"]
        seconds = row["seconds"]
        assert seconds["total"] > 0 and seconds["sampling"] > 0 and seconds["decode"] > 0
        assert seconds["reward"] > 0 and seconds["training"] > 0
        assert all(v >= -1e-3 for v in seconds.values()), seconds
        assert (seconds["psm"] > 0) == (name == "vipo")
        assert abs(row["onpolicy_max_abs_log_ratio"]) < 1e-5  # fp32: rounding only
    assert "overhead_pct" in result and "Stand-ins: text encoders" in md.read_text()


def test_tiny_onpolicy_probe_on_video(tmp_path):
    js = tmp_path / "probe.json"
    assert profile.main(["wan_vipo", "--size", "tiny", "--probe", "--json", str(js)]) == 0
    probe = json.loads(js.read_text())["presets"]["wan_vipo"]["probe"]
    assert probe["positions"] > 0 and probe["precision"] == "float32"
    assert probe["gap_max"] < 1e-4 and probe["repeat_max"] == 0.0


def test_real_size_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        profile.main(["flux_vipo"])
