"""Trainer tests on the CPU: tiny random diffusers/transformers components are built in code,
written with save_pretrained to a temporary folder and loaded back through the adapters'
real from_pretrained path; each run trains for 2 iterations."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vipo import tiny
from vipo.config import Config
from vipo.distributed import reset_accelerate_state
from vipo.logging_utils import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The three tiny pipelines, a tiny DINOv2 backbone and a tiny CLIP, saved once."""
    root = tmp_path_factory.mktemp("worlds")
    return {"sd3": tiny.build_sd3(root / "sd3"), "flux": tiny.build_flux(root / "flux"),
            "wan": tiny.build_wan(root / "wan"), "dinov2": tiny.build_dinov2(root / "dinov2"),
            "clip": tiny.build_clip(root / "clip")}


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def make_cfg(arch, worlds, tmp_path, **overrides) -> Config:
    cfg = Config.from_name("tiny")
    base = {"arch": arch, "path": str(worlds[arch]), "height": 32, "width": 32,
            "max_sequence_length": 16, "num_steps": 3, "group_size": 2, "prompts_per_iter": 2,
            "sample_batch_size": 4, "train_batch_size": 2, "grad_accum": 2, "iterations": 2,
            "timestep_fraction": 1.0, "lr": 1e-3, "algorithm": "grpo", "image_every": 1,
            "output_dir": str(tmp_path / "runs"), "run_name": "test", "progress": False,
            "backbone": str(worlds["dinov2"])}
    if arch == "wan":
        base.update(num_frames=5, guidance_scale=2.0)
    cfg.update({**base, **overrides})
    return cfg


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def run_two_steps(cfg):
    from vipo.run_loop import RunLoop

    loop = RunLoop(cfg)
    trainer = loop.trainer
    pipe = trainer.adapter.pipe
    frozen = {name: snapshot(m) for name, m in pipe.components.items()
              if isinstance(m, torch.nn.Module) and name != "transformer"}
    trainable = {n for n, p in trainer.adapter.transformer.named_parameters() if p.requires_grad}
    weights = snapshot(trainer.adapter.transformer)
    result = loop.run()
    return trainer, result, frozen, trainable, weights


def check_run(trainer, result, frozen, trainable, weights):
    rows = read_metrics(result["run_dir"] / "metrics.csv")
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["reward_mean"])
        for phase in ("sampling", "reward", "psm", "training"):
            assert row[f"time_{phase}"] >= 0
        assert row["time_sampling"] > 0 and row["time_training"] > 0
        assert row["optimizer_steps"] >= 1
    moved = changed(weights, trainer.adapter.transformer)
    assert moved, "no trained weight changed"
    assert moved <= trainable, f"frozen transformer weights changed: {moved - trainable}"
    for name, before in frozen.items():
        assert not changed(before, trainer.adapter.pipe.components[name]), name
    run_dir = result["run_dir"]
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "samples" / "iter000000.png").is_file()
    assert (run_dir / "curves.png").is_file()
    return rows


# ---- schedule -------------------------------------------------------------------------------
def test_dance_schedule_matches_formula():
    from vipo.rollout import sigma_schedule

    sig = sigma_schedule(8, 3.0, "dance").double()
    s = torch.linspace(1, 0, 9, dtype=torch.float64)
    torch.testing.assert_close(sig, 3 * s / (1 + 2 * s), atol=1e-7, rtol=0)


def test_diffusers_schedule_matches_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vipo.rollout import sigma_schedule

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    ours = sigma_schedule(10, 3.0, "diffusers")
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)
    assert abs(float(ours[-2]) - 0.0089) < 1e-4  # docs/method.md 1's example


def test_int_timestep_input_truncates_but_coefficients_do_not():
    from vipo.config import SampleConfig
    from vipo.rollout import Schedule

    cfg = SampleConfig(num_steps=10, shift=3.0, timestep_input="int")
    sched = Schedule.build(cfg, torch.device("cpu"))
    assert torch.equal(sched.timesteps, torch.trunc(1000 * sched.sigmas[:-1]))
    from vipo_kernels import sde_coefficients

    cs, co, sd = sde_coefficients(sched.sigmas[:-1], sched.sigmas[1:], kind="dance", eta=0.3)
    assert torch.equal(sched.coef_output, co) and torch.equal(sched.std, sd)


# ---- adapters: 2 training iterations each ---------------------------------------------------
def test_sd3_grpo_two_steps(worlds, tmp_path):
    cfg = make_cfg("sd3", worlds, tmp_path, guidance_scale=2.0, negative_prompt="blurry")
    trainer, *rest = run_two_steps(cfg)
    rows = check_run(trainer, *rest)
    assert rows[0]["map_mean"] == 1.0  # grpo: no map
    # The README's one line: plain diffusers loads the trained transformer.
    from diffusers import SD3Transformer2DModel

    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "runs/test/checkpoints/final"
                                                   "/transformer")
    trained = trainer.adapter.transformer.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_flux_grpo_two_steps(worlds, tmp_path):
    cfg = make_cfg("flux", worlds, tmp_path, guidance_scale=3.5, ratio_level="sample")
    trainer, result, *rest = run_two_steps(cfg)
    check_run(trainer, result, *rest)
    assert trainer.adapter.guidance  # the tiny Flux has a guidance embedding
    assert trainer.adapter.latent_shape() == (16, 4, 4)  # unpacked for the loss


def test_wan_video_two_steps_with_cfg(worlds, tmp_path):
    cfg = make_cfg("wan", worlds, tmp_path, reward=["redness", "jpeg_compressibility"],
                   reward_weights=[1.0, 0.5], video_frame_stride=2)
    trainer, result, *rest = run_two_steps(cfg)
    rows = check_run(trainer, result, *rest)
    assert trainer.adapter.use_cfg
    assert trainer.adapter.latent_shape() == (16, 2, 4, 4)
    assert "reward_jpeg_compressibility_mean" in rows[0]


@pytest.mark.parametrize("arch", ["sd3", "flux", "wan"])
def test_vipo_two_steps(arch, worlds, tmp_path):
    cfg = make_cfg(arch, worlds, tmp_path, algorithm="vipo", ratio_level="position")
    rows = check_run(*run_two_steps(cfg))
    assert 0 < rows[0]["map_mean"] <= 1
    assert (tmp_path / "runs/test/samples/maps000000.png").is_file()


def test_lora_kl_ema(worlds, tmp_path):
    cfg = make_cfg("sd3", worlds, tmp_path, lora_rank=4, kl_coef=0.1, ema_decay=0.9,
                   ema_every=1)
    trainer, result, frozen, trainable, weights = run_two_steps(cfg)
    check_run(trainer, result, frozen, trainable, weights)
    assert trainable and all("lora" in n for n in trainable)
    rows = read_metrics(result["run_dir"] / "metrics.csv")
    assert rows[-1]["loss_kl"] > 0  # the policy moved away from the reference
    folder = result["run_dir"] / "checkpoints" / "final"
    from safetensors.torch import load_file

    lora = load_file(folder / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in k and k.startswith("transformer.") for k in lora)
    ema = load_file(folder / "ema.safetensors")
    assert set(ema) == trainable
    # The README's one line: plain diffusers loads the LoRA into a fresh pipeline.
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(worlds["sd3"])
    pipe.load_lora_weights(folder)
    def lora_weights(model):  # without the adapter's name (default, default_0, ...)
        return {re.sub(r"\.default\w*\.", ".", n): p.detach()
                for n, p in model.named_parameters() if "lora" in n}

    trained, loaded = lora_weights(trainer.adapter.transformer), lora_weights(pipe.transformer)
    assert trained and trained.keys() == loaded.keys()
    assert all(torch.equal(trained[n], loaded[n]) for n in trained)


# ---- on-policy check (docs/method.md 7) ----------------------------------------------------------
@pytest.mark.parametrize("ratio_level", ["position", "sample"])
def test_recompute_reproduces_rollout_log_probs(worlds, tmp_path, ratio_level):
    """Before any optimiser step, recomputing every stored step in the training layout
    (micro-batch of 1..2 samples with mixed timesteps) reproduces the rollout's log-probs."""
    from vipo_kernels import log_prob

    from vipo.trainer import Trainer

    cfg = make_cfg("sd3", worlds, tmp_path, ratio_level=ratio_level, num_steps=4,
                   guidance_scale=2.0)
    trainer = Trainer(cfg)
    roll = trainer.sample(0)
    worst = 0.0
    with torch.no_grad():
        for i in range(roll.num_samples):
            for k in range(cfg.sample.num_steps - 1):
                idx = torch.tensor([i, (i + 1) % roll.num_samples])
                ks = torch.tensor([k, (k + 1) % (cfg.sample.num_steps - 1)])
                z = roll.latents[idx, ks]
                v = trainer.adapter.velocity(trainer.model, z, trainer.schedule.timesteps[ks],
                                             trainer.adapter.select(roll.cond, idx))
                new = log_prob(v, z, roll.latents[idx, ks + 1], ratio_level=ratio_level,
                               **trainer.schedule.step(ks))
                worst = max(worst, float((new - roll.log_probs[idx, ks]).abs().max()))
    # Rounding only (fp32, batch-size-dependent GEMMs; measured 3e-6 at the position level,
    # 3e-8 at the sample level): below the default clip range, so no ratio clips.
    assert worst < 1e-4, worst


def test_onpolicy_metric_is_logged(worlds, tmp_path):
    cfg = make_cfg("sd3", worlds, tmp_path)
    _, result, *_ = run_two_steps(cfg)
    rows = read_metrics(result["run_dir"] / "metrics.csv")
    assert all(r["onpolicy_max_abs_log_ratio"] < 1e-4 for r in rows)


def test_sample_level_all_ones_map_equals_grpo(worlds, tmp_path):
    """ratio_level=sample with an all-ones allocation map gives exactly GRPO's update."""
    from vipo.trainer import Trainer

    results = []
    for use_map in (False, True):
        cfg = make_cfg("sd3", worlds, tmp_path, ratio_level="sample", iterations=1,
                       run_name=f"map{use_map}")
        trainer = Trainer(cfg)
        roll = trainer.sample(0)
        adv, _, _, _ = trainer.advantages(roll, trainer.score(roll))
        ones = torch.ones(roll.num_samples, *trainer.adapter.latent_shape()[1:])
        stats = trainer.optimize(roll, adv, ones if use_map else None)
        results.append((snapshot(trainer.adapter.transformer), stats))
        reset_accelerate_state()
    (w0, s0), (w1, s1) = results
    assert s0["loss"] != 0 and s0["grad_norm"] > 0
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    assert s0["loss"] == s1["loss"]


# ---- command line ---------------------------------------------------------------------------
def test_help_lists_every_field(capsys):
    from vipo.config import all_fields
    from vipo.train import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in all_fields():
        assert f"  {name} (default" in out, name
    assert "flux_vipo" in out and "usage: python -m vipo.train" in out


def test_module_entry_point_help():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "vipo.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "timestep_fraction" in proc.stdout
    # --help and config checks must not import the model libraries (8-9 s each).
    probe = ("import sys, vipo.train as t; t.parse_args(['algorithm=grpo']); "
             "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("args, field", [
    (["lr=-1"], "train.lr"),
    (["grad_accum=3"], "train.grad_accum"),
    (["sde=euler"], "sample.sde"),
    (["reward=nonexistent_reward"], "reward.reward"),
    (["arch=flux", "num_frames=5"], "model.num_frames"),
    (["no_such_field=1"], "no_such_field"),
    (["group_size=two"], "sample.group_size"),
])
def test_bad_config_fails_before_loading(args, field, tmp_path, capsys):
    from vipo.train import main

    code = main(args + ["algorithm=grpo", f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "config error" in err and field in err, err
    assert not any(tmp_path.iterdir())  # nothing created, nothing loaded


# ---- further trainer paths ------------------------------------------------------------------
def test_nonfinite_reward_drops_the_group(worlds, tmp_path, monkeypatch):
    """A reward that is NaN for the first sample: drop_group drops its group, trains on the
    rest and counts it; the default (raise) stops naming the sample."""
    (tmp_path / "nan_reward.py").write_text(
        "import torch\n"
        "def factory(cfg, device):\n"
        "    def fn(images, prompts):\n"
        "        r = images.mean(dim=(1, 2, 3)).clone()\n"
        "        r[0] = float('nan')\n"
        "        return r\n"
        "    return fn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_cfg("sd3", worlds, tmp_path, reward=["nan_reward:factory"],
                   nonfinite_reward="drop_group")
    trainer, result, *rest = run_two_steps(cfg)
    rows = check_run(trainer, result, *rest)
    assert all(r["dropped_groups"] == 1 for r in rows)
    reset_accelerate_state()
    from vipo.trainer import Trainer

    trainer = Trainer(make_cfg("sd3", worlds, tmp_path, reward=["nan_reward:factory"],
                               run_name="raise"))
    roll = trainer.sample(0)
    from vipo.faults import TrainingError

    with pytest.raises(TrainingError, match="reward 'nan_reward:factory' of sample 0 "
                       r"\(group \d+, prompt '[^']+'\) is nan"):
        trainer.advantages(roll, trainer.score(roll))


def test_vipo_mean_one_maps_sum_rewards_batch_std(worlds, tmp_path):
    cfg = make_cfg("sd3", worlds, tmp_path, algorithm="vipo", map_norm="mean_one",
                   reward=["redness", "jpeg_incompressibility"], reward_weights=[1.0, 0.01],
                   multi_reward="sum_rewards", std_scope="batch", eps_std=1e-4)
    rows = check_run(*run_two_steps(cfg))
    assert rows[0]["map_mean"] < 1  # raw min-max maps are logged; the loss sees M / mean M


@pytest.mark.parametrize("map_norm", ["minmax", "mean_one", "floor"])
def test_trainer_passes_maps_and_advantages_unchanged(worlds, tmp_path, monkeypatch, map_norm):
    """One vipo_loss call per trained step, with the (B, K) advantages as group_advantages
    made them (unclipped: the loss clips to adv_clip), the reward weights, the map as
    map_norm made it (docs/method.md 6), and the configured adv_clip; and the per-reward losses
    are logged."""
    import vipo_kernels

    cfg = make_cfg("sd3", worlds, tmp_path, algorithm="vipo", map_norm=map_norm, map_floor=0.25,
                   reward=["redness", "jpeg_incompressibility"], reward_weights=[1.0, 0.5],
                   iterations=1)
    from vipo.trainer import Trainer

    trainer = Trainer(cfg)
    roll = trainer.sample(0)
    adv, _, maps, raw = trainer.advantages(roll, trainer.score(roll))
    expected = {"minmax": raw, "mean_one": raw / raw.mean(dim=(1, 2), keepdim=True),
                "floor": 0.25 + 0.75 * raw}[map_norm]
    torch.testing.assert_close(maps, expected)
    calls = []
    real = vipo_kernels.vipo_loss

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(vipo_kernels, "vipo_loss", spy)
    stats = trainer.optimize(roll, adv, maps)
    steps = roll.num_samples // cfg.train.train_batch_size * cfg.train_steps_per_sample
    assert len(calls) == steps
    for args, kwargs in calls:
        assert args[4].shape[1] == 2 and kwargs["reward_weights"] == [1.0, 0.5]
        assert kwargs["adv_clip"] == cfg.train.adv_clip
        # Each row of the call's advantages and map is some sample's, unchanged.
        assert all(any(torch.equal(row, a) for a in adv.values) for row in args[4])
        assert all(any(torch.equal(row, m) for m in maps) for row in args[5])
    assert {"loss_clip_redness", "loss_clip_jpeg_incompressibility"} <= stats.keys()


def test_default_command_runs_the_toy_preset(tmp_path, capsys):
    """`python -m vipo.train` with no arguments = ViPO on the shipped toy world with the
    redness reward and the toy backbone; here cut to 2 iterations and 4 eval prompts."""
    from vipo.train import main, parse_args

    cfg = parse_args([])
    assert (cfg.preset, cfg.model.path, cfg.psm.backbone, cfg.reward.reward,
            cfg.train.algorithm) == ("toy", "toy", "toy", ["redness"], "vipo")
    assert cfg.eval.eval_prompts == "toy_heldout" and "toy_fidelity" in cfg.eval.eval_rewards
    assert main(["iterations=2", "eval_samples=4", f"output_dir={tmp_path / 'runs'}",
                 "run_name=default", "progress=false"]) == 0
    out = capsys.readouterr().out
    assert "vipo.train: 2 iterations in" in out and "eval redness" in out
    run = tmp_path / "runs" / "default"
    assert len(read_metrics(run / "metrics.csv")) == 2
    assert [row["iteration"] for row in read_metrics(run / "eval.csv")] == [0, 2]
    assert (run / "samples" / "maps000001.png").is_file()  # the last iteration's overlay
    assert (run / "eval" / "before_after.png").is_file() and (run / "eval_curves.png").is_file()
    assert Config.from_yaml(run / "config.yaml").train.iterations == 2


def test_cfg_unconditional_branch_gets_no_gradient(worlds, tmp_path):
    """v = v_u + w (v_c - v_u) with v_u under no_grad: d(sum v)/dtheta = w d(sum v_c)/dtheta."""
    from vipo.trainer import Trainer

    trainer = Trainer(make_cfg("wan", worlds, tmp_path, guidance_scale=3.0))
    adapter, model = trainer.adapter, trainer.model
    cond = adapter.encode_prompts(["a red apple", "a cat"])
    z = torch.randn(2, *adapter.latent_shape())
    t = trainer.schedule.timesteps[torch.tensor([0, 1])]
    params = [p for p in model.parameters() if p.requires_grad]
    guided = torch.autograd.grad(adapter.velocity(model, z, t, cond).sum(), params,
                                 allow_unused=True)
    conditional = torch.autograd.grad(adapter.forward(model, z, t, cond).sum(), params,
                                      allow_unused=True)
    for g, c in zip(guided, conditional):
        if g is not None:
            # fp32 rounding only: w is applied to the output here and to the sum there.
            torch.testing.assert_close(g, 3.0 * c, rtol=1e-4, atol=1e-5)


def test_flux_packing_round_trip(worlds, tmp_path):
    from diffusers import FluxPipeline

    from vipo.trainer import Trainer

    trainer = Trainer(make_cfg("flux", worlds, tmp_path))
    factor = trainer.adapter.pipe.vae_scale_factor
    z = torch.randn(3, *trainer.adapter.latent_shape())
    packed = FluxPipeline._pack_latents(z, 3, z.shape[1], z.shape[2], z.shape[3])
    assert packed.shape == (3, z.shape[2] * z.shape[3] // 4, 4 * z.shape[1])
    back = FluxPipeline._unpack_latents(packed, z.shape[2] * factor, z.shape[3] * factor, factor)
    assert torch.equal(back, z)
