"""Qwen-Image, FLUX.2 [klein], Z-Image and Wan 2.2 against their own diffusers pipelines, at
tiny size in fp32 on the CPU (random weights, vipo/tiny.py), then a few training iterations
of each through ``python -m vipo.train``'s Trainer.

Parity: from the same initial latents, the deterministic ODE rollout (evaluation.sample_ode,
the Euler step without SDE noise) reproduces the pipeline's ``output_type="latent"`` result;
so do the sigma levels, the timestep (and guidance) input the transformer is given at every
step (for Wan 2.2, and which expert), and the first guided velocity (the ``model_output`` the
pipeline hands its scheduler). A non-square size and a batch of two prompts of different
lengths, with guidance on. The new models run ``sigma_schedule=pipeline``; SD3, FLUX.1 and
Wan 2.1 (for the README's table) the presets' schedule kinds, which equal their tiny
pipelines' levels.
"""

from __future__ import annotations

import re

import pytest
import torch

from vipo import tiny
from vipo.config import Config

from .utils import rel_err

ARCHS = ["qwenimage", "flux2", "zimage", "wan22"]
PROMPTS = ["a red apple", "a small grey cat asleep on a wide green mat"]
HEIGHT, WIDTH, STEPS = 48, 80, 4
# Per model: the pipeline's own guidance argument (model.guidance_scale has each pipeline's
# meaning), a text length that holds the tiny tokenizers' chat template and the prompt, and
# the schedule (the old three: the kind that equals their tiny pipeline's static shift).
PARITY = {
    "qwenimage": dict(guidance_scale=2.5, max_sequence_length=64),
    "flux2": dict(guidance_scale=2.5, max_sequence_length=96, negative_prompt=""),
    "zimage": dict(guidance_scale=1.5, max_sequence_length=96),
    "wan22": dict(guidance_scale=3.0, guidance_scale_2=1.5, max_sequence_length=32,
                  num_frames=5),
    "sd3": dict(guidance_scale=2.5, max_sequence_length=16, sigma_schedule="diffusers",
                shift=3.0),
    "flux": dict(guidance_scale=3.5, max_sequence_length=16, sigma_schedule="dance",
                 shift=3.0),
    "wan": dict(guidance_scale=3.0, max_sequence_length=16, sigma_schedule="diffusers",
                shift=8.0, num_frames=5),
}
# fp32 rounding only: the same operations, in another batch make-up where the pipeline
# batches both CFG branches or pads to the batch's longest prompt, and for the old three the
# float64 schedule (measured <= 1e-6).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny-world cache (VIPO_TINY_CACHE) holding the four pipelines, so that path=tiny
    finds them."""
    root = tmp_path_factory.mktemp("tiny_cache")
    for arch in ARCHS:
        tiny.ensure_world(arch, root)
    return root


def model_cfg(arch, folder) -> Config:
    cfg = Config.from_name("tiny")
    cfg.update({"arch": arch, "path": str(folder), "height": HEIGHT, "width": WIDTH,
                "negative_prompt": "blurry", "num_steps": STEPS, "sigma_schedule": "pipeline",
                "timestep_input": "float", **PARITY[arch]})
    return cfg.validate()


def pipeline_layout(arch, adapter, x, kind):
    """A loss-layout tensor as the pipeline holds it: ``input`` its latents argument,
    ``state`` its latents and model outputs while stepping, ``final`` its
    output_type='latent' result."""
    from diffusers import Flux2KleinPipeline, FluxPipeline, QwenImagePipeline

    if arch in ("qwenimage", "flux"):
        return QwenImagePipeline._pack_latents(x, x.shape[0], *x.shape[1:])
    assert QwenImagePipeline._pack_latents.__code__.co_code == \
        FluxPipeline._pack_latents.__code__.co_code  # the same packing
    if arch == "flux2":
        if kind == "final":
            return adapter.vae_latents(x)
        patches = Flux2KleinPipeline._patchify_latents(x)
        return patches if kind == "input" else Flux2KleinPipeline._pack_latents(patches)
    return x


def record_inputs(adapter, calls: list) -> list:
    """Forward pre-hooks on the transformer(s) appending (expert, timestep, guidance) of
    every call to ``calls``; returns the hook handles."""
    pipe = adapter.pipe
    experts = {"transformer": pipe.transformer}
    if getattr(pipe, "transformer_2", None) is not None:
        experts["transformer_2"] = pipe.transformer_2

    def hook(name):
        def record(module, args, kwargs):
            t = kwargs["timestep"] if "timestep" in kwargs else args[1]  # Z-Image: positional
            g = kwargs.get("guidance")
            calls.append((name, float(t.flatten()[0]), None if g is None else float(g[0])))
        return record

    return [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in experts.items()]


def per_step(calls) -> list:
    """The inputs of each step: consecutive calls with equal inputs (CFG branches) collapse."""
    return [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]


def pipeline_call(arch, adapter, noise):
    """The pipeline's own __call__ from ``noise`` (loss layout); records the sigmas, the
    transformer inputs and each model_output handed to the scheduler."""
    pipe, cfg = adapter.pipe, adapter.cfg
    seen = {"calls": [], "outputs": []}
    hooks = record_inputs(adapter, seen["calls"])
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen["outputs"].append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    kwargs = dict(prompt=list(PROMPTS), height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                  latents=pipeline_layout(arch, adapter, noise.clone(), "input"),
                  output_type="latent", max_sequence_length=cfg.max_sequence_length,
                  guidance_scale=cfg.guidance_scale)
    if arch != "flux2" and arch != "flux":  # klein's negative is always the empty prompt
        kwargs["negative_prompt"] = [cfg.negative_prompt] * len(PROMPTS)
    if arch == "qwenimage":
        kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")
    if arch in ("wan", "wan22"):
        kwargs["num_frames"] = cfg.num_frames
    if arch == "wan22":
        kwargs["guidance_scale_2"] = cfg.guidance_scale_2
    try:
        out = pipe(**kwargs)
    finally:
        del pipe.scheduler.step
        for hook in hooks:
            hook.remove()
    seen["latents"] = out.frames if arch in ("wan", "wan22") else out.images
    seen["sigmas"] = pipe.scheduler.sigmas.clone()
    return seen


@pytest.mark.parametrize("arch", ARCHS + ["sd3", "flux", "wan"])
def test_ode_rollout_reproduces_the_pipeline(arch, cache, monkeypatch, capsys):
    from vipo.adapters import get_adapter
    from vipo.evaluation import sample_ode
    from vipo.rollout import Schedule

    cfg = model_cfg(arch, tiny.ensure_world(arch, cache))
    adapter = get_adapter(arch)(cfg.model, torch.device("cpu"), torch.float32)
    assert adapter.use_cfg or arch == "flux"  # FLUX.1: the distilled guidance input instead
    schedule = Schedule.build(cfg.sample, torch.device("cpu"), adapter)
    noise = torch.randn(len(PROMPTS), *adapter.latent_shape(),
                        generator=torch.Generator().manual_seed(1))
    expected = pipeline_call(arch, adapter, noise)

    # The sigma levels (the old three: computed in float64, not by the scheduler) and, step
    # by step, what each transformer call is given.
    if arch in ARCHS:
        assert torch.equal(schedule.sigmas, expected["sigmas"])
    else:
        torch.testing.assert_close(schedule.sigmas, expected["sigmas"], rtol=0, atol=1e-6)
    calls = []
    hooks = record_inputs(adapter, calls)
    cond = adapter.encode_prompts(list(PROMPTS))
    monkeypatch.setattr(adapter, "decode", lambda z: z)  # sample_ode then returns the latents
    try:
        final = sample_ode(adapter, adapter.transformer, schedule, noise, cond, batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    ours, theirs = per_step(calls), per_step(expected["calls"])
    assert len(theirs) == STEPS
    if arch in ARCHS:
        assert ours == theirs
    else:
        assert [(c[0], c[2]) for c in ours] == [(c[0], c[2]) for c in theirs]
        torch.testing.assert_close(torch.tensor([c[1] for c in ours], dtype=torch.float64),
                                   torch.tensor([c[1] for c in theirs], dtype=torch.float64),
                                   rtol=1e-6, atol=0)
    if arch == "wan22":  # both experts take part
        assert {name for name, *_ in theirs} == {"transformer", "transformer_2"}

    # The first guided velocity, as the pipeline hands it to its scheduler.
    index = torch.zeros(len(PROMPTS), dtype=torch.long)
    with torch.no_grad():
        v0 = adapter.velocity(adapter.transformer, noise, schedule.timesteps[index], cond)
    velocity_error = rel_err(pipeline_layout(arch, adapter, v0, "state"), expected["outputs"][0])
    latent_error = rel_err(pipeline_layout(arch, adapter, final, "final"), expected["latents"])
    with capsys.disabled():
        print(f"\n{arch}: first guided velocity rel. error {velocity_error:.1e}, final latents "
              f"rel. error {latent_error:.1e}")
    assert velocity_error < TOLERANCE
    assert latent_error < TOLERANCE


# ---- training: `python -m vipo.train tiny arch=X` cut to 2 iterations, PSM included ---------
def train_cfg(arch, tmp_path, **overrides) -> Config:
    cfg = Config.from_name("tiny")
    cfg.update({"arch": arch, "path": "tiny", "height": 32, "width": 48, "num_steps": 3,
                "group_size": 2, "prompts_per_iter": 2, "sample_batch_size": 4,
                "train_batch_size": 2, "grad_accum": 2, "iterations": 2,
                "timestep_fraction": 1.0, "lr": 1e-3, "image_every": 1, "eval_every": -1,
                "output_dir": str(tmp_path / "runs"), "run_name": "test", "progress": False,
                "backbone": "tiny", **overrides})
    if arch == "wan22":
        cfg.update({"num_frames": 5, "max_sequence_length": 16, "guidance_scale": 2.0})
    return cfg


def lora_weights(model) -> dict:
    """LoRA parameters by name, without peft's adapter name (default, default_0, ...)."""
    return {re.sub(r"\.default\w*\.", ".", n): p.detach()
            for n, p in model.named_parameters() if "lora" in n}


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["qwenimage", "flux2", "zimage"])
def test_trains_and_saves_loadable_weights(arch, lora, cache, tmp_path, monkeypatch):
    """Two ViPO iterations (PSM maps on the latent grid) move the trained weights only; the
    final checkpoint loads into a fresh pipeline with plain diffusers: the transformer
    folder with from_pretrained, the LoRA with load_lora_weights (peft underneath)."""
    import diffusers

    from .test_train import check_run, run_two_steps

    monkeypatch.setenv("VIPO_TINY_CACHE", str(cache))
    extra = {"lora_rank": 4} if lora else {}
    trainer, result, frozen, trainable, weights = run_two_steps(train_cfg(arch, tmp_path,
                                                                          **extra))
    rows = check_run(trainer, result, frozen, trainable, weights)
    assert 0 < rows[0]["map_mean"] <= 1
    folder = result["run_dir"] / "checkpoints" / "final"
    trained = trainer.adapter.transformer
    pipe = getattr(diffusers, trainer.adapter.pipeline_class).from_pretrained(cache / arch)
    if lora:
        assert trainable and all("lora" in n for n in trainable)
        pipe.load_lora_weights(folder)
        ours, loaded = lora_weights(trained), lora_weights(pipe.transformer)
        assert ours and ours.keys() == loaded.keys()
        assert all(torch.equal(ours[n], loaded[n]) for n in ours)
    else:
        loaded = type(pipe.transformer).from_pretrained(folder / "transformer").state_dict()
        ours = trained.state_dict()
        assert loaded.keys() == ours.keys()
        assert all(torch.equal(loaded[n], ours[n]) for n in ours)


def test_presets_and_schedule_checks():
    from vipo.config import NOT_RUN_AT_REAL_SIZE, ConfigError

    for name in NOT_RUN_AT_REAL_SIZE:
        cfg = Config.from_name(name).validate()
        assert (cfg.sample.sigma_schedule, cfg.sample.timestep_input) == ("pipeline", "float")
        assert cfg.model.arch in ARCHS
    assert Config.from_name("wan22_vipo").model.guidance_scale_2 == 3.0
    for overrides, field in ((["arch=sd3", "sigma_schedule=pipeline"], "sample.sigma_schedule"),
                             (["arch=wan22", "num_frames=4"], "model.num_frames")):
        cfg = Config.from_name("tiny")
        cfg.apply_overrides(overrides)
        with pytest.raises(ConfigError, match=field):
            cfg.validate()


# ---- Wan 2.2: both experts in training -----------------------------------------------------
def expert_changes(before: dict, pair) -> set:
    """The experts (high, low) with a changed weight."""
    after = pair.state_dict()
    return {k.split(".")[0] for k, v in before.items() if not torch.equal(v, after[k])}


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_wan22_trains_both_experts_and_saves_each(lora, cache, tmp_path, monkeypatch):
    """With 3 steps the first trainable step belongs to the high-noise expert and the second
    to the low-noise one: both move, and each is saved as its pipeline component, which plain
    diffusers loads (transformer/ and transformer_2/, or the two LoRA files)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from .test_train import check_run, run_two_steps

    monkeypatch.setenv("VIPO_TINY_CACHE", str(cache))
    cfg = train_cfg("wan22", tmp_path, **({"lora_rank": 4} if lora else {}))
    trainer, result, frozen, trainable, weights = run_two_steps(cfg)
    del frozen["transformer_2"]  # trained here, as part of the pair
    check_run(trainer, result, frozen, trainable, weights)
    pair = trainer.adapter.transformer
    assert [len(p) for p in trainer.step_pools] == [1, 1]  # steps 0 (high) and 1 (low)
    assert expert_changes(weights, pair) == {"high", "low"}
    folder = result["run_dir"] / "checkpoints" / "final"
    if lora:
        pipe = WanPipeline.from_pretrained(cache / "wan22")
        pipe.load_lora_weights(folder)
        pipe.load_lora_weights(folder, load_into_transformer_2=True,
                               weight_name="pytorch_lora_weights_transformer_2.safetensors")
        for ours, theirs in ((pair.high, pipe.transformer), (pair.low, pipe.transformer_2)):
            mine, loaded = lora_weights(ours), lora_weights(theirs)
            assert mine and mine.keys() == loaded.keys()
            assert all(torch.equal(mine[n], loaded[n]) for n in mine)
    else:
        for ours, component in ((pair.high, "transformer"), (pair.low, "transformer_2")):
            loaded = WanTransformer3DModel.from_pretrained(folder / component).state_dict()
            assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.items())


@pytest.mark.usefixtures("fresh_accelerate")
def test_wan22_trains_only_the_named_expert(cache, tmp_path, monkeypatch, capsys):
    from vipo.train import main

    from .test_train import run_two_steps

    monkeypatch.setenv("VIPO_TINY_CACHE", str(cache))
    cfg = train_cfg("wan22", tmp_path, experts=["low"], timestep_fraction=0.5)
    trainer, result, _, trainable, weights = run_two_steps(cfg)
    assert trainable and all(n.startswith("low.") for n in trainable)
    assert expert_changes(weights, trainer.adapter.transformer) == {"low"}
    folder = result["run_dir"] / "checkpoints" / "final"
    assert (folder / "transformer_2").is_dir() and not (folder / "transformer").exists()
    # The high-noise expert owns 1 of the 2 trainable steps; training 2 of them is refused.
    from .run_helpers import reset_accelerate

    reset_accelerate()
    code = main(["tiny", "arch=wan22", "path=tiny", "num_steps=3", "experts=high",
                 "timestep_fraction=1.0", "num_frames=5", f"output_dir={tmp_path / 'bad'}",
                 "progress=false", "eval_every=-1"])
    assert code == 2 and "model.experts" in capsys.readouterr().err


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("variant", [["ema_decay=0.9"], ["lora_rank=2"]], ids=["full", "lora"])
def test_wan22_resume_is_bit_identical(variant, cache, tmp_path, monkeypatch):
    """Stopped after iteration 2 and resumed: both experts' weights, the EMA and the optimiser
    steps end as in the uninterrupted run (4 steps: 2 trainable steps per expert, 2 of the 3
    trained per sample, one of each)."""
    import shutil

    from safetensors.torch import load_file

    from vipo.checkpointing import read_state

    from .run_helpers import run

    monkeypatch.setenv("VIPO_TINY_CACHE", str(cache))
    args = ["arch=wan22", "path=tiny", "height=32", "width=48", "num_frames=5",
            "max_sequence_length=16", "guidance_scale=2.0", "num_steps=4",
            "timestep_fraction=0.67", "group_size=2", "prompts_per_iter=2",
            "sample_batch_size=4", "train_batch_size=2", "grad_accum=2", "iterations=4",
            "checkpoint_every=2", "lr_warmup_steps=3", "lr=1e-3", "backbone=tiny",
            "eval_every=-1", "image_every=0", "tensorboard=false", "progress=false",
            f"output_dir={tmp_path}", "run_name=whole", *variant]
    assert run("tiny", *args) == 0
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "final")
    assert run(f"resume={cut}", f"output_dir={tmp_path}") == 0
    final = [d / "checkpoints" / "final" for d in (tmp_path / "whole", cut)]
    files = ["pytorch_lora_weights.safetensors",
             "pytorch_lora_weights_transformer_2.safetensors"] if "lora" in variant[0] else \
        [f"{c}/diffusion_pytorch_model.safetensors" for c in ("transformer", "transformer_2")] + \
        ["ema.safetensors"]
    for name in files:
        whole, resumed = (load_file(f / name) for f in final)
        assert whole.keys() == resumed.keys() and whole
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name
    assert read_state(final[0])["optimizer_steps"] == read_state(final[1])["optimizer_steps"]


def test_expert_step_draws():
    from vipo.experts import draw_steps, quotas

    assert quotas(4, [2, 5]) == [1, 3] and quotas(2, [1, 1]) == [1, 1]
    assert quotas(3, [1, 9]) == [0, 3] and quotas(5, [1, 4]) == [1, 4]
    pools = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7, 8])]
    steps = draw_steps(pools, 50, 4, False, torch.Generator().manual_seed(0))
    # Every sample: 1 high-noise step, then 3 low-noise ones, all distinct.
    assert bool((steps[:, :1] <= 2).all()) and bool((steps[:, 1:] >= 3).all())
    assert all(len(set(row.tolist())) == 4 for row in steps)
    assert len(set(steps[:, 0].tolist())) == 3  # random within the pool
    assert draw_steps(pools, 2, 4, True, None).tolist() == [[0, 1, 2, 3]] * 2
