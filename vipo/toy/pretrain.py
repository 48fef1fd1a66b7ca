"""``python -m vipo.toy.pretrain {evaluator,backbone,vae,generator,all} [--minutes M | --steps N]``

Regenerates the shipped toy models in ``vipo/toy/assets`` (or ``--out``), each within a
wall-clock budget (or an exact step count: a card's ``steps`` reproduces its run), with a
progress bar, a ``train_log.csv`` and ``loss.png`` beside the weights. ``generator`` trains
the VAE first (its latents are the generator's data) unless ``--reuse-vae``; ``all`` trains
every model and then measures them (``python -m vipo.toy.measure all``), which writes the
figures into the cards. All training is fp32 on the CPU, on renders of the training split.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import models, world

# ---- shared ---------------------------------------------------------------------------------


def training_renders() -> tuple[torch.Tensor, torch.Tensor, list]:
    """Every training-split combination once: renders are deterministic, so this is the
    whole training set. (N, 3, 32, 32) images, (N, 32, 32) masks, N specs."""
    specs = world.train_specs()
    images, masks = world.render_batch(specs, models.IMAGE_SIZE)
    return images, masks, specs


def label_tensor(specs: list) -> torch.Tensor:
    """(N, 5) class indices in world.ATTRIBUTES order."""
    return torch.tensor([list(s.labels().values()) for s in specs])


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild corruptions a generator's samples show (blur, noise, colour drift), so the
    evaluator and backbone are not thrown by them; geometry is untouched (position is a
    label)."""
    b = images.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = images + u(0, 0.8, 1, 1, 1) * (blurred - images)
    x = (x - 0.5) * u(0.85, 1.15, 1, 1, 1) + 0.5 + u(-0.06, 0.06, 1, 1, 1)
    x = x * u(0.93, 1.07, 3, 1, 1)
    x = x + u(0, 0.08, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


@dataclass(frozen=True)
class Limit:
    """How long a model trains: ``steps`` if given, else ``minutes`` of wall time."""
    minutes: float
    steps: int | None = None


class BudgetLoop:
    """Steps until the limit is reached: tqdm bar, CSV log, loss curve."""

    def __init__(self, out: Path, limit: Limit, desc: str):
        from tqdm.auto import tqdm

        self.out, self.limit, self.start = out, limit, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "train_log.csv").open("w", newline="")
        self.writer = csv.writer(self.log)
        self.writer.writerow(["iteration", "loss", "seconds"])
        self.bar = tqdm(desc=desc, unit="step", dynamic_ncols=True, mininterval=5.0)
        self.step = 0

    def running(self) -> bool:
        if self.limit.steps is not None:
            return self.step < self.limit.steps
        return self.seconds < self.limit.minutes * 60.0

    def record(self, loss: float) -> None:
        self.step += 1
        self.bar.update(1)
        self.last = loss
        if self.step % 10 == 0:
            self.writer.writerow([self.step, f"{loss:.6f}", f"{self.seconds:.1f}"])
            self.bar.set_postfix(loss=f"{loss:.4f}")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> dict:
        from ..plots import plot_curves

        self.bar.close()
        if self.step % 10:  # the last step, when the every-10 log missed it
            self.writer.writerow([self.step, f"{self.last:.6f}", f"{self.seconds:.1f}"])
        self.log.close()
        if self.step:
            plot_curves(self.out / "train_log.csv", self.out / "loss.png", keys=("loss",))
        return {"steps": self.step, "seconds": round(self.seconds, 1)}


def machine() -> str:
    """The CPU's model name, the thread count and the torch version, for the cards."""
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32"


def write_training(folder: Path, info: dict) -> None:
    """training.json: what the card's training paragraph is written from."""
    (folder / "training.json").write_text(json.dumps({**info, "machine": machine()}, indent=1))


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)


def _warmup(step: int, total: int = 100) -> float:
    return min(1.0, (step + 1) / total)


def fit(loop: BudgetLoop, params: list, lr: float, batch_loss, *, clip: float | None = None,
        clip_params: list | None = None, ema=None) -> dict:
    """The one training loop of every toy model: AdamW with a linear warm-up to ``lr``,
    ``batch_loss()`` (it draws its own batch), optional gradient clipping (of
    ``clip_params``, default all) and EMA, until the loop's limit; returns what
    ``loop.close()`` measured."""
    opt = _adamw(params, lr)
    while loop.running():
        for g in opt.param_groups:
            g["lr"] = lr * _warmup(loop.step)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip_params or params, clip)
        opt.step()
        if ema is not None:
            ema.step(params)
        loop.record(loss.item())
    return loop.close()


# ---- evaluator ------------------------------------------------------------------------------
def evaluator_loss(model, images, labels, cells) -> torch.Tensor:
    heads, mask_logits = models.split_logits(model(models.to_model_pixels(images)).logits)
    loss = sum(F.cross_entropy(logits, labels[:, i]) for i, logits in enumerate(heads.values()))
    return loss + F.binary_cross_entropy_with_logits(mask_logits, cells.float())


def train_evaluator(out: Path, limit: Limit, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, masks, specs = training_renders()
    labels, cells = label_tensor(specs), models.mask_cells(masks)
    model = models.evaluator_model(seed).train()

    def batch_loss():
        idx = torch.randint(len(specs), (128,), generator=gen)
        return evaluator_loss(model, augment(images[idx], gen), labels[idx], cells[idx])

    info = fit(BudgetLoop(out, limit, "evaluator"), list(model.parameters()), 2e-3, batch_loss)
    model.eval().save_pretrained(out, safe_serialization=True)
    write_training(out, {"model": "evaluator", "seed": seed, "batch": 128, "lr": 2e-3,
                         "data": f"{len(specs)} training-split renders, augmented", **info})


# ---- backbone -------------------------------------------------------------------------------
def backbone_loss(model, heads, images, labels, patch_cover) -> torch.Tensor:
    """Attribute classification from the CLS token and each patch's object coverage from its
    last-layer token (the features the PSM reads), so the patch features separate the
    object from the background."""
    from ..psm.backbones import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tokens = model(pixel_values=(images - mean) / std).last_hidden_state  # (B, 1 + 64, 64)
    logits = heads["cls"](tokens[:, 0])
    loss, start = 0.0, 0
    for i, n in enumerate(models.N_CLASSES.values()):
        loss = loss + F.cross_entropy(logits[:, start:start + n], labels[:, i])
        start += n
    cover = heads["patch"](tokens[:, 1:]).squeeze(-1)  # (B, 64)
    return loss + 4.0 * F.binary_cross_entropy_with_logits(cover, patch_cover)


def train_backbone(out: Path, limit: Limit, seed: int) -> None:
    from transformers import BitImageProcessor

    from ..psm.backbones import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, masks, specs = training_renders()
    labels = label_tensor(specs)
    patch = models.IMAGE_SIZE // 8
    cover = F.avg_pool2d(masks[:, None].float(), patch).flatten(1)  # (N, 64) in [0, 1]
    model = models.backbone_model(seed).train()
    heads = torch.nn.ModuleDict({"cls": torch.nn.Linear(64, models.N_ATTRIBUTE_LOGITS),
                                 "patch": torch.nn.Linear(64, 1)})
    def batch_loss():
        idx = torch.randint(len(specs), (64,), generator=gen)
        return backbone_loss(model, heads, augment(images[idx], gen), labels[idx], cover[idx])

    params = list(model.parameters())  # only these are clipped (the heads are discarded)
    info = fit(BudgetLoop(out, limit, "backbone"), params + list(heads.parameters()), 1e-3,
               batch_loss, clip=1.0, clip_params=params)
    model.eval().save_pretrained(out, safe_serialization=True)
    BitImageProcessor(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                      do_center_crop=False, do_resize=False).save_pretrained(out)
    write_training(out, {"model": "backbone", "seed": seed, "batch": 64, "lr": 1e-3,
                         "data": f"{len(specs)} training-split renders, augmented",
                         "heads (discarded)": "CLS -> attributes; patch tokens -> coverage",
                         **info})


# ---- VAE ------------------------------------------------------------------------------------
def train_vae(out: Path, limit: Limit, seed: int) -> None:
    """MSE + 1e-6 KL on [-1, 1] pixels; then the latent statistics become the config's
    scaling_factor / shift_factor (SD3's convention: z = (latent - shift) * scale)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images = training_renders()[0] * 2 - 1
    vae = models.autoencoder().train()

    def batch_loss():
        x = images[torch.randint(len(images), (32,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    info = fit(BudgetLoop(out, limit, "vae"), list(vae.parameters()), 1e-3, batch_loss)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()),
                           shift_factor=float(latents.mean()))
    vae.save_pretrained(out, safe_serialization=True)
    write_training(out, {"model": "vae", "seed": seed, "batch": 32, "lr": 1e-3,
                         "data": f"{len(images)} training-split renders", **info})


# ---- generator ------------------------------------------------------------------------------
def encode_training_set(pipe) -> dict:
    """Latents (SD3-normalised VAE means) and the pipeline's own default prompt encoding of
    every training combination, the tail of zero T5 tokens compressed (exactly)."""
    from ..adapters.repeated_context import compress_zero_tail

    images, _, specs = training_renders()
    vae = pipe.vae
    with torch.no_grad():
        raw = torch.cat([vae.encode(c * 2 - 1).latent_dist.mode() for c in images.split(256)])
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=[world.prompt(s) for s in specs],
                                                  prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False)
    context, log_count = compress_zero_tail(embeds, DEFAULT_T5_LENGTH)
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    return {"latents": latents, "context": context, "pooled": pooled, "log_count": log_count}


DEFAULT_T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


def flow_matching_loss(model, data, idx, gen, shift: float = 3.0) -> torch.Tensor:
    """Rectified flow: z_t = (1 - t) x0 + t eps, target v = eps - x0 (x0 = z_t - t v, the
    convention the adapters sample with); t is logit-normal, shifted like the sampler."""
    x0 = data["latents"][idx]
    u = torch.sigmoid(torch.randn(len(idx), generator=gen))
    t = shift * u / (1 + (shift - 1) * u)
    eps = torch.randn(x0.shape, generator=gen)
    zt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = model(hidden_states=zt, timestep=1000 * t, encoder_hidden_states=data["context"][idx],
              pooled_projections=data["pooled"][idx], return_dict=False,
              joint_attention_kwargs={"context_log_count": data["log_count"]})[0]
    return F.mse_loss(v, eps - x0)


def train_generator(out: Path, limit: Limit, seed: int, vae_folder: Path) -> None:
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    from ..adapters.repeated_context import RepeatedContextJointAttnProcessor

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe = models.pipeline(AutoencoderKL.from_pretrained(vae_folder), models.transformer(seed),
                           seed)
    data = encode_training_set(pipe)
    model = pipe.transformer.train()
    model.set_attn_processor(RepeatedContextJointAttnProcessor())
    params = list(model.parameters())
    ema = EMAModel(params, decay=0.995, use_ema_warmup=True)
    n = len(data["latents"])

    def batch_loss():
        return flow_matching_loss(model, data, torch.randint(n, (64,), generator=gen), gen)

    info = fit(BudgetLoop(out / "transformer_training", limit, "generator"), params, 7e-4,
               batch_loss, clip=1.0, ema=ema)
    ema.copy_to(model.parameters())
    model.eval()  # processors are not saved: a reload gets the stock ones
    pipe.save_pretrained(out, safe_serialization=True)
    write_training(out, {"model": "generator", "seed": seed, "batch": 64, "lr": 7e-4,
                         "ema": 0.995, "t": "logit-normal, shift 3",
                         "data": f"{n} training-split combinations (latents + default "
                                 f"encode_prompt embeddings)", **info})


# ---- CLI ------------------------------------------------------------------------------------
DEFAULT_MINUTES = {"evaluator": 2.5, "backbone": 4.0, "vae": 6.0, "generator": 20.0}
TRAINERS = {"evaluator": train_evaluator, "backbone": train_backbone, "vae": train_vae}


def generator(root: Path, limit: Limit, seed: int, reuse_vae: bool, vae_limit: Limit) -> None:
    """VAE (unless reused), then the transformer on its latents; the pipeline folder is
    rewritten as a whole, so the VAE is staged outside it meanwhile."""
    vae = root / "vae"
    if not reuse_vae:
        train_vae(vae, vae_limit, seed)
    elif not (vae / "config.json").is_file():
        raise SystemExit(f"vipo.toy.pretrain generator: --reuse-vae, but there is no VAE at "
                         f"{vae}; drop --reuse-vae to train one")
    staged = root.parent / (root.name + ".vae-staged")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(vae, staged)
    train_generator(root, limit, seed, staged)
    shutil.rmtree(staged)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vipo.toy.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(DEFAULT_MINUTES) + ["all"])
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget per model (default: evaluator 2.5, backbone 4, "
                             "vae 6, generator 20)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps instead (one model only)")
    parser.add_argument("--reuse-vae", action="store_true",
                        help="generator: keep the existing VAE instead of training one first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=models.ASSETS,
                        help="assets folder (default: the shipped vipo/toy/assets)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.steps is not None and args.model == "all":
        parser.error("--steps applies to one model, not to all")
    torch.set_num_threads(args.threads)

    def limit(name):
        return Limit(args.minutes if args.minutes is not None else DEFAULT_MINUTES[name],
                     args.steps if name == args.model else None)

    names = ["evaluator", "generator", "backbone"] if args.model == "all" else [args.model]
    for name in names:
        if name == "generator":
            generator(args.root / "generator", limit("generator"), args.seed, args.reuse_vae,
                      limit("vae"))
        elif name == "vae":
            train_vae(args.root / "generator" / "vae", limit("vae"), args.seed)
        else:
            TRAINERS[name](args.root / name, limit(name), args.seed)
    if args.model == "all":
        from .measure import main as measure

        measure(["all", "--root", str(args.root)])


if __name__ == "__main__":
    main()
