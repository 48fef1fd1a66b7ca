"""PerceptualStructuringModule over tiny random-config transformers backbones, one per family,
written with save_pretrained and loaded through the real from_pretrained path (offline)."""

import json

import pytest
import torch

from vipo.psm import PerceptualStructuringModule

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _tiny_models():
    t = transformers
    clip_text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, vocab_size=99, bos_token_id=0, eos_token_id=1,
                     pad_token_id=1)
    return {
        "dinov2": t.Dinov2Model(t.Dinov2Config(**TINY, patch_size=14, image_size=56)),
        "dinov2_registers": t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
            **TINY, patch_size=14, image_size=56, num_register_tokens=4)),
        "vit": t.ViTModel(t.ViTConfig(**TINY, patch_size=8, image_size=32)),
        "clip": t.CLIPModel(t.CLIPConfig(text_config=clip_text, projection_dim=16,
                                         vision_config=dict(**TINY, patch_size=8, image_size=32))),
        "clip_vision": t.CLIPVisionModel(t.CLIPVisionConfig(**TINY, patch_size=8, image_size=32)),
        "siglip": t.SiglipVisionModel(t.SiglipVisionConfig(**TINY, patch_size=8, image_size=32)),
        "resnet": t.ResNetModel(t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                               depths=[1, 1], layer_type="basic")),
        "convnext": t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1],
                                                     num_stages=2)),
        "sam": t.SamModel(t.SamConfig(
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               mlp_dim=64, image_size=64, patch_size=8, output_channels=16,
                               window_size=4, global_attn_indexes=[1]),
            prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8),
            mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     mlp_dim=32, iou_head_hidden_dim=16))),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("backbones")
    paths = {}
    for name, model in _tiny_models().items():
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


FAMILIES = ["dinov2", "dinov2_registers", "vit", "clip", "clip_vision", "siglip", "resnet",
            "convnext", "sam"]
# Patch grid of a 45 x 61 image (odd, non-square) by the family's rule.
EXPECTED_GRID = {"dinov2": (3, 4), "dinov2_registers": (3, 4), "vit": (5, 7), "clip": (5, 7),
                 "clip_vision": (5, 7), "siglip": (5, 7),
                 "resnet": (6, 8),      # stride 4 stem + one stride-2 stage, conv rounding up
                 "convnext": (5, 7),    # 4x4 patchify stem + one 2x2 downsampling
                 "sam": (6, 8)}         # longest side 61 -> 64: 47 x 64 pixels, ceil(/8)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_maps(checkpoints, family):
    psm = PerceptualStructuringModule.from_pretrained(checkpoints[family])
    images = torch.rand(2, 3, 45, 61)
    features, grid = psm.backbone(images)
    assert grid == EXPECTED_GRID[family]
    assert features.shape[:2] == (2, grid[0] * grid[1]) and features.dtype == torch.float32
    maps = psm(images, latent_size=(6, 7))
    assert maps.shape == (2, 6, 7) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() == 1
    frames = torch.rand(1, 3, 3, 30, 44)
    video = psm.video(frames, latent_size=(2, 5, 6))
    assert video.shape == (1, 2, 5, 6) and video.max() == 1
    assert psm.failures == 0
    model = psm.backbone.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("size", [(56, 56), (70, 42), (29, 15)])
def test_dinov2_native_grid_and_prefix_tokens(checkpoints, size):
    """Features are the last-layer tokens after CLS and the 4 registers; grid floor(H/14) x
    floor(W/14) comes from the config, with no resize and ImageNet statistics."""
    psm = PerceptualStructuringModule.from_pretrained(checkpoints["dinov2_registers"])
    images = torch.rand(2, 3, *size)
    features, grid = psm.backbone(images)
    assert grid == (size[0] // 14, size[1] // 14)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    tokens = psm.backbone.model(pixel_values=(images - mean) / std).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + grid[0] * grid[1]
    torch.testing.assert_close(features, tokens[:, 5:])


def test_processor_statistics_and_image_size(checkpoints, tmp_path):
    """mean/std come from preprocessor_config.json when there is one; image_size resizes."""
    folder = tmp_path / "vit"
    transformers.ViTModel.from_pretrained(checkpoints["vit"]).save_pretrained(folder)
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.9, 0.8, 0.7],
             "image_processor_type": "ViTImageProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(stats))
    psm = PerceptualStructuringModule.from_pretrained(folder, image_size=(40, 24))
    assert psm.backbone.mean == (0.1, 0.2, 0.3) and psm.backbone.std == (0.9, 0.8, 0.7)
    images = torch.rand(1, 3, 45, 61)
    features, grid = psm.backbone(images)
    assert grid == (5, 3)
    resized = torch.nn.functional.interpolate(images, size=(40, 24), mode="bilinear",
                                              align_corners=False, antialias=True)
    pixels = (resized - torch.tensor(stats["image_mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(stats["image_std"]).view(1, 3, 1, 1)
    tokens = psm.backbone.model(pixel_values=pixels, interpolate_pos_encoding=True)
    torch.testing.assert_close(features, tokens.last_hidden_state[:, 1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_backbone_runs_in_requested_dtype(checkpoints, dtype):
    psm = PerceptualStructuringModule.from_pretrained(checkpoints["dinov2"], dtype=dtype)
    assert all(p.dtype == dtype for p in psm.backbone.model.parameters())
    maps = psm(torch.rand(2, 3, 42, 56), latent_size=(4, 4))
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()


def test_map_options_pass_through(checkpoints):
    psm = PerceptualStructuringModule.from_pretrained(checkpoints["dinov2"], normalize="floor",
                                                      floor=0.5, sigma=0.0, aggregation="first_pc")
    maps = psm(torch.rand(2, 3, 56, 70), latent_size=(8, 10))
    assert maps.min() >= 0.5 and maps.max() == 1.0
    with pytest.raises(ValueError, match="aggregation"):
        PerceptualStructuringModule.from_pretrained(checkpoints["dinov2"], aggregation="sum")


def test_video_chunked_equals_unchunked(checkpoints):
    whole = PerceptualStructuringModule.from_pretrained(checkpoints["dinov2"])
    chunked = PerceptualStructuringModule.from_pretrained(checkpoints["dinov2"], chunk_size=2)
    frames = torch.rand(2, 5, 3, 42, 56)
    for joint in (False, True):
        torch.testing.assert_close(chunked.video(frames, (3, 6, 8), joint_pca=joint),
                                   whole.video(frames, (3, 6, 8), joint_pca=joint),
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- failures

class _Raising:
    def __call__(self, images):
        raise RuntimeError("out of memory")


class _NaNForSecond:
    def __call__(self, images):
        features = torch.randn(images.shape[0], 12, 8)
        features[1] = float("nan")
        return features, (3, 4)


def test_backbone_failure_gives_ones_and_is_counted():
    psm = PerceptualStructuringModule(_Raising())
    assert torch.equal(psm(torch.rand(3, 3, 8, 8), latent_size=(4, 5)), torch.ones(3, 4, 5))
    assert psm.failures == 3
    assert torch.equal(psm.video(torch.rand(2, 4, 3, 8, 8), (2, 4, 5)), torch.ones(2, 2, 4, 5))
    assert psm.failures == 5


def test_non_finite_features_fail_only_that_sample():
    psm = PerceptualStructuringModule(_NaNForSecond(), normalize="mean_one")
    maps = psm(torch.rand(3, 3, 8, 8), latent_size=(6, 6))
    assert psm.failures == 1
    assert torch.equal(maps[1], torch.ones(6, 6))
    assert maps[0].std() > 0 and maps[2].std() > 0


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("images,match", [
    (torch.rand(3, 16, 16), "images"),
    (torch.rand(1, 4, 16, 16), "images"),
    (torch.randint(0, 255, (1, 3, 16, 16)), "images"),
    (torch.rand(1, 3, 16, 16) * 2 - 0.5, r"images must hold values in \[0, 1\]"),
    (torch.full((1, 3, 16, 16), float("nan")), "images"),
])
def test_bad_images_raise(images, match):
    psm = PerceptualStructuringModule(_Raising())
    with pytest.raises(ValueError, match=match):
        psm(images, latent_size=(4, 4))
    assert psm.failures == 0          # bad input is not a backbone failure


def test_bad_video_input_raises():
    psm = PerceptualStructuringModule(_Raising())
    with pytest.raises(ValueError, match="frames"):
        psm.video(torch.rand(1, 3, 16, 16), latent_size=(1, 4, 4))
    with pytest.raises(ValueError, match="latent_size"):
        psm.video(torch.rand(1, 2, 3, 16, 16), latent_size=(4, 4))
    with pytest.raises(ValueError, match="latent_size"):
        psm(torch.rand(1, 3, 16, 16), latent_size=(1, 4, 4))


def test_images_smaller_than_a_patch_raise(checkpoints):
    psm = PerceptualStructuringModule.from_pretrained(checkpoints["dinov2"])
    with pytest.raises(ValueError, match="patch size"):
        psm(torch.rand(1, 3, 10, 30), latent_size=(2, 2))
    assert psm.failures == 0


# ----------------------------------------------------------------------------- loading errors

def test_offline_hub_name_says_pass_a_local_path():
    with pytest.raises(OSError, match="pass the local path"):
        PerceptualStructuringModule.from_pretrained("facebook/dinov2-large")


def test_missing_folder_says_pass_a_local_path(tmp_path):
    with pytest.raises(OSError, match="local path"):
        PerceptualStructuringModule.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(OSError, match="local path"):
        PerceptualStructuringModule.from_pretrained(tmp_path)     # folder without config.json


def test_unsupported_model_type_lists_the_supported(tmp_path):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(OSError, match="unsupported backbone model_type 'bert'.*dinov2"):
        PerceptualStructuringModule.from_pretrained(tmp_path / "bert")
