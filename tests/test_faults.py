"""Faults and bad input: each case ends in one line naming the cause, and no saved step is
lost. Trainer runs are the smallest of tests/run_helpers.py, in process."""

from __future__ import annotations

import errno
import math
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vipo import tiny
from vipo.advantages import group_advantages
from vipo.checkpointing import complete_checkpoints, read_state
from vipo.logging_utils import read_metrics
from vipo_kernels import backends, log_prob, sde_coefficients, sde_step, vipo_loss

from .run_helpers import WEIGHTS, run, run_args

KERNEL_BACKENDS = ["torch"] + [b for b in ("cpp", "triton") if backends.available(b)]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def one_line(capsys) -> str:
    """The trainer's own message: exactly one `vipo.train:` line and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vipo.train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """Writes a reward module into an importable folder; returns its writer. Each test's
    module has its own name, so no test imports another's from sys.modules."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str, name: str = "") -> str:
        name = name or "user_rewards_" + re.sub(r"\W", "_", tmp_path.name)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name
    return write


# ---- kernels --------------------------------------------------------------------------------
def _loss_inputs(ratio_level: str):
    torch.manual_seed(0)
    b, c, h, w = 2, 4, 3, 3
    cs, co, sd = sde_coefficients(torch.full((b,), 0.8), torch.full((b,), 0.7), kind="dance",
                                  eta=0.3)
    shape = (b, h, w) if ratio_level == "position" else (b,)
    return {"model_output": torch.randn(b, c, h, w), "sample": torch.randn(b, c, h, w),
            "next_sample": torch.randn(b, c, h, w), "old_log_prob": torch.full(shape, -40.0),
            "advantages": torch.tensor([1.0, -1.0]), "coef_sample": cs, "coef_output": co,
            "std": sd}


@pytest.mark.parametrize("ratio_level", ["position", "sample"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("argument", ["model_output", "sample", "next_sample"])
def test_nonfinite_latents_never_give_a_finite_loss(argument, value, ratio_level):
    """One NaN/inf element: every backend returns a NaN loss and NaN ratio statistics
    (before, an inf gave a finite loss with a NaN gradient, and the C++ min/max skipped
    NaN), so the trainer's non-finite guard sees it."""
    seen = {}
    for backend in KERNEL_BACKENDS:
        x = _loss_inputs(ratio_level)
        x[argument][0, 1, 2, 0] = value
        v = x.pop("model_output").requires_grad_(True)
        loss, stats = vipo_loss(v, x.pop("sample"), x.pop("next_sample"), x.pop("old_log_prob"),
                                x.pop("advantages"), None, **x, clip_range=0.2, adv_clip=5.0,
                                ratio_level=ratio_level, backend=backend)
        loss.backward()
        assert not math.isfinite(float(loss.detach())), backend
        assert not bool(torch.isfinite(v.grad).all()), backend
        for key in ("ratio_mean", "ratio_min", "ratio_max", "loss_clip"):
            assert math.isnan(float(stats[key])), (backend, key)
        seen[backend] = {k: float(s) for k, s in stats.items()}
    first = seen["torch"]
    for backend, stats in seen.items():
        for key, value_ in stats.items():
            assert (math.isnan(value_) and math.isnan(first[key])) or \
                value_ == pytest.approx(first[key], rel=1e-5, abs=1e-6), (backend, key)


def test_finite_inputs_are_unchanged_by_the_guard():
    x = _loss_inputs("position")
    v = x.pop("model_output")
    for backend in KERNEL_BACKENDS:
        loss, stats = vipo_loss(v, x["sample"], x["next_sample"], x["old_log_prob"],
                                x["advantages"], None, coef_sample=x["coef_sample"],
                                coef_output=x["coef_output"], std=x["std"], clip_range=0.2,
                                backend=backend)
        assert math.isfinite(float(loss)) and math.isfinite(float(stats["ratio_max"]))


@pytest.mark.parametrize("argument", ["coef_sample", "coef_output"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_step_coefficients_are_an_error_naming_them(argument, value):
    x = _loss_inputs("position")
    x[argument] = x[argument].clone()
    x[argument][1] = value
    coefs = {k: x[k] for k in ("coef_sample", "coef_output", "std")}
    calls = [lambda: vipo_loss(x["model_output"], x["sample"], x["next_sample"],
                               x["old_log_prob"], x["advantages"], **coefs),
             lambda: sde_step(x["model_output"], x["sample"], torch.randn_like(x["sample"]),
                              **coefs),
             lambda: log_prob(x["model_output"], x["sample"], x["next_sample"], **coefs)]
    for call in calls:
        with pytest.raises(ValueError, match=f"{argument} contains NaN or inf"):
            call()


# ---- the trainer's non-finite guard ---------------------------------------------------------
def _poison_training(monkeypatch, first_only: bool):
    """The recomputed velocity (the only forward with grad) gets an inf element."""
    from vipo.adapters.base import Adapter

    original, calls = Adapter.velocity, []

    def velocity(self, model, latents, timesteps, cond):
        v = original(self, model, latents, timesteps, cond)
        if torch.is_grad_enabled() and (not first_only or not calls):
            calls.append(1)
            v = v.clone()
            v[0, 0, 0, 0] = math.inf
        return v
    monkeypatch.setattr(Adapter, "velocity", velocity)


def test_a_nonfinite_step_is_skipped_and_logged(tiny_world, tmp_path, monkeypatch):
    _poison_training(monkeypatch, first_only=True)
    assert run(*run_args(tiny_world, tmp_path, "skip", checkpoint_every=1)) == 0
    rows = read_metrics(tmp_path / "skip" / "metrics.csv")
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    assert [r["optimizer_steps"] for r in rows] == [0, 1]
    from safetensors.torch import load_file

    start = load_file(Path(tiny_world["sd3"]) / "transformer/diffusion_pytorch_model.safetensors")
    after_skip = load_file(tmp_path / "skip/checkpoints/iter000001/transformer/"
                           "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(start[k], after_skip[k]) for k in start)  # nothing applied
    assert math.isfinite(rows[1]["grad_norm"])


def test_nonfinite_steps_in_a_row_stop_with_the_cause(tiny_world, tmp_path, monkeypatch,
                                                      capsys):
    _poison_training(monkeypatch, first_only=False)
    args = run_args(tiny_world, tmp_path, "stop", iterations=5, checkpoint_every=1,
                    max_bad_steps=2)
    assert run(*args) == 1
    line = one_line(capsys)
    assert "2 optimiser steps in a row" in line and "lower train.lr" in line and \
        "rewards" in line, line
    # The state was still good: the periodic checkpoint stays, no crash checkpoint of it.
    assert [c.name for c in complete_checkpoints(tmp_path / "stop")] == ["iter000001"]


def test_divergence_is_named_not_blamed_on_the_reward(tiny_world, tmp_path, capsys):
    assert run(*run_args(tiny_world, tmp_path, "div", lr=1e4, iterations=6)) == 1
    line = one_line(capsys)
    assert "diverged" in line and "lower train.lr (now 10000)" in line, line


# ---- rewards --------------------------------------------------------------------------------
NAN_FOR_SAMPLE_1 = """
import torch
def factory(cfg, device):
    def fn(images, prompts):
        r = images.mean(dim=(1, 2, 3)).clone()
        r[1] = float("nan")
        return r
    return fn
"""


def test_nonfinite_reward_names_sample_prompt_and_reward(tiny_world, tmp_path, reward_module,
                                                         capsys):
    name = reward_module(NAN_FOR_SAMPLE_1)
    assert run(*run_args(tiny_world, tmp_path, "nan", reward=f"{name}:factory")) == 1
    line = one_line(capsys)
    assert f"reward '{name}:factory' of sample 1 (group 0, prompt '" in line and "nan" in line
    # Raised before any optimiser step: the checkpoint is the exact start of iteration 0.
    (checkpoint,) = complete_checkpoints(tmp_path / "nan")
    assert read_state(checkpoint)["iteration"] == 0 and read_state(checkpoint)["kind"] == "crash"


def test_dropping_every_group_for_n_iterations_stops(tiny_world, tmp_path, reward_module,
                                                     capsys):
    name = reward_module("""
        import torch
        def factory(cfg, device):
            return lambda images, prompts: torch.full((len(images),), float("inf"))
        """)
    args = run_args(tiny_world, tmp_path, "drop", reward=f"{name}:factory",
                    nonfinite_reward="drop_group", max_dropped_iters=2, iterations=5)
    assert run(*args) == 1
    line = one_line(capsys)
    assert "dropped every group for 2 iterations in a row" in line, line


def test_huge_rewards_do_not_overflow_the_group_statistics(tiny_world, tmp_path,
                                                           reward_module):
    rewards = torch.tensor([[1.0], [2.0], [4.0], [3.0], [5.0], [0.5]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    plain = group_advantages(rewards, groups, [1.0]).values
    for scale in (1e37, 3e38 / 5):  # squares overflow float32
        huge = group_advantages(rewards * scale, groups, [1.0]).values
        assert torch.isfinite(huge).all()
        torch.testing.assert_close(huge, plain, rtol=1e-6, atol=1e-6)
    name = reward_module("""
        def factory(cfg, device):
            return lambda images, prompts: images.mean(dim=(1, 2, 3)) * 3e38
        """)
    assert run(*run_args(tiny_world, tmp_path, "huge", reward=f"{name}:factory")) == 0
    rows = read_metrics(tmp_path / "huge" / "metrics.csv")
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_all_equal_groups_train_nothing_and_say_so(tiny_world, tmp_path, reward_module):
    name = reward_module("""
        import torch
        def factory(cfg, device):
            return lambda images, prompts: torch.ones(len(images))
        """)
    assert run(*run_args(tiny_world, tmp_path, "flat", reward=f"{name}:factory")) == 0
    rows = read_metrics(tmp_path / "flat" / "metrics.csv")
    assert [r["zero_std_groups"] for r in rows] == [2, 2]
    assert all(r["loss_clip"] == 0 for r in rows)


def test_a_reward_that_raises_saves_and_resumes_exactly(tiny_world, tmp_path, reward_module,
                                                        capsys, monkeypatch):
    flag = tmp_path / "break"
    monkeypatch.setenv("VIPO_TEST_FLAG", str(flag))
    name = reward_module("""
        import os
        calls = []
        def factory(cfg, device):
            def fn(images, prompts):
                calls.append(1)
                if len(calls) == 2 and os.path.exists(os.environ["VIPO_TEST_FLAG"]):
                    raise RuntimeError("reward server unreachable")
                return images.mean(dim=(1, 2, 3))
            return fn
        """, name="flaky_reward")
    flag.write_text("")
    args = run_args(tiny_world, tmp_path, "flaky", reward=f"{name}:factory", iterations=3)
    assert run(*args) == 1
    line = one_line(capsys)
    assert "reward 'flaky_reward:factory' raised RuntimeError: reward server unreachable" \
        in line and f"resume={tmp_path / 'flaky'}" in line, line
    (checkpoint,) = complete_checkpoints(tmp_path / "flaky")
    assert read_state(checkpoint)["iteration"] == 1  # the failed iteration runs again
    flag.unlink()
    assert run(f"resume={tmp_path / 'flaky'}", f"output_dir={tmp_path}") == 0
    straight = run_args(tiny_world, tmp_path, "straight", reward=f"{name}:factory",
                        iterations=3)
    assert run(*straight) == 0
    from .test_resume import same_run

    same_run(tmp_path / "straight", tmp_path / "flaky")


# ---- out of memory ---------------------------------------------------------------------------
@pytest.mark.parametrize("phase, knob", [("sampling", "sample.sample_batch_size (now 2)"),
                                         ("training", "train.train_batch_size (now 2)")])
def test_out_of_memory_says_what_to_shrink(tiny_world, tmp_path, monkeypatch, capsys, phase,
                                           knob):
    from vipo.adapters.base import Adapter

    original = Adapter.velocity

    def velocity(self, *args):
        if torch.is_grad_enabled() == (phase == "training"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args)
    monkeypatch.setattr(Adapter, "velocity", velocity)
    assert run(*run_args(tiny_world, tmp_path, "oom")) == 1
    line = one_line(capsys)
    assert f"out of memory during {phase}" in line and knob in line and \
        "gradient_checkpointing=true" in line, line


# ---- bad files and ids ----------------------------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["missing", "empty", "latin1"])
def test_bad_prompt_file(tmp_path, capsys, case):
    path = tmp_path / "prompts.txt"
    if case == "empty":
        path.write_text("\n  \n")
    elif case == "latin1":
        path.write_bytes("une pomme rouge sur la table, très belle\n".encode("latin-1"))
    assert run("tiny", f"prompts={path}", f"output_dir={tmp_path / 'runs'}") == 2
    line = one_line(capsys)
    assert "sample.prompts" in line and str(path) in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"),
    ("model:\n  arch: sd3\n  height: [64\n", "is not valid YAML at line"),
    ("- just\n- a list\n", "expected a mapping"),
    (b"\xff\xfepreset: tiny\n", "cannot be read"),
])
def test_bad_yaml_file(tmp_path, capsys, text, message):
    path = tmp_path / "run.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    assert run(str(path)) == 2
    line = one_line(capsys)
    assert str(path) in line and message in line, line


def _loaded_adapters(monkeypatch) -> list:
    """Records whether the main model's adapter was constructed."""
    import vipo.adapters

    calls, original = [], vipo.adapters.get_adapter
    monkeypatch.setattr(vipo.adapters, "get_adapter",
                        lambda arch: calls.append(arch) or original(arch))
    return calls


def test_truncated_backbone_is_named_before_the_main_model_loads(tiny_world, tmp_path,
                                                                  monkeypatch, capsys):
    backbone = tmp_path / "dinov2"
    shutil.copytree(tiny_world["dinov2"], backbone)
    _truncate(backbone / "model.safetensors")
    loaded = _loaded_adapters(monkeypatch)
    assert run(*run_args(tiny_world, tmp_path, "b", algorithm="vipo", backbone=backbone)) == 2
    line = one_line(capsys)
    assert "psm.backbone" in line and str(backbone / "model.safetensors") in line and \
        "corrupt or truncated" in line, line
    assert loaded == [] and not (tmp_path / "b").exists()


def test_truncated_model_file_is_named(tiny_world, tmp_path, capsys):
    world = tmp_path / "sd3"
    shutil.copytree(tiny_world["sd3"], world)
    weights = world / "transformer" / "diffusion_pytorch_model.safetensors"
    _truncate(weights)
    assert run(*run_args(tiny_world, tmp_path, "m", path=world)) == 2
    line = one_line(capsys)
    assert "model.path" in line and str(weights) in line, line


@pytest.mark.parametrize("key", ["path", "backbone"])
def test_unreachable_hub_id(tiny_world, tmp_path, monkeypatch, capsys, key):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = _loaded_adapters(monkeypatch)
    args = run_args(tiny_world, tmp_path, "hub", algorithm="vipo",
                    **{key: "no-such-org/no-such-model"})
    assert run(*args) == 2
    line = one_line(capsys)
    assert "'no-such-org/no-such-model'" in line and \
        ("model.path" if key == "path" else "psm.backbone") in line, line
    if key == "backbone":
        assert loaded == []


def test_reward_factory_failure_is_named_before_the_main_model(tiny_world, tmp_path,
                                                               reward_module, monkeypatch,
                                                               capsys):
    name = reward_module("""
        def factory(cfg, device):
            raise FileNotFoundError("reward weights /models/rm.safetensors not found")
        """)
    loaded = _loaded_adapters(monkeypatch)
    assert run(*run_args(tiny_world, tmp_path, "rf", reward=f"{name}:factory")) == 2
    line = one_line(capsys)
    assert f"the reward '{name}:factory'" in line and "rm.safetensors" in line, line
    assert loaded == []


@pytest.mark.parametrize("file", ["weights", "optimizer.pt", "rng_0.pt", "state.json"])
def test_corrupt_checkpoint_is_named_and_not_resumed(tiny_world, tmp_path, capsys, file):
    assert run(*run_args(tiny_world, tmp_path, "c", checkpoint_every=1)) == 0
    folder = tmp_path / "c" / "checkpoints" / "iter000001"
    path = folder / ("transformer/diffusion_pytorch_model.safetensors" if file == "weights"
                     else file)
    _truncate(path)
    capsys.readouterr()
    assert run(f"resume={folder}", f"output_dir={tmp_path}") == 2
    line = one_line(capsys)
    assert ("is not a complete checkpoint" if file == "state.json" else str(path)) in line, line


class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_checkpoint_pickles_are_not_executed(tiny_world, tmp_path, capsys):
    """optimizer.pt is read with weights_only=True: an object that runs code on load is
    refused, not run."""
    assert run(*run_args(tiny_world, tmp_path, "p", checkpoint_every=1)) == 0
    path = tmp_path / "p" / "checkpoints" / "iter000001" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": _Payload()}, path)
    capsys.readouterr()
    assert run(f"resume={path.parent}", f"output_dir={tmp_path}") == 2
    out = capsys.readouterr()
    assert "this ran while loading" not in out.out
    assert str(path) in out.err


def test_pickled_backbone_weights_are_refused(tiny_world, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"  # the backbone with its weights as a pickle (.bin)
    shutil.copytree(tiny_world["dinov2"], folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    assert run(*run_args(tiny_world, tmp_path, "pk", algorithm="vipo", backbone=folder)) == 2
    assert str(folder) in one_line(capsys)


# ---- optional outputs warn, required ones fail ----------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_sample_image_warns_and_training_goes_on(tiny_world, tmp_path, monkeypatch,
                                                        caplog):
    import vipo.run_loop

    monkeypatch.setattr(vipo.run_loop, "save_grid", _disk_full)
    assert run(*run_args(tiny_world, tmp_path, "img", image_every=1)) == 0
    assert "could not write the sample images of iteration 0" in caplog.text
    assert len(read_metrics(tmp_path / "img" / "metrics.csv")) == 2


def test_failed_tensorboard_write_warns(tiny_world, tmp_path, monkeypatch, caplog):
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(SummaryWriter, "add_scalar", _disk_full)
    assert run(*run_args(tiny_world, tmp_path, "tb", tensorboard="true")) == 0
    assert "TensorBoard logs disabled" in caplog.text


def test_failed_metrics_write_is_an_error(tiny_world, tmp_path, monkeypatch, capsys):
    from vipo.logging_utils import MetricsLogger

    monkeypatch.setattr(MetricsLogger, "log", _disk_full)
    assert run(*run_args(tiny_world, tmp_path, "mx")) == 1
    assert "No space left on device" in one_line(capsys)


def test_full_disk_at_the_final_save_keeps_the_last_checkpoint(tiny_world, tmp_path,
                                                               monkeypatch, capsys):
    import vipo.checkpointing as ck

    original = ck._write_weights

    def write(trainer, folder, weights):
        if "final" in folder.name:
            _disk_full()
        original(trainer, folder, weights)
    monkeypatch.setattr(ck, "_write_weights", write)
    assert run(*run_args(tiny_world, tmp_path, "full", iterations=3, checkpoint_every=2)) == 1
    line = one_line(capsys)
    assert "No space left on device" in line and "iter000002" in line, line
    assert [c.name for c in complete_checkpoints(tmp_path / "full")] == ["iter000002"]
    monkeypatch.setattr(ck, "_write_weights", original)
    assert run(f"resume={tmp_path / 'full'}", f"output_dir={tmp_path}") == 0
    assert (tmp_path / "full" / WEIGHTS).is_file()


# ---- caches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["half_written", "old_version"])
def test_tiny_cache_is_rebuilt(tmp_path, damage):
    folder = tiny.ensure_backbone(tmp_path)
    marker = folder / tiny.MARKER
    if damage == "half_written":
        (folder / "model.safetensors").unlink()
        marker.unlink()
    else:
        marker.write_text("version 0\n")
    tiny.ensure_backbone(tmp_path)
    assert marker.read_text().startswith(f"version {tiny.CACHE_VERSION}")
    from transformers import Dinov2Model

    Dinov2Model.from_pretrained(folder)  # whole again
    assert not list(tmp_path.glob(".*building*"))


def test_debug_shows_the_traceback(tmp_path):
    """--debug re-raises instead of printing one line (so the traceback shows)."""
    from vipo.config import ConfigError

    with pytest.raises(ConfigError, match="sample.prompts"):
        run("tiny", f"prompts={tmp_path / 'missing.txt'}", "--debug")
