"""``python -m vipo.profile PRESET [PRESET ...] [--size real|tiny] [key=value ...]``: one
training iteration of the real architectures, timed by phase, GRPO and ViPO side by side,
with nothing downloaded.

The models are the published architectures built from their configs (written out below,
each with the file it comes from) with random weights: the FLUX.1-dev transformer (12B) and
its VAE, the Wan 2.1 T2V 1.3B transformer and its VAE, DINOv2-L for the allocation maps. The
text encoders (T5-XXL and CLIP-L for Flux, UMT5-XXL for Wan) are stood in by random
embeddings of their real shape, one fixed draw per prompt, and the reward by a random-weight
CLIP ViT-H/14 image tower (HPSv2's backbone) scoring each image against a fixed direction:
their times are a stand-in's, and the output says so. ``--size tiny`` runs the same code on
the tiny world's architectures (vipo/tiny.py's configs), on the CPU, as the tests do.

Each algorithm gets its own freshly built model and a Trainer (vipo.trainer) whose own phase
methods run the iteration; the profile only wraps the decoder and the old-log-prob recompute
to time them apart. Per iteration it reports, in seconds: sampling (without the decode),
decode, reward, PSM, recompute of the old log-probs, training (recompute excluded), the
rest, the total, and the peak device memory; the first ``--warmup`` iterations (kernel
compilation, allocator growth) are reported but not in the comparison.

``--probe`` instead measures the on-policy gap: the old log-probs as the rollout stored them
(its batch layout, one timestep per batch) against the same positions recomputed in the
training layout (train_batch_size, mixed timesteps), and the training layout against itself.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from .logging_utils import PhaseTimer

# ---------------------------------------------------------------------------- real configs
# black-forest-labs/FLUX.1-dev, transformer/config.json (diffusers FluxTransformer2DModel).
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
# black-forest-labs/FLUX.1-dev, vae/config.json (AutoencoderKL, 16 latent channels).
FLUX_DEV_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
    "mid_block_add_attention": True, "force_upcast": True}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (WanTransformer3DModel).
WAN_1_3B_TRANSFORMER = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, vae/config.json: base_dim 96, z_dim 16, dim_mult
# [1, 2, 4, 4], 2 res blocks, temporal downsampling [False, True, True] and the per-channel
# latents_mean / latents_std, which are diffusers' AutoencoderKLWan defaults.
WAN_VAE: dict = {}
# facebook/dinov2-large, config.json (Dinov2Model, ViT-L/14) and its preprocessor's statistics.
DINOV2_LARGE = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
    "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6,
    "qkv_bias": True, "hidden_act": "gelu", "use_swiglu_ffn": False}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, config.json's vision_config: the OpenCLIP ViT-H/14
# image tower HPSv2 fine-tunes (its 224 px input and CLIP's statistics).
CLIP_H_VISION = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "projection_dim": 1024,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5}
TINY_CLIP_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "patch_size": 8, "image_size": 32,
                    "projection_dim": 32}
CLIP_MEAN, CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]

ARCHS = {  # arch -> diffusers classes, the real configs, the stood-in text encoders
    "flux": {"pipeline": "FluxPipeline", "transformer": "FluxTransformer2DModel",
             "vae": "AutoencoderKL", "real": (FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE),
             "text": "T5-XXL (4096 per token) and CLIP-L pooled (768)"},
    "wan": {"pipeline": "WanPipeline", "transformer": "WanTransformer3DModel",
            "vae": "AutoencoderKLWan", "real": (WAN_1_3B_TRANSFORMER, WAN_VAE),
            "text": "UMT5-XXL (4096 per token)"},
}

# What one device holds, per preset and size, on top of the preset (and the reward and PSM
# stand-ins). FLUX.1-dev is trained with LoRA: full fine-tuning keeps fp32 weights, gradients
# and AdamW states of 12B parameters (about 190 GB), which needs FSDP over several GPUs.
SETTINGS = {
    ("flux_vipo", "real"): {"sample": {"group_size": 4, "sample_batch_size": 4},
                            "train": {"lora_rank": 64, "train_batch_size": 1, "grad_accum": 4,
                                      "fsdp": False}},
    ("wan_vipo", "real"): {"sample": {"group_size": 4},
                           "train": {"train_batch_size": 1, "grad_accum": 4, "fsdp": False}},
    ("flux_vipo", "tiny"): {"model": {"height": 64, "width": 64, "max_sequence_length": 16},
                            "sample": {"num_steps": 3, "group_size": 2, "sample_batch_size": 2},
                            "train": {"lora_rank": 4, "train_batch_size": 1, "grad_accum": 2,
                                      "fsdp": False},
                            "run": {"cpu_threads": 1}},
    ("wan_vipo", "tiny"): {"model": {"height": 32, "width": 32, "num_frames": 5,
                                     "max_sequence_length": 16},
                           "sample": {"num_steps": 3, "group_size": 2},
                           "train": {"train_batch_size": 1, "grad_accum": 2, "fsdp": False},
                           "run": {"cpu_threads": 1}},
}
PRESETS = sorted({preset for preset, _ in SETTINGS})
ALGORITHMS = {"grpo": {"algorithm": "grpo", "ratio_level": "sample"},
              "vipo": {"algorithm": "vipo", "ratio_level": "position"}}
STANDINS = ("text encoders stood in by random embeddings of the shape the transformer takes "
            "({text}); reward "
            "stood in by a random-weight {reward} image tower; all weights random")
REWARD_STANDIN = {"real": "CLIP ViT-H/14 (HPSv2's backbone)", "tiny": "tiny CLIP"}


# ---------------------------------------------------------------------------- stand-ins
def _clip_reward(vision: dict, device, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).to(dtype).eval()
    direction = torch.nn.functional.normalize(torch.randn(vision["projection_dim"],
                                                          device=device), dim=0)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    size = vision["image_size"]

    @torch.no_grad()
    def fn(images, prompts):
        pixels = torch.nn.functional.interpolate(images.to(device).float(), size=(size, size),
                                                 mode="bilinear", antialias=True)
        embeds = model(pixel_values=((pixels - mean) / std).to(dtype)).image_embeds
        return (torch.nn.functional.normalize(embeds.float(), dim=-1) @ direction).cpu()

    return fn


def clip_h_reward(cfg, device):
    """Reward stand-in at real size: a random-weight CLIP ViT-H/14 image tower."""
    device = torch.device(device)
    return _clip_reward(CLIP_H_VISION, device,
                        torch.bfloat16 if device.type == "cuda" else torch.float32)


def tiny_clip_reward(cfg, device):
    """The same stand-in, tiny (the CPU test)."""
    return _clip_reward(TINY_CLIP_VISION, torch.device(device), torch.float32)


def standin_adapter(arch: str, pipe):
    """The project's adapter for ``arch`` over ``pipe`` (built in memory), its prompt
    encoding replaced by random embeddings of the text encoders' real shape."""
    from .adapters import get_adapter

    base = get_adapter(arch)

    class StandIn(base):
        def load_pipeline(self, cfg, weight_dtype):
            return pipe

        @torch.no_grad()
        def encode_prompts(self, prompts: list) -> dict:
            tcfg = self.transformer.config
            width = tcfg.joint_attention_dim if arch == "flux" else tcfg.text_dim
            tokens = self.cfg.max_sequence_length
            cond = {"prompt_embeds": _embeddings(prompts, (tokens, width), self)}
            if arch == "flux":
                cond["pooled"] = _embeddings(prompts, (tcfg.pooled_projection_dim,), self, 1)
            elif self.use_cfg:
                cond["neg_prompt_embeds"] = _embeddings(self.negative_prompts(len(prompts)),
                                                        (tokens, width), self)
            return cond

    StandIn.__name__ = StandIn.__qualname__ = f"StandIn{base.__name__}"
    return StandIn


def _embeddings(prompts, shape, adapter, salt: int = 0) -> torch.Tensor:
    """One fixed random draw per prompt (so a group shares its conditioning)."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(
        zlib.crc32(p.encode()) + salt)) for p in prompts]
    return torch.stack(out).to(adapter.device, adapter.weight_dtype)


# ---------------------------------------------------------------------------- building
def component_configs(arch: str, size: str) -> tuple[dict, dict]:
    """(transformer config, VAE config): the published ones, or the tiny world's."""
    if size == "real":
        return tuple(copy.deepcopy(c) for c in ARCHS[arch]["real"])
    import diffusers

    from . import tiny

    folder = tiny.ensure_world(arch)
    spec = ARCHS[arch]
    return (getattr(diffusers, spec["transformer"]).load_config(folder / "transformer"),
            getattr(diffusers, spec["vae"]).load_config(folder / "vae"))


def build_pipeline(arch: str, size: str, device, dtype):
    """The diffusers pipeline with random-weight transformer and VAE, no text encoders."""
    import diffusers

    spec = ARCHS[arch]
    tcfg, vcfg = component_configs(arch, size)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where they will run
        transformer = getattr(diffusers, spec["transformer"]).from_config(tcfg)
        vae = getattr(diffusers, spec["vae"]).from_config(vcfg)
    transformer.to(dtype)
    vae.to(dtype)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()  # unused: the config's schedule
    pipeline = getattr(diffusers, spec["pipeline"])
    if arch == "flux":
        return pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return pipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                    transformer=transformer)


def backbone_folder(size: str, root: Path) -> Path:
    """DINOv2-L with random weights written as a transformers checkpoint (the PSM loads
    its backbone with from_pretrained), or the tiny world's backbone."""
    if size == "tiny":
        from . import tiny

        return tiny.ensure_backbone()
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = root / "dinov2-large"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(**DINOV2_LARGE)).save_pretrained(folder,
                                                                  safe_serialization=True)
        BitImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                          do_center_crop=False).save_pretrained(folder)
    return folder


def make_config(preset: str, size: str, algorithm: str, backbone: Path, overrides: list):
    from .config import Config

    cfg = Config.from_name(preset)
    cfg.update(SETTINGS[(preset, size)])
    cfg.update({"train": ALGORITHMS[algorithm],
                "reward": {"reward": [f"vipo.profile:{'clip_h' if size == 'real' else 'tiny_clip'}"
                                      "_reward"]},
                "psm": {"backbone": str(backbone)}, "sample": {"prompts": "builtin"}})
    cfg.apply_overrides(overrides)
    return cfg.validate()


def build_trainer(cfg, size: str):
    """A Trainer over a freshly built random-weight model (its own Accelerator)."""
    from .distributed import reset_accelerate_state
    from .trainer import Trainer, make_accelerator, precision_of

    reset_accelerate_state()
    acc = make_accelerator(cfg)
    dtype = torch.bfloat16 if precision_of(cfg) == "bf16" else torch.float32
    arch = cfg.model.arch
    pipe = build_pipeline(arch, size, acc.device, dtype)
    adapter = standin_adapter(arch, pipe)(cfg.model, acc.device, dtype)
    return Trainer(cfg, acc, adapter)


# ---------------------------------------------------------------------------- measuring
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _wrap_timed(obj, name: str, timer: PhaseTimer, phase: str) -> None:
    """``obj.name`` timed under ``phase`` by ``timer`` (the Trainer's own timer pops its
    phases into the metrics row; this one is the profile's)."""
    inner = getattr(obj, name)

    def timed(*args, **kwargs):
        with timer(phase):
            return inner(*args, **kwargs)

    setattr(obj, name, timed)


def profile_algorithm(cfg, size: str, warmup: int, iterations: int) -> dict:
    trainer = build_trainer(cfg, size)
    device = trainer.accelerator.device
    extra = PhaseTimer(device)
    _wrap_timed(trainer.adapter, "decode", extra, "decode")
    _wrap_timed(trainer, "_old_log_probs", extra, "recompute")
    transformer = trainer.adapter.transformer
    params = sum(p.numel() for p in transformer.parameters())
    trained = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    rows = []
    for it in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        result = trainer.iteration(it)
        _sync(device)
        rows.append(_phases(result.row, extra.pop(), time.perf_counter() - start, device))
    out = {"transformer_parameters": params, "trained_parameters": trained,
           "precision": str(trainer.adapter.weight_dtype).replace("torch.", ""),
           "old_log_probs": trainer.old_log_probs_mode(),
           "warmup": rows[:warmup], "measured": rows[warmup:]}
    trainer.accelerator.free_memory()  # the prepared model and optimiser it holds
    del trainer, transformer
    _release()
    return out


def _phases(row: dict, extra: dict, total: float, device) -> dict:
    decode, recompute = extra.get("decode", 0.0), extra.get("recompute", 0.0)
    phases = {"sampling": row["time_sampling"] - decode, "decode": decode,
              "reward": row["time_reward"], "psm": row["time_psm"], "recompute": recompute,
              "training": row["time_training"] - recompute}
    phases["rest"] = total - sum(phases.values())
    phases["total"] = total
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"seconds": phases, "peak_gib": peak,
            "onpolicy_max_abs_log_ratio": row.get("onpolicy_max_abs_log_ratio"),
            "clip_frac": row.get("clip_frac_low", math.nan) + row.get("clip_frac_high", math.nan),
            "loss": row.get("loss")}


def _mean(rows: list, key: str) -> float:
    return sum(r["seconds"][key] for r in rows) / len(rows)


def onpolicy_gap(cfg, size: str) -> dict:
    """|old log-prob as the rollout stored it - recomputed in the training layout| per
    position, and the training layout's own repeatability, for one rollout."""
    cfg = copy.deepcopy(cfg)
    cfg.train.old_log_probs = "recompute"
    trainer = build_trainer(cfg, size)
    roll = trainer.sample(0)
    batches = trainer._micro_batches(roll.num_samples)
    stored = torch.cat([roll.log_probs[mb, k].flatten() for mb, k in batches]).double()
    first = torch.cat([lp.flatten() for lp in trainer._old_log_probs(roll, batches)]).double()
    again = torch.cat([lp.flatten() for lp in trainer._old_log_probs(roll, batches)]).double()
    gap, repeat = (stored - first).abs().cpu(), (first - again).abs().cpu()
    eps = cfg.train.clip_range
    out = {"precision": str(trainer.adapter.weight_dtype).replace("torch.", ""),
           "ratio_level": cfg.train.ratio_level, "clip_range": eps,
           "rollout_batch": cfg.sample.sample_batch_size,
           "train_batch": cfg.train.train_batch_size, "positions": gap.numel(),
           "gap_max": float(gap.max()), "gap_median": float(gap.median()),
           "gap_p99": float(gap.quantile(0.99)) if gap.numel() > 1 else float(gap.max()),
           "frac_over_eps": float((gap > eps).double().mean()),
           "frac_over_eps_10": float((gap > eps / 10).double().mean()),
           "repeat_max": float(repeat.max())}
    trainer.accelerator.free_memory()
    del trainer
    _release()
    return out


# ---------------------------------------------------------------------------- reporting
def markdown(report: dict) -> str:
    lines = [f"Size: {report['size']}; device: {report['device']}; " +
             ("the on-policy probe." if report.get("probe") else
              f"{report['warmup']} warm-up + {report['iterations']} measured iteration(s) "
              f"each, each algorithm on a freshly built model."), ""]
    for preset, result in report["presets"].items():
        lines.append(f"### {preset}")
        lines.append("")
        if "error" in result:
            lines += [f"FAILED: {result['error']}", ""]
        if result.get("standins"):
            lines += [f"Stand-ins: {result['standins']}.", ""]
        if result.get("settings"):
            lines += [f"Settings on top of the preset: `{json.dumps(result['settings'])}`", ""]
        algos = result.get("algorithms", {})
        measured = {a: r for a, r in algos.items() if r.get("measured")}
        if measured:
            names = list(measured)
            lines.append("| phase (s) | " + " | ".join(names) +
                         (" | vipo - grpo |" if {"grpo", "vipo"} <= set(names) else " |"))
            lines.append("|---" * (len(names) + 1 + ({"grpo", "vipo"} <= set(names))) + "|")
            for phase in ("sampling", "decode", "reward", "psm", "recompute", "training",
                          "rest", "total"):
                values = [_mean(measured[a]["measured"], phase) for a in names]
                diff = ([f"{_mean(measured['vipo']['measured'], phase) - _mean(measured['grpo']['measured'], phase):+.3f}"]
                        if {"grpo", "vipo"} <= set(names) else [])
                lines.append(f"| {phase} | " + " | ".join(f"{v:.3f}" for v in values + []) +
                             "".join(f" | {d}" for d in diff) + " |")
            peaks = [measured[a]["measured"][-1]["peak_gib"] for a in names]
            if all(p is not None for p in peaks):
                lines.append("| peak memory (GiB) | " + " | ".join(f"{p:.1f}" for p in peaks) +
                             (f" | {peaks[names.index('vipo')] - peaks[names.index('grpo')]:+.1f}"
                              if {"grpo", "vipo"} <= set(names) else "") + " |")
            if "overhead_pct" in result:
                lines += ["", f"ViPO's iteration against GRPO's: "
                              f"{result['overhead_pct']:+.1f}% time"
                          + (f", {result['memory_overhead_pct']:+.1f}% peak memory"
                             if result.get("memory_overhead_pct") is not None else "")]
            for a in names:
                r = measured[a]
                lines.append(f"- {a}: transformer {_count(r['transformer_parameters'])} "
                             f"parameters ({_count(r['trained_parameters'])} trained), "
                             f"{r['precision']}, old log-probs {r['old_log_probs']}, first-step "
                             f"max |log ratio| {r['measured'][-1]['onpolicy_max_abs_log_ratio']}")
        for a, r in algos.items():
            if "error" in r:
                lines.append(f"- {a}: FAILED: {r['error']}")
        if result.get("probe"):
            p = result["probe"]
            lines += ["", f"On-policy gap ({p['precision']}, {p['ratio_level']} ratios, "
                          f"{p['positions']} positions; rollout batch {p['rollout_batch']}, "
                          f"training batch {p['train_batch']}): |log p_rollout - "
                          f"log p_recomputed| max {p['gap_max']:.3g}, median "
                          f"{p['gap_median']:.3g}, p99 {p['gap_p99']:.3g}; beyond eps = "
                          f"{p['clip_range']:g}: {100 * p['frac_over_eps']:.2f}%, beyond eps/10: "
                          f"{100 * p['frac_over_eps_10']:.2f}%; the training layout against "
                          f"itself: max {p['repeat_max']:.3g}"]
        lines.append("")
    return "\n".join(lines)


def run(presets, size: str, algorithms, warmup: int, iterations: int, overrides: list,
        probe: bool, write=None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"size": size, "device": torch.cuda.get_device_name() if device == "cuda"
              else "cpu", "warmup": warmup, "iterations": iterations, "probe": probe,
              "presets": {}}
    with tempfile.TemporaryDirectory(prefix="vipo-profile-") as root:
        for preset in presets:
            result = report["presets"][preset] = {"settings": SETTINGS[(preset, size)],
                                                  "algorithms": {}}
            try:
                backbone = backbone_folder(size, Path(root))
                cfgs = {a: make_config(preset, size, a, backbone, overrides) for a in algorithms}
                arch = next(iter(cfgs.values())).model.arch
                text = ARCHS[arch]["text"] if size == "real" else "the tiny transformer's width"
                result["standins"] = STANDINS.format(text=text, reward=REWARD_STANDIN[size])
                if probe:
                    result["probe"] = onpolicy_gap(cfgs.get("vipo") or next(iter(cfgs.values())),
                                                   size)
                    _emit(report, write)
                    continue
                for algorithm, cfg in cfgs.items():
                    try:
                        result["algorithms"][algorithm] = profile_algorithm(cfg, size, warmup,
                                                                            iterations)
                    except Exception as err:  # noqa: BLE001 - recorded; the next one runs
                        result["algorithms"][algorithm] = {"error": _one_line(err)}
                        del err
                        _release()  # what the failed Trainer held, before the next one
                    _emit(report, write)
                _overheads(result)
            except Exception as err:  # noqa: BLE001 - recorded; the next preset runs
                result["error"] = _one_line(err)
            _emit(report, write)
    return report


def _overheads(result: dict) -> None:
    algos = result["algorithms"]
    if not all(algos.get(a, {}).get("measured") for a in ("grpo", "vipo")):
        return
    grpo, vipo = algos["grpo"]["measured"], algos["vipo"]["measured"]
    result["overhead_pct"] = 100 * (_mean(vipo, "total") / _mean(grpo, "total") - 1)
    if grpo[-1]["peak_gib"] and vipo[-1]["peak_gib"]:
        result["memory_overhead_pct"] = 100 * (vipo[-1]["peak_gib"] / grpo[-1]["peak_gib"] - 1)


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _one_line(err: BaseException) -> str:
    import traceback

    traceback.print_exception(err)
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _emit(report: dict, write) -> None:
    if write:
        write(report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="+", help=f"{', '.join(PRESETS)}, then key=value "
                                                   f"overrides")
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--algorithms", default="grpo,vipo")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--probe", action="store_true", help="the on-policy gap instead")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' output")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets if "=" not in p]
    overrides = [p for p in args.presets if "=" in p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {', '.join(PRESETS)}")
    algorithms = [a for a in args.algorithms.split(",") if a]
    if not algorithms or any(a not in ALGORITHMS for a in algorithms):
        parser.error(f"--algorithms: from {', '.join(ALGORITHMS)}")
    if args.size == "real" and not torch.cuda.is_available():
        parser.error("--size real builds FLUX.1-dev (12B) and Wan 2.1 1.3B: it needs a CUDA "
                     "device; use --size tiny on a CPU")

    if not args.verbose:
        from .train import quiet_libraries

        quiet_libraries()

    def write(report):
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
        if args.md:
            args.md.write_text(markdown(report))

    report = run(presets, args.size, algorithms, args.warmup, args.iterations, overrides,
                 args.probe, write)
    print(markdown(report))
    failed = [p for p, r in report["presets"].items()
              if "error" in r or any("error" in a for a in r["algorithms"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
