"""Reward registry: ``reward=name`` or ``reward=module:function``.

A reward is a *factory* (DDPO's convention) ``factory(cfg: RewardConfig, device) -> fn``,
and ``fn(images, prompts) -> (B,) tensor`` scores images of shape (B, 3, H, W) in [0, 1].
Videos (B, F, 3, H, W) are scored frame by frame and aggregated (``score_media``) unless
the function sets ``fn.accepts_video = True`` and takes the clip itself.

Rule rewards need no model (docs/method.md 10); model rewards load through ``transformers``
from a local folder or a hub id; HPSv2.1 and ImageReward are optional extras.
"""

from __future__ import annotations

import importlib
import io
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError

RewardFn = Callable[[torch.Tensor, list], torch.Tensor]
_REGISTRY: dict[str, Callable] = {}


def register_reward(name: str):
    """Decorator adding a reward factory to the registry under ``name``."""
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def registered() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(name: str) -> Callable:
    if ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({err})") \
                from None
        if not callable(getattr(module, attr, None)):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no callable {attr!r}")
        return getattr(module, attr)
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {', '.join(registered())}; or "
                         f"give a factory as module:function")
    return _REGISTRY[name]


def reward_tag(name: str) -> str:
    """A reward name as a metric-name part (``module:fn`` -> ``module_fn``)."""
    return name.replace(":", "_").replace(".", "_")


def check_reward_name(name: str, field: str = "reward.reward") -> None:
    """Start-up check (no model loaded): the name is registered or importable."""

    try:
        _resolve(name)
    except ValueError as err:
        raise ConfigError(f"{field}: {err}") from None


def build_reward(name: str, cfg, device) -> RewardFn:
    fn = _resolve(name)(cfg, device)
    if not callable(fn):
        raise TypeError(f"reward {name!r}: its factory returned {type(fn).__name__}, not a "
                        f"callable fn(images, prompts)")
    return fn


def score_media(fn: RewardFn, media: torch.Tensor, prompts: list, cfg, name: str = "reward"):
    """(B,) float32 CPU rewards of images (B, 3, H, W) or videos (B, F, 3, H, W)."""
    batch = media.shape[0]
    if media.dim() == 5 and not getattr(fn, "accepts_video", False):
        frames = media[:, ::cfg.video_frame_stride]  # (B, F', 3, H, W)
        n = frames.shape[1]
        flat = fn(frames.flatten(0, 1), [p for p in prompts for _ in range(n)])
        per_frame = _as_scores(flat, batch * n, name).reshape(batch, n)
        return {"mean": per_frame.mean, "min": lambda dim: per_frame.amin(dim),
                "max": lambda dim: per_frame.amax(dim)}[cfg.video_aggregate](1)
    return _as_scores(fn(media, list(prompts)), batch, name)


def _as_scores(scores, batch: int, name: str) -> torch.Tensor:
    """A reward's output as (batch,) float32 scores; anything but real numbers is an error
    naming the reward and what it returned."""
    try:
        tensor = torch.as_tensor(scores)
    except (TypeError, ValueError, RuntimeError):
        tensor = None
    if tensor is None or tensor.dtype == torch.bool or tensor.is_complex():
        kind = type(scores).__name__
        if isinstance(scores, (list, tuple)) and scores:
            kind += f" of {type(scores[0]).__name__}"
        raise ValueError(f"reward {name!r} returned a {kind}, not numbers: it must return one "
                         f"real score per input (a tensor or a list of floats)")
    scores = tensor.detach().to("cpu", torch.float32).reshape(-1)
    if scores.numel() != batch:
        raise ValueError(f"reward {name!r} returned {scores.numel()} scores for {batch} inputs")
    return scores


# ---- rule rewards (docs/method.md 10) ------------------------------------------------------------
def _pixel_redness(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) R - (G + B)/2 of (B, 3, H, W) images."""
    r, g, b = images.float().unbind(dim=1)
    return r - 0.5 * (g + b)


@register_reward("redness")
def redness(cfg=None, device=None) -> RewardFn:
    """Mean over pixels of R - (G + B)/2 (the paper's Fig. 5 experiment); range [-1, 1]."""
    return lambda images, prompts: _pixel_redness(images).flatten(1).mean(dim=1)


def _region_redness(images: torch.Tensor, prompts: list, on_object: bool) -> torch.Tensor:
    """Mean redness over the pixels inside (or outside) the object mask that each toy
    prompt's spec renders to: a reward that lives on one region of the picture."""
    from .toy import world

    height, width = images.shape[-2:]
    if height != width:
        raise ValueError(f"region rewards need square toy-world images, got {height}x{width}")
    masks = world.prompt_masks(list(prompts), height).to(images.device)   # (B, H, W) bool
    region = (masks if on_object else ~masks).float()
    return (_pixel_redness(images) * region).flatten(1).sum(1) / region.flatten(1).sum(1)


@register_reward("object_redness")
def object_redness(cfg=None, device=None) -> RewardFn:
    """Redness averaged over the object the prompt asks for (its rendered mask; toy-world
    prompts only, docs/toy_world.md): a reward that lives on the object."""
    return lambda images, prompts: _region_redness(images, prompts, on_object=True)


@register_reward("background_redness")
def background_redness(cfg=None, device=None) -> RewardFn:
    """Redness averaged over the pixels outside the prompt's rendered object mask."""
    return lambda images, prompts: _region_redness(images, prompts, on_object=False)


def _jpeg_kilobytes(images: torch.Tensor) -> torch.Tensor:
    """JPEG size (quality 95) of each image in kB, after uint8 quantisation (DDPO)."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(cfg=None, device=None) -> RewardFn:
    """-(JPEG size in kB): smaller files score higher (DDPO's rewards.py)."""
    return lambda images, prompts: -_jpeg_kilobytes(images)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(cfg=None, device=None) -> RewardFn:
    """+(JPEG size in kB)."""
    return lambda images, prompts: _jpeg_kilobytes(images)


# ---- CLIP-family rewards through transformers -----------------------------------------------
def _features(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScorer:
    """Image-text similarity of a CLIPModel; ``scale`` multiplies by exp(logit_scale).

    Pixels are preprocessed in torch (resize of the short side, bicubic with antialias;
    centre crop; the processor's mean/std), which matches CLIPImageProcessor up to
    resampling details and avoids a round trip through PIL.
    """

    def __init__(self, model_path: str, processor_path: str, device, *, scale: bool):
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(model_path, use_safetensors=True)
        self.model = self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        processor = AutoProcessor.from_pretrained(processor_path)
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        self.short_side = int(ip.size["shortest_edge"])
        self.crop = (int(ip.crop_size["height"]), int(ip.crop_size["width"]))
        self.mean = torch.tensor(ip.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=self.device).view(1, 3, 1, 1)
        self.scale = scale
        self.max_length = self.model.config.text_config.max_position_embeddings

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, torch.float32)
        h, w = images.shape[-2:]
        factor = self.short_side / min(h, w)
        size = (max(self.crop[0], round(h * factor)), max(self.crop[1], round(w * factor)))
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        images = images[..., top:top + self.crop[0], left:left + self.crop[1]]
        return (images - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list) -> torch.Tensor:
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(self.device)
        image_emb = _features(self.model.get_image_features(pixel_values=self.pixels(images)))
        text_emb = _features(self.model.get_text_features(**text))
        sim = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)  # (B,)
        return sim * self.model.logit_scale.exp().float() if self.scale else sim


@register_reward("clip_score")
def clip_score(cfg, device) -> RewardFn:
    """Cosine similarity of CLIP image and prompt embeddings, in [-1, 1]."""
    return CLIPScorer(cfg.clip_model, cfg.clip_model, device, scale=False)


@register_reward("pickscore")
def pickscore(cfg, device) -> RewardFn:
    """PickScore (arXiv 2305.01569): exp(logit_scale) x cosine, about 18-24 on real images."""
    return CLIPScorer(cfg.pickscore_model, cfg.pickscore_processor, device, scale=True)


# ---- optional extras ----------------------------------------------------------------------
def _optional(module: str, reward: str, how: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"reward {reward!r} needs the optional package {module!r} ({err}); "
                           f"{how}") from None


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


@register_reward("hpsv2")
def hpsv2(cfg, device) -> RewardFn:
    """HPSv2.1 (arXiv 2306.09341) through the ``hpsv2`` package (downloads its checkpoint)."""
    hps = _optional("hpsv2", "hpsv2", "install it with `pip install hpsv2` (it pulls open_clip "
                    "and fetches the HPSv2.1 checkpoint from the hub on first use)")

    def fn(images, prompts):
        return torch.tensor([float(hps.score([img], prompt, hps_version="v2.1")[0])
                             for img, prompt in zip(_to_pil(images), prompts)])
    return fn


@register_reward("imagereward")
def imagereward(cfg, device) -> RewardFn:
    """ImageReward v1.0 (arXiv 2304.05977) through the ``image-reward`` package."""
    rm = _optional("ImageReward", "imagereward", "install it with `pip install image-reward` "
                   "(it fetches ImageReward-v1.0 from the hub on first use)")
    model = rm.load("ImageReward-v1.0", device=str(device))

    def fn(images, prompts):
        return torch.tensor([float(model.score(prompt, [img]))
                             for img, prompt in zip(_to_pil(images), prompts)])
    return fn


# ---- the toy world's evaluator (vipo/toy) --------------------------------------------------
@register_reward("toy_fidelity")
def toy_fidelity(cfg, device) -> RewardFn:
    """Prompt fidelity of toy-world images judged by the shipped toy evaluator (a ResNet,
    not the PSM backbone): the share of shape, colour, position and background it reads as
    the prompt says, in {0, 0.25, ..., 1}. ``fn.details`` gives each attribute's accuracy
    and ``structure_iou`` (its 8 x 8 object mask against the prompt's rendered mask)."""
    from .toy import world
    from .toy.evaluator import ToyEvaluator

    evaluator = ToyEvaluator(device=device)

    def score(images, prompts):
        return evaluator.score(images, [world.parse_prompt(p) for p in prompts])

    def details(images, prompts):  # the fidelity itself is the reward's own value
        return {k: v for k, v in score(images, prompts).items() if k != "fidelity"}

    def fn(images, prompts):
        return score(images, prompts)["fidelity"]

    fn.details = details
    return fn
