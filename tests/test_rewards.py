"""Rewards: rule rewards against hand-computed values, the registry (names and
module:function), CLIP-family rewards with a tiny random CLIP loaded from a folder, the
optional extras' errors and video aggregation."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from vipo import rewards, tiny
from vipo.config import ConfigError, RewardConfig


def solid(rgb, n=2, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size)


def test_redness_values():
    fn = rewards.build_reward("redness", RewardConfig(), "cpu")
    images = torch.cat([solid([1, 0, 0], 1), solid([0, 1, 1], 1), solid([0.5, 0.2, 0.4], 1)])
    torch.testing.assert_close(fn(images, ["p"] * 3), torch.tensor([1.0, -1.0, 0.2]))


def test_jpeg_rewards_order_and_sign():
    from PIL import Image

    flat = solid([0.3, 0.6, 0.9], 1, 64)
    noisy = torch.rand(1, 3, 64, 64)
    images = torch.cat([flat, noisy])
    comp = rewards.build_reward("jpeg_compressibility", RewardConfig(), "cpu")(images, ["a", "b"])
    incomp = rewards.build_reward("jpeg_incompressibility", RewardConfig(), "cpu")(images,
                                                                                    ["a", "b"])
    torch.testing.assert_close(comp, -incomp)
    assert comp[0] > comp[1]  # a flat image compresses better than noise
    buf = io.BytesIO()  # the definition: kB of a quality-95 JPEG of the uint8 image
    pixels = (noisy[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    assert float(incomp[1]) == pytest.approx(buf.tell() / 1000)


def test_registry_names_and_module_function(tmp_path, monkeypatch):
    assert {"redness", "jpeg_compressibility", "jpeg_incompressibility", "clip_score",
            "pickscore", "hpsv2", "imagereward"} <= set(rewards.registered())
    (tmp_path / "my_reward.py").write_text(
        "import torch\n"
        "def factory(cfg, device):\n"
        "    return lambda images, prompts: images.mean(dim=(1, 2, 3)) * len(prompts[0])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.build_reward("my_reward:factory", RewardConfig(), "cpu")
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(fn(images, ["ab"] * 3), images.mean(dim=(1, 2, 3)) * 2)
    # The same factory through the registry decorator.
    rewards.register_reward("test_mean")(sys.modules["my_reward"].factory)
    try:
        fn2 = rewards.build_reward("test_mean", RewardConfig(), "cpu")
        torch.testing.assert_close(fn2(images, ["ab"] * 3), fn(images, ["ab"] * 3))
    finally:
        rewards._REGISTRY.pop("test_mean")


@pytest.mark.parametrize("name, message", [
    ("no_such_reward", "unknown reward 'no_such_reward'"),
    ("no_such_module_xyz:fn", "cannot import module"),
    ("vipo.rewards:no_such_fn", "has no callable 'no_such_fn'"),
])
def test_registry_errors_name_the_reward(name, message):
    with pytest.raises(ConfigError, match="reward.reward") as err:
        rewards.check_reward_name(name)
    assert message in str(err.value)


def test_factory_must_return_a_callable(tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text("def factory(cfg, device):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="bad_reward:factory"):
        rewards.build_reward("bad_reward:factory", RewardConfig(), "cpu")


def test_wrong_number_of_scores_is_an_error():
    with pytest.raises(ValueError, match="returned 1 scores for 2 inputs"):
        rewards.score_media(lambda im, p: torch.zeros(1), torch.rand(2, 3, 8, 8), ["a", "b"],
                            RewardConfig(), "broken")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny.build_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_and_pickscore_match_transformers_processing(clip_folder):
    """Our torch preprocessing + scoring equals CLIPProcessor + CLIPModel on PIL images
    (32 px inputs: the resize and the crop are identities, so only uint8 quantisation of
    the PIL path differs, removed here by feeding uint8-exact images)."""
    from transformers import AutoProcessor, CLIPModel

    cfg = RewardConfig(clip_model=str(clip_folder), pickscore_model=str(clip_folder),
                       pickscore_processor=str(clip_folder))
    images = torch.randint(0, 256, (3, 3, 32, 32)).float() / 255
    prompts = ["a red apple", "a cat", "a dog on a beach"]
    clip = rewards.build_reward("clip_score", cfg, "cpu")(images, prompts)
    pick = rewards.build_reward("pickscore", cfg, "cpu")(images, prompts)

    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = AutoProcessor.from_pretrained(clip_folder)
    pil = rewards._to_pil(images)
    inputs = processor(text=prompts, images=pil, return_tensors="pt", padding="max_length",
                       max_length=model.config.text_config.max_position_embeddings)
    with torch.no_grad():
        out = model(**inputs)
    expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    torch.testing.assert_close(clip, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pick, expected * model.logit_scale.exp(), atol=1e-4, rtol=1e-5)
    assert clip.shape == (3,) and bool((clip.abs() <= 1).all())


def test_clip_score_resizes_any_image_size(clip_folder):
    cfg = RewardConfig(clip_model=str(clip_folder))
    fn = rewards.build_reward("clip_score", cfg, "cpu")
    scores = fn(torch.rand(2, 3, 48, 80), ["a", "b"])
    assert scores.shape == (2,) and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("name, module", [("hpsv2", "hpsv2"), ("imagereward", "ImageReward")])
def test_optional_rewards_explain_how_to_install(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(RuntimeError, match=f"reward '{name}' needs the optional package") as err:
        rewards.build_reward(name, RewardConfig(), "cpu")
    assert "pip install" in str(err.value)


@pytest.mark.parametrize("aggregate, reduce", [("mean", torch.mean), ("min", torch.amin),
                                               ("max", torch.amax)])
def test_video_rewards_score_frames_and_aggregate(aggregate, reduce):
    fn = rewards.build_reward("redness", RewardConfig(), "cpu")
    video = torch.rand(2, 6, 3, 8, 8)
    cfg = RewardConfig(video_aggregate=aggregate, video_frame_stride=2)
    per_frame = torch.stack([fn(video[:, f], ["p", "q"]) for f in (0, 2, 4)], dim=1)
    torch.testing.assert_close(rewards.score_media(fn, video, ["p", "q"], cfg),
                               reduce(per_frame, dim=1))


def test_video_aware_reward_gets_the_clip():
    seen = {}

    def fn(media, prompts):
        seen["shape"] = tuple(media.shape)
        return media.mean(dim=(1, 2, 3, 4))
    fn.accepts_video = True
    rewards.score_media(fn, torch.rand(2, 5, 3, 8, 8), ["a", "b"], RewardConfig())
    assert seen["shape"] == (2, 5, 3, 8, 8)
