"""Qwen-Image, FLUX.2 [klein], Z-Image and Wan 2.2 against their own diffusers pipelines, at
tiny size in fp32 on the CPU (random weights, vipo/tiny.py), then a few training iterations
of each through ``python -m vipo.train``'s Trainer.

Parity: from the same initial latents, the deterministic ODE rollout (evaluation.sample_ode,
the Euler step without SDE noise) on ``sigma_schedule=pipeline`` reproduces the pipeline's
``output_type="latent"`` result; so do the sigma levels, the timestep the transformer is
given at every step (and, for Wan 2.2, which expert), and the first guided velocity (the
``model_output`` the pipeline hands its scheduler). A non-square size and a batch of two
prompts of different lengths, with CFG on.
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
# The pipelines' own guidance arguments (model.guidance_scale has each pipeline's meaning).
GUIDANCE = {"qwenimage": 2.5, "flux2": 2.5, "zimage": 1.5, "wan22": 3.0}
# Long enough for the chat templates of the character-level tiny tokenizers plus the prompt.
SEQUENCE = {"qwenimage": 64, "flux2": 96, "zimage": 96, "wan22": 32}
# Pure fp32 rounding: the same operations in a different batch make-up (the pipelines batch
# both CFG branches or pad to the batch's longest prompt; measured <= 2e-6).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny-world cache (VIPO_TINY_CACHE) holding the four pipelines, so that path=tiny
    finds them."""
    root = tmp_path_factory.mktemp("tiny_cache")
    for arch in ARCHS:
        tiny.ensure_world(arch, root)
    return root


@pytest.fixture(scope="module")
def worlds(cache):
    return {arch: cache / arch for arch in ARCHS}


def model_cfg(arch, worlds, **overrides) -> Config:
    cfg = Config.from_name("tiny")
    cfg.update({"arch": arch, "path": str(worlds[arch]), "height": HEIGHT, "width": WIDTH,
                "max_sequence_length": SEQUENCE[arch], "guidance_scale": GUIDANCE[arch],
                "negative_prompt": "blurry", "num_steps": STEPS, "sigma_schedule": "pipeline",
                "timestep_input": "float", **overrides})
    if arch == "wan22":
        cfg.update({"num_frames": 5, "guidance_scale_2": 1.5})
    return cfg.validate()


def pipeline_layout(arch, adapter, x, kind):
    """A loss-layout tensor as the pipeline holds it: ``input`` its latents argument,
    ``state`` its latents and model outputs while stepping, ``final`` its
    output_type='latent' result."""
    from diffusers import Flux2KleinPipeline, QwenImagePipeline

    if arch == "qwenimage":
        return QwenImagePipeline._pack_latents(x, x.shape[0], *x.shape[1:])
    if arch == "flux2":
        if kind == "final":
            return adapter.vae_latents(x)
        patches = Flux2KleinPipeline._patchify_latents(x)
        return patches if kind == "input" else Flux2KleinPipeline._pack_latents(patches)
    return x


def pipeline_call(arch, adapter, noise):
    """The pipeline's own __call__ from ``noise`` (loss layout); records the sigmas, the
    timestep given to each transformer call (with the expert's name) and each model_output
    handed to the scheduler."""
    pipe, cfg = adapter.pipe, adapter.cfg
    seen = {"calls": [], "outputs": []}
    experts = {"transformer": pipe.transformer}
    if arch == "wan22":
        experts["transformer_2"] = pipe.transformer_2
    hooks = [module.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: seen["calls"].append(
            (name, (kwargs.get("timestep") if "timestep" in kwargs else args[1]).clone())),
        with_kwargs=True) for name, module in experts.items()]
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen["outputs"].append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    latents = pipeline_layout(arch, adapter, noise.clone(), "input")
    kwargs = dict(prompt=list(PROMPTS), height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                  latents=latents, output_type="latent", max_sequence_length=SEQUENCE[arch])
    negative = [cfg.negative_prompt] * len(PROMPTS)
    if arch == "qwenimage":
        kwargs.update(true_cfg_scale=cfg.guidance_scale, negative_prompt=negative)
    elif arch == "flux2":  # klein's negative is always the empty prompt
        kwargs.update(guidance_scale=cfg.guidance_scale)
    elif arch == "zimage":
        kwargs.update(guidance_scale=cfg.guidance_scale, negative_prompt=negative)
    else:
        kwargs.update(guidance_scale=cfg.guidance_scale, guidance_scale_2=cfg.guidance_scale_2,
                      negative_prompt=negative, num_frames=cfg.num_frames)
    try:
        out = pipe(**kwargs)
    finally:
        del pipe.scheduler.step
        for hook in hooks:
            hook.remove()
    seen["latents"] = out.frames if arch == "wan22" else out.images
    seen["sigmas"] = pipe.scheduler.sigmas.clone()
    return seen


def per_step(calls) -> list:
    """(expert, first timestep value) of each step: consecutive calls of one step collapse."""
    steps = []
    for name, t in calls:
        key = (name, float(t.flatten()[0]))
        if not steps or steps[-1] != key:
            steps.append(key)
    return steps


@pytest.mark.parametrize("arch", ARCHS)
def test_ode_rollout_reproduces_the_pipeline(arch, worlds, monkeypatch, capsys):
    from vipo.adapters import get_adapter
    from vipo.evaluation import sample_ode
    from vipo.rollout import Schedule

    # FLUX.2 [klein]'s pipeline always takes the empty prompt as its negative.
    cfg = model_cfg(arch, worlds, negative_prompt="" if arch == "flux2" else "blurry")
    adapter = get_adapter(arch)(cfg.model, torch.device("cpu"), torch.float32)
    assert adapter.use_cfg
    schedule = Schedule.build(cfg.sample, torch.device("cpu"), adapter)
    noise = torch.randn(len(PROMPTS), *adapter.latent_shape(),
                        generator=torch.Generator().manual_seed(1))
    expected = pipeline_call(arch, adapter, noise)

    # The sigma levels and, step by step, the timestep each transformer call gets.
    assert torch.equal(schedule.sigmas, expected["sigmas"])
    ours = {"calls": []}
    experts = {"transformer": adapter.pipe.transformer}
    if arch == "wan22":
        experts["transformer_2"] = adapter.pipe.transformer_2
    hooks = [module.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: ours["calls"].append(
            (name, (kwargs.get("timestep") if "timestep" in kwargs else args[1]).clone())),
        with_kwargs=True) for name, module in experts.items()]
    cond = adapter.encode_prompts(list(PROMPTS))
    monkeypatch.setattr(adapter, "decode", lambda z: z)  # sample_ode then returns the latents
    try:
        final = sample_ode(adapter, adapter.transformer, schedule, noise, cond, batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert per_step(ours["calls"]) == per_step(expected["calls"])
    assert len(per_step(expected["calls"])) == STEPS
    if arch == "wan22":  # both experts take part
        assert {name for name, _ in per_step(expected["calls"])} == set(experts)

    # The first guided velocity, as the pipeline hands it to its scheduler.
    index = torch.zeros(len(PROMPTS), dtype=torch.long)
    with torch.no_grad():
        v0 = adapter.velocity(adapter.transformer, noise, schedule.timesteps[index], cond)
    velocity_error = rel_err(pipeline_layout(arch, adapter, v0, "state"), expected["outputs"][0])
    latent_error = rel_err(pipeline_layout(arch, adapter, final, "final"),
                           expected["latents"])
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
