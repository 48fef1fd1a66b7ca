"""Trainer configuration: dataclasses, named presets, YAML files and ``key=value`` overrides.

Every field carries its help text in ``metadata["help"]`` (units, choices, interactions);
``python -m vipo.train --help`` prints them. Field names are unique across sections, so an
override may name a field alone (``lr=1e-5``) or with its section (``train.lr=1e-5``).
``validate()`` runs before any model is loaded and names the offending field.

Preset values follow docs/method.md section 8 (``flux_vipo``, ``wan_vipo``,
``sd35_flowgrpo``); ``tiny`` is the embedded CPU default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# Wan's default negative prompt (Wan2.1 shared_config.sample_neg_prompt), used with CFG.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


# model.arch choices (the same as vipo.adapters.ARCHS, which imports model code); the video
# ones need 4k + 1 frames.
ARCHS = ("sd3", "flux", "wan", "qwenimage", "flux2", "zimage", "wan22")
VIDEO_ARCHS = ("wan", "wan22")
PIPELINE_SCHEDULE_ARCHS = ("qwenimage", "flux2", "zimage", "wan22")  # sigma_schedule=pipeline


def _interval(text: str) -> tuple:
    """``"(0, 1]"`` -> (0.0, 1.0, False, True): bounds and whether each end is included."""
    low, high = (float(v) for v in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def _in_interval(value, interval: tuple) -> bool:
    low, high, closed_low, closed_high = interval
    return (value >= low if closed_low else value > low) and \
        (value <= high if closed_high else value < high)


def _describe_interval(interval: tuple) -> str:
    low, high, closed_low, closed_high = interval
    if math.isinf(high):
        return f"must be {'>=' if closed_low else '>'} {low:g}"
    return f"must lie in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"


def _f(default, help: str, choices: tuple | None = None, bounds: str | None = None):
    """A dataclass field with its help text and what validate() allows: ``choices`` (values)
    or ``bounds``, an interval such as ``"(0, 1]"`` or ``"[2, inf)"`` (NaN never passes)."""
    meta = {"help": help, "choices": choices, "bounds": bounds and _interval(bounds)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    arch: str = _f("sd3", "adapter (vipo/adapters/<arch>.py): sd3 (SD3/3.5), flux (FLUX.1), "
                   "wan (Wan 2.1 text-to-video), qwenimage (Qwen-Image), flux2 (FLUX.2 "
                   "[klein]), zimage (Z-Image, Z-Image-Turbo), wan22 (Wan 2.2 A14B "
                   "text-to-video, two experts)", ARCHS)
    path: str = _f("toy", "hub id or local diffusers pipeline folder; 'toy' is the shipped "
                   "pretrained toy-world generator (sd3, vipo/toy); 'tiny' builds the embedded "
                   "random-weight tiny world for `arch` (vipo/tiny.py)")
    height: int = _f(64, "output height in pixels (multiple of 16)", bounds="[16, inf)")
    width: int = _f(64, "output width in pixels (multiple of 16)", bounds="[16, inf)")
    num_frames: int = _f(1, "frames per sample; video models need (num_frames - 1) % 4 == 0",
                         bounds="[1, inf)")
    guidance_scale: float = _f(1.0, "the pipeline's guidance argument. flux: distilled guidance "
                               "input (3.5 for FLUX.1-dev); sd3/wan/wan22/flux2: true CFG scale "
                               "w, v_u + w (v_c - v_u) (1 = off; flux2 step-distilled: none); "
                               "qwenimage: true_cfg_scale (1 = off), rescaled to the conditional "
                               "norm per token; zimage: v_c + w (v_c - v_u) (0 = off). The "
                               "unconditional branch runs without grad", bounds="[0, inf)")
    guidance_scale_2: float = _f(0.0, "wan22: CFG scale of the low-noise expert's steps (0: "
                                 "guidance_scale)", bounds="[0, inf)")
    experts: list = _f(["high", "low"], "wan22: the experts trained, high (transformer, the "
                       "high-noise steps) and/or low (transformer_2); each sample's trained steps "
                       "are drawn from the steps they own (vipo/experts.py)")
    negative_prompt: str = _f("", "negative prompt of the CFG unconditional branch (not flux)")
    max_sequence_length: int = _f(512, "token length of prompt embeddings (T5, or the LLM text "
                                  "encoder's; qwenimage and zimage keep up to this many)",
                                  bounds="[1, inf)")
    precision: str = _f("auto", "auto: bf16 autocast on GPU, fp32 on CPU; fp32; bf16 (GPU "
                        "only: bf16 on CPU is ~25x slower, docs/environment.md)",
                        ("auto", "fp32", "bf16"))
    gradient_checkpointing: bool = _f(False, "recompute transformer activations in backward")
    trust_remote_code: bool = _f(False, "let from_pretrained run Python code shipped with a "
                                 "hub model (off: only safetensors/config files are used)")


@dataclass
class SampleConfig:
    num_steps: int = _f(8, "T_s: SDE sampling steps per rollout (>= 2; the last is not trained)",
                        bounds="[2, inf)")
    sigma_schedule: str = _f("dance", "dance: s_k = 1 - k/T_s, shifted (DanceGRPO/ViPO); "
                             "diffusers: FlowMatchEulerDiscreteScheduler's levels (Flow-GRPO), "
                             "docs/method.md 1; pipeline: the levels the model's own diffusers "
                             "pipeline steps through at this size and T_s (its scheduler, "
                             "dynamic shift included; qwenimage, flux2, zimage, wan22)",
                             ("dance", "diffusers", "pipeline"))
    shift: float = _f(3.0, "timestep shift: sigma = shift*s / (1 + (shift - 1)*s) (not used by "
                      "sigma_schedule=pipeline)", bounds="(0, inf)")
    timestep_input: str = _f("int", "model timestep 1000*sigma: int truncates it (DanceGRPO/ViPO),"
                             " float passes it as is (Flow-GRPO); step maths always uses the "
                             "untruncated sigma", ("int", "float"))
    sde: str = _f("dance", "SDE noise form: dance (eta) or flow (noise_level a), docs/method.md 1",
                  ("dance", "flow"))
    eta: float = _f(0.3, "DanceGRPO noise scale eta (sde=dance)", bounds="(0, inf)")
    noise_level: float = _f(0.7, "Flow-GRPO noise level a (sde=flow)", bounds="(0, inf)")
    group_size: int = _f(12, "G: samples per prompt; advantages are normalised within a group",
                         bounds="[2, inf)")
    prompts_per_iter: int = _f(1, "prompts drawn per iteration on each process", bounds="[1, inf)")
    same_init_noise: bool = _f(True, "a group shares z_0 and differs only in SDE noise")
    sample_batch_size: int = _f(12, "rollout micro-batch (samples per forward pass)",
                                bounds="[1, inf)")
    decode_from: str = _f("x0_pred", "x0_pred: decode x0 of the last step (DanceGRPO/ViPO); "
                          "last_sample: decode z_T (Flow-GRPO)", ("x0_pred", "last_sample"))
    prompts: str = _f("builtin", "prompt source: 'builtin' (a short in-code list), 'toy' (the "
                      "toy world's training-split prompts), 'toy_heldout' (its held-out "
                      "prompts) or a .txt file with one prompt per line (e.g. HPDv2 prompts)")


@dataclass
class RewardConfig:
    reward: list = _f(["redness"], "reward names, comma separated: registry names (redness, "
                      "jpeg_compressibility, jpeg_incompressibility, clip_score, pickscore, "
                      "hpsv2, imagereward) or module:function factories")
    reward_weights: list = _f([], "one weight per reward (> 0); empty means all 1")
    multi_reward: str = _f("per_reward", "per_reward: one advantage and loss term per reward "
                           "(docs/method.md 5); sum_rewards: weighted sum, then one advantage",
                           ("per_reward", "sum_rewards"))
    eps_std: float = _f(1e-8, "added to the reward std in the advantage (Flow-GRPO: 1e-4)",
                        bounds="(0, inf)")
    std_scope: str = _f("group", "std of the advantage: group (DanceGRPO/ViPO) or batch, all "
                        "rewards of the iteration on all processes (Flow-GRPO)",
                        ("group", "batch"))
    nonfinite_reward: str = _f("raise", "a NaN/inf reward raises naming the sample, or "
                               "drop_group drops its group and counts it", ("raise", "drop_group"))
    clip_model: str = _f("openai/clip-vit-large-patch14", "CLIPModel folder or hub id for "
                         "clip_score")
    pickscore_model: str = _f("yuvalkirstain/PickScore_v1", "CLIPModel folder or hub id for "
                              "pickscore")
    pickscore_processor: str = _f("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIPProcessor "
                                  "folder or hub id for pickscore")
    video_aggregate: str = _f("mean", "how per-frame image rewards become a video reward",
                              ("mean", "min", "max"))
    video_frame_stride: int = _f(1, "score every n-th frame of a video", bounds="[1, inf)")
    max_dropped_iters: int = _f(3, "stop after this many iterations in a row in which "
                                "nonfinite_reward=drop_group dropped every group",
                                bounds="[1, inf)")


@dataclass
class PSMConfig:
    backbone: str = _f("facebook/dinov2-large", "PSM vision backbone folder or hub id; 'toy' "
                       "is the shipped Dinov2Model trained on the toy world (vipo/toy); 'tiny' "
                       "builds the embedded random Dinov2Model (vipo/tiny.py)")
    n_components: int = _f(3, "K: PCA components of the allocation map (docs/method.md 6)",
                           bounds="[1, inf)")
    aggregation: str = _f("weighted", "weighted (by explained variance), average, first_pc",
                          ("weighted", "average", "first_pc"))
    psm_sigma: float = _f(1.0, "Gaussian smoothing of the patch map, in patches (0 = off)",
                          bounds="[0, inf)")
    temporal_sigma: float = _f(0.3, "video: Gaussian smoothing of the map along latent time, "
                               "in latent frames (docs/method.md 6)", bounds="[0, inf)")
    joint_pca: bool = _f(False, "video: one PCA basis over all frames of a clip (beyond the "
                         "paper; stops per-frame flicker)")
    map_norm: str = _f("minmax", "minmax (paper); mean_one: M/mean(M); floor: alpha + (1 - "
                       "alpha) M (docs/method.md 6)", ("minmax", "mean_one", "floor"))
    map_floor: float = _f(0.0, "alpha of map_norm=floor, in [0, 1]", bounds="[0, 1]")
    map_source: str = _f("psm", "where the map comes from (docs/method.md): psm (the "
                         "backbone's, the paper); uniform (ones); oracle (the prompt's rendered "
                         "object mask, toy-world prompts only); inverted (1 - the PSM map); "
                         "random_backbone (the backbone's architecture with random weights)",
                         ("psm", "uniform", "oracle", "inverted", "random_backbone"))


@dataclass
class TrainConfig:
    algorithm: str = _f("vipo", "vipo: advantage x PSM map; grpo: plain GRPO (map = 1)",
                        ("vipo", "grpo"))
    ratio_level: str = _f("position", "likelihood ratio per latent position (ViPO) or per "
                          "sample (Flow-GRPO/DanceGRPO), docs/method.md 3", ("position", "sample"))
    clip_range: float = _f(1e-4, "PPO epsilon; see docs/method.md 11.2 for the position level",
                           bounds="(0, inf)")
    adv_clip: float = _f(5.0, "advantages are clipped to [-adv_clip, adv_clip]", bounds="(0, inf)")
    kl_coef: float = _f(0.0, "weight of the exact Gaussian KL to the initial model "
                        "(docs/method.md 4); a Flow-GRPO kl_coef corresponds to "
                        "kl_coef * |delta| / C here",
                        bounds="[0, inf)")
    timestep_fraction: float = _f(0.6, "share of the T_s - 1 trainable steps trained per sample",
                                  bounds="(0, 1]")
    timestep_order: str = _f("random", "random: a random subset per sample, "
                             "floor((T_s-1)*fraction) steps (DanceGRPO/ViPO); first: the first "
                             "min(T_s-1, floor(T_s*fraction)) steps in order (Flow-GRPO)",
                             ("random", "first"))
    train_batch_size: int = _f(1, "training micro-batch (samples per forward/backward)",
                               bounds="[1, inf)")
    grad_accum: int = _f(4, "samples per optimiser step (a multiple of train_batch_size)",
                         bounds="[1, inf)")
    max_grad_norm: float = _f(1.0, "gradient-norm clip before each optimiser step",
                              bounds="(0, inf)")
    lr: float = _f(1e-5, "AdamW learning rate (constant after lr_warmup_steps)",
                   bounds="(0, inf)")
    lr_warmup_steps: int = _f(0, "optimiser steps of linear LR warm-up from lr/steps to lr",
                              bounds="[0, inf)")
    max_bad_steps: int = _f(3, "a non-finite loss or gradient norm skips that optimiser step; "
                            "this many skips in a row stop the run", bounds="[1, inf)")
    adam_beta1: float = _f(0.9, "AdamW beta1", bounds="[0, 1)")
    adam_beta2: float = _f(0.999, "AdamW beta2", bounds="[0, 1)")
    weight_decay: float = _f(1e-4, "AdamW weight decay", bounds="[0, inf)")
    adam_eps: float = _f(1e-8, "AdamW epsilon", bounds="(0, inf)")
    lora_rank: int = _f(0, "0: full fine-tuning; > 0: LoRA of this rank through peft",
                        bounds="[0, inf)")
    lora_alpha: float = _f(0.0, "LoRA alpha (0 means 2 * lora_rank)", bounds="[0, inf)")
    lora_targets: list = _f([], "LoRA target module names (empty: the adapter's default)")
    ema_decay: float = _f(0.0, "EMA of the trained weights (0 = off; Flow-GRPO: 0.9)",
                          bounds="[0, 1)")
    ema_every: int = _f(1, "optimiser steps between EMA updates (Flow-GRPO: 8)", bounds="[1, inf)")
    iterations: int = _f(300, "outer iterations (rollout + optimisation)", bounds="[1, inf)")
    seed: int = _f(0, "seed of prompts, noise and step subsets (offset by process index)")
    kernel_backend: str = _f("auto", "vipo_kernels backend", ("auto", "torch", "triton", "cpp",
                                                              "cuda"))
    fsdp: bool = _f(False, "shard the transformer over the processes with torch FSDP2 "
                    "(fully_shard per block; parameters, gradients and AdamW state sharded, "
                    "also under accumulation; vipo/sharding.py); no effect with one process")
    old_log_probs: str = _f("auto", "old log-probs of the ratio: rollout (as sampled), recompute "
                            "(a no-grad forward in the training layout, so the first step's "
                            "ratios are exactly 1 even where bf16 matmuls are not "
                            "batch-invariant; one extra forward per trained step), auto "
                            "(recompute in bf16, rollout in fp32)",
                            ("auto", "rollout", "recompute"))
    onpolicy_check: str = _f("stop", "at the first iteration every ratio must start within "
                             "clip_range/10 of 1: stop (one line naming the fix) or warn; off",
                             ("stop", "warn", "off"))


@dataclass
class RunConfig:
    output_dir: str = _f("runs", "parent folder of run folders")
    run_name: str = _f("", "run folder name, which must not exist yet unless resume is given "
                       "(empty: a new unique <preset>-<date>-<time>-<n>)")
    resume: str = _f("", "continue a run in its own folder: a run folder, one of its checkpoint "
                     "folders, or 'latest' (the newest complete checkpoint under output_dir, "
                     "or of run_name when given); the saved config is the base, key=value "
                     "overrides apply on top. 'auto' (needs run_name): start-or-resume, the "
                     "one command a requeued job repeats unchanged, preset included: it "
                     "resumes run_name's newest complete checkpoint, else starts the run")
    image_every: int = _f(10, "iterations between sample grids and map overlays (0 = never)",
                          bounds="[0, inf)")
    checkpoint_every: int = _f(0, "iterations between checkpoints (0 = only at the end, "
                               "-1 = never, not even on a stop or crash)", bounds="[-1, inf)")
    checkpoint_every_minutes: float = _f(0.0, "also save a checkpoint at the end of the first "
                                         "iteration this many minutes after the last save, so "
                                         "that a kill -9 loses at most about that much (0 = off)",
                                         bounds="[0, inf)")
    keep_checkpoints: int = _f(3, "periodic checkpoints kept (the newest); the best by "
                               "best_metric and the last one written are kept as well",
                               bounds="[1, inf)")
    best_metric: str = _f("reward_mean", "metrics.csv column whose highest value marks the kept "
                          "'best' checkpoint (empty: none)")
    debug: bool = _f(False, "show full tracebacks instead of one-line errors (also --debug)")
    tensorboard: bool = _f(True, "also write TensorBoard event files")
    progress: bool = _f(True, "show the tqdm progress bar")
    cpu_threads: int = _f(0, "torch intra-op threads when running on the CPU (0: torch's "
                          "default); tiny models run faster on 1 thread than on 2 shared cores",
                          bounds="[0, inf)")


@dataclass
class EvalConfig:
    eval_every: int = _f(50, "iterations between evaluations; one also runs before the first "
                         "iteration and after the last (0 = only those two; -1 = never)",
                         bounds="[-1, inf)")
    eval_prompts: str = _f("builtin", "evaluation prompts, a prompt source like "
                           "sample.prompts (toy_heldout: the toy world's held-out prompts)")
    eval_samples: int = _f(16, "evaluation prompts used (the first n of the source, evenly "
                           "spread for toy_heldout), one sample each", bounds="[1, inf)")
    eval_rewards: list = _f([], "eval-only metrics, reward names as in reward.reward (e.g. "
                            "pickscore, imagereward, hpsv2, toy_fidelity); the training "
                            "rewards are always evaluated too")
    eval_seed: int = _f(1234, "seed of the fixed initial noise of the evaluation samples")


SECTIONS = {"model": ModelConfig, "sample": SampleConfig, "reward": RewardConfig,
            "psm": PSMConfig, "train": TrainConfig, "eval": EvalConfig, "run": RunConfig}


@dataclass
class Config:
    preset: str = "toy"
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    psm: PSMConfig = field(default_factory=PSMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> "Config":
        """A named preset (``tiny``, ``flux_vipo``, ``wan_vipo``, ``sd35_flowgrpo``)."""
        if name not in PRESETS:
            raise ConfigError(f"preset: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        cfg = cls(preset=name)
        cfg.update(PRESETS[name])
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "Config":
        """A YAML file: an optional ``preset`` key, then sections or flat field names."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({err})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: "
                              f"{getattr(err, 'problem', None) or err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        cfg = cls.from_name(data.pop("preset", DEFAULT_PRESET))
        cfg.update(data)
        return cfg

    def update(self, values: dict) -> None:
        """Sets fields from ``{section: {field: value}}`` and/or ``{field: value}``."""
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                for name, v in value.items():
                    self.set(f"{key}.{name}", v)
            else:
                self.set(key, value)

    def set(self, key: str, value) -> None:
        """Sets one field; ``value`` may be a string from the command line."""
        section, name = resolve_key(key)
        hint = _field_types(type(getattr(self, section)))[name]
        setattr(getattr(self, section), name, parse_value(f"{section}.{name}", value, hint))

    def apply_overrides(self, overrides: list[str]) -> None:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            self.set(key.strip(), value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    # ---- derived values -----------------------------------------------------------------
    @property
    def samples_per_iter(self) -> int:
        return self.sample.prompts_per_iter * self.sample.group_size

    @property
    def train_steps_per_sample(self) -> int:
        """|S_i|: trained SDE steps per sample (docs/method.md 7)."""
        n_trainable = self.sample.num_steps - 1
        if self.train.timestep_order == "first":
            return min(n_trainable, int(self.sample.num_steps * self.train.timestep_fraction))
        return int(n_trainable * self.train.timestep_fraction)

    @property
    def reward_weights(self) -> list[float]:
        return [float(w) for w in self.reward.reward_weights] or [1.0] * len(self.reward.reward)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> "Config":
        """Checks every value before anything is loaded; raises ConfigError naming the field."""
        _check_fields(self)
        _check_steps(self)
        _check_shapes(self)
        _check_experts(self)
        _check_batches(self)
        _check_rewards(self)
        return self


def _need(ok: bool, key: str, message: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}; got {value!r}")


def _check_fields(cfg: Config) -> None:
    """Each field against the ``choices`` or ``bounds`` beside it."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{section}.{f.name}"
            choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
            if choices and value not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
            if bounds:
                _need(_in_interval(value, bounds), key, _describe_interval(bounds), value)


def _check_steps(cfg: Config) -> None:
    _need(cfg.sample.sigma_schedule != "pipeline" or cfg.model.arch in PIPELINE_SCHEDULE_ARCHS,
          "sample.sigma_schedule", f"pipeline is available for arch "
          f"{', '.join(PIPELINE_SCHEDULE_ARCHS)} only (arch={cfg.model.arch})",
          cfg.sample.sigma_schedule)
    _need(cfg.train_steps_per_sample >= 1, "train.timestep_fraction",
          f"trains no step with num_steps={cfg.sample.num_steps}; raise it",
          cfg.train.timestep_fraction)


def _check_shapes(cfg: Config) -> None:
    m = cfg.model
    for key, value in [("model.height", m.height), ("model.width", m.width)]:
        _need(value % 16 == 0, key, "must be a positive multiple of 16", value)
    if m.arch in VIDEO_ARCHS:
        _need((m.num_frames - 1) % 4 == 0, "model.num_frames",
              "must satisfy (num_frames - 1) % 4 == 0 for Wan's 4x temporal VAE", m.num_frames)
    else:
        _need(m.num_frames == 1, "model.num_frames", f"must be 1 for the image model "
              f"arch={m.arch}", m.num_frames)


def _check_experts(cfg: Config) -> None:
    e = cfg.model.experts
    _need(bool(e) and set(e) <= {"high", "low"} and len(set(e)) == len(e), "model.experts",
          "must name high, low or both, once each", e)


def _check_batches(cfg: Config) -> None:
    t, n = cfg.train, cfg.samples_per_iter
    _need(t.grad_accum % t.train_batch_size == 0, "train.grad_accum",
          f"must be a multiple of train.train_batch_size={t.train_batch_size}", t.grad_accum)
    _need(n % t.grad_accum == 0, "train.grad_accum", f"must divide the {n} samples per "
          f"iteration (prompts_per_iter x group_size)", t.grad_accum)


def _check_rewards(cfg: Config) -> None:
    from .rewards import check_reward_name  # light: no model library is imported

    r = cfg.reward
    _need(len(r.reward) >= 1, "reward.reward", "must name at least one reward", r.reward)
    for name in r.reward:
        check_reward_name(name)
    for name in cfg.eval.eval_rewards:
        check_reward_name(name, field="eval.eval_rewards")
    if r.reward_weights:
        _need(len(r.reward_weights) == len(r.reward), "reward.reward_weights",
              f"must have one weight per reward ({len(r.reward)})", r.reward_weights)
        for w in r.reward_weights:
            _need(math.isfinite(float(w)) and float(w) > 0, "reward.reward_weights",
                  "must be finite numbers > 0", r.reward_weights)


# ---- keys, types and parsing ----------------------------------------------------------------
# What a checkpoint's weights and optimiser were built for: a resumed run keeps these.
FIXED_ON_RESUME = ("model.arch", "model.path", "train.lora_rank", "train.lora_alpha",
                   "train.lora_targets")


def check_resume_compatible(saved: Config, cfg: Config) -> None:
    """A resumed run's config ``cfg`` against the run's saved one: the fields its checkpoint
    depends on may not change (ConfigError naming the first that does)."""
    for key in FIXED_ON_RESUME:
        section, name = key.split(".")
        before, after = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if before != after:
            raise ConfigError(f"{key}: cannot change on resume (the run's checkpoints were "
                              f"trained with {before!r}, not {after!r}); resume without it, "
                              f"or start a new run (another run_name)")


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def all_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """``{field name: (section, Field)}`` over every section."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"field name {f.name} is not unique across sections"
            out[f.name] = (section, f)
    return out


def resolve_key(key: str) -> tuple[str, str]:
    fields = all_fields()
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {key!r}; sections: "
                              f"{', '.join(SECTIONS)}")
        if name not in fields or fields[name][0] != section:
            raise ConfigError(f"unknown config field {key!r}; see --help")
        return section, name
    if key not in fields:
        raise ConfigError(f"unknown config field {key!r}; see --help for the field list")
    return fields[key][0], key


def parse_value(key: str, value, hint):
    """Converts ``value`` (a CLI string or a YAML value) to the field type ``hint``."""
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: cannot use {value!r} ({err})") from None
    raise ConfigError(f"{key}: unsupported field type {hint}")


def help_text(cfg: "Config | None" = None) -> str:
    """The ``--help`` listing: usage, presets, then every field with the value it has in
    ``cfg`` (the preset or file that would run, after overrides) and its help."""
    cfg = cfg or Config.from_name(DEFAULT_PRESET)
    lines = [
        "usage: python -m vipo.train [PRESET | CONFIG.yaml] [key=value ...] [--debug]",
        "",
        "RL post-training (GRPO / ViPO) of diffusers flow-matching generators.",
        f"With no arguments, trains the `{DEFAULT_PRESET}` preset (ViPO on the shipped toy world, "
        "CPU).",
        "",
        "presets: " + ", ".join(f"{p} (not run at real size)" if p in NOT_RUN_AT_REAL_SIZE else p
                                for p in PRESETS),
        "keys: a field name alone (lr=1e-5) or with its section (train.lr=1e-5); "
        "lists are comma separated.",
        "--debug: full tracebacks instead of one-line errors.",
        "",
        f"values below: preset {cfg.preset!r} with the given overrides",
    ]
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, list):
                value = ",".join(map(str, value))
            lines.append(f"  {f.name} (default {value!r})")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def preset_yaml(name: str) -> str:
    """configs/<name>.yaml: the preset written out in full, generated from PRESETS."""
    return (f"# Preset `{name}` written out in full (python -m vipo.train configs/{name}.yaml).\n"
            f"# Generated from vipo/config.py PRESETS by `python -m vipo.config`; do not edit.\n"
            + Config.from_name(name).to_yaml())


def write_preset_yamls(folder) -> list:
    """Regenerates configs/*.yaml from PRESETS; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PRESETS:
        path = folder / f"{name}.yaml"
        path.write_text(preset_yaml(name), encoding="utf-8")
        paths.append(path)
    return paths


# ---- presets --------------------------------------------------------------------------------
DEFAULT_PRESET = "toy"
PRESETS: dict[str, dict] = {
    # The main job: ViPO with the redness reward (docs/method.md 10) on the shipped pretrained
    # toy generator, with the toy DINOv2 as PSM backbone and the toy evaluator judging
    # held-out prompts out of domain (docs/toy_world.md). Departures from the paper's recipe,
    # each measured on 2 CPU cores: eta 0.7 (paper 0.3) so that a group's 8-step samples
    # differ (the preset's sampler still scores 100% fidelity on held-out prompts, see the
    # generator card); clip_range 1 (paper 1e-4), chosen from the `clip` sweep
    # (docs/toy_world.md): at the position level 1e-4 to 0.02 learned nothing in 60
    # iterations, 0.2 was 3-5x slower than no clip, and 1 was as fast as no clip within seeds,
    # kept 0.2's structure at equal gain and still clipped the 0.2% most-moved positions;
    # lr 1e-4 on the 2.3M-parameter transformer, so that redness moves within tens of
    # iterations.
    "toy": {
        "model": {"arch": "sd3", "path": "toy", "height": 32, "width": 32,
                  "max_sequence_length": 256, "precision": "fp32"},
        "sample": {"num_steps": 8, "shift": 3.0, "eta": 0.7, "group_size": 8,
                   "prompts_per_iter": 2, "sample_batch_size": 16, "prompts": "toy"},
        "reward": {"reward": ["redness"]},
        "psm": {"backbone": "toy"},
        "train": {"algorithm": "vipo", "ratio_level": "position", "lr": 1e-4,
                  "clip_range": 1.0, "train_batch_size": 4, "grad_accum": 4,
                  "timestep_fraction": 0.6, "iterations": 100},
        "eval": {"eval_every": 10, "eval_prompts": "toy_heldout", "eval_samples": 32,
                 "eval_rewards": ["toy_fidelity"]},
        "run": {"image_every": 20, "cpu_threads": 2},
    },
    # Embedded CPU default: tiny random SD3-architecture world, redness reward, tiny DINOv2.
    # Departures from the paper's recipe, chosen by measurement on the development machine
    # (2 CPU cores) so that the reward visibly moves within minutes: clip_range 0.5 (the
    # position-level ratios of a random model clip almost everywhere at 1e-4, docs/method.md 11.2),
    # lr 3e-3 on an 80k-parameter model, eta 0.7, every trainable step trained, one thread.
    "tiny": {
        "model": {"arch": "sd3", "path": "tiny", "height": 64, "width": 64,
                  "max_sequence_length": 64, "precision": "fp32"},
        "sample": {"num_steps": 6, "shift": 3.0, "eta": 0.7, "group_size": 8,
                   "prompts_per_iter": 2, "sample_batch_size": 16, "prompts": "builtin"},
        "reward": {"reward": ["redness"]},
        "psm": {"backbone": "tiny"},
        "train": {"algorithm": "vipo", "ratio_level": "position", "lr": 3e-3,
                  "clip_range": 0.5, "train_batch_size": 4, "grad_accum": 4,
                  "timestep_fraction": 1.0, "iterations": 600},
        "eval": {"eval_every": 0, "eval_samples": 8},
        "run": {"image_every": 50, "cpu_threads": 1},
    },
    # docs/method.md 8, column flux_vipo (ViPO's Flux script): FLUX.1-dev, HPSv2.1, DINOv2-L.
    "flux_vipo": {
        "model": {"arch": "flux", "path": "black-forest-labs/FLUX.1-dev", "height": 512,
                  "width": 512, "guidance_scale": 3.5, "max_sequence_length": 512,
                  "gradient_checkpointing": True},
        "sample": {"num_steps": 8, "sigma_schedule": "dance", "shift": 3.0, "sde": "dance",
                   "eta": 0.3, "group_size": 12, "prompts_per_iter": 1, "same_init_noise": True,
                   "sample_batch_size": 4, "decode_from": "x0_pred"},
        "reward": {"reward": ["hpsv2"], "eps_std": 1e-8},
        "psm": {"backbone": "facebook/dinov2-large", "n_components": 3,
                "aggregation": "weighted", "psm_sigma": 1.0},
        "train": {"algorithm": "vipo", "ratio_level": "position", "clip_range": 1e-4,
                  "adv_clip": 5.0, "timestep_fraction": 0.6, "lr": 1e-5, "grad_accum": 4,
                  "max_grad_norm": 1.0, "iterations": 300, "fsdp": True},
        # The paper's out-of-domain columns (Table 1): PickScore and ImageReward.
        "eval": {"eval_every": 25, "eval_samples": 16, "eval_rewards": ["pickscore",
                                                                        "imagereward"]},
        "run": {"image_every": 10, "checkpoint_every": 50},
    },
    # docs/method.md 8, column wan_vipo (ViPO's Wan script); the paper trains the 14B model.
    "wan_vipo": {
        "model": {"arch": "wan", "path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "height": 240,
                  "width": 416, "num_frames": 53, "guidance_scale": 5.0,
                  "negative_prompt": WAN_NEGATIVE_PROMPT, "max_sequence_length": 512,
                  "gradient_checkpointing": True},
        "sample": {"num_steps": 16, "sigma_schedule": "dance", "shift": 8.0, "sde": "dance",
                   "eta": 0.25, "group_size": 8, "prompts_per_iter": 1, "same_init_noise": True,
                   "sample_batch_size": 1, "decode_from": "x0_pred"},
        # The paper's VideoAlign VQ + MQ (1.0/1.0) is not packaged; register it as
        # module:function and set reward_weights=1,1.
        "reward": {"reward": ["pickscore"], "eps_std": 1e-8, "video_frame_stride": 4},
        "psm": {"backbone": "facebook/dinov2-large", "n_components": 3,
                "aggregation": "weighted", "psm_sigma": 1.0},
        "train": {"algorithm": "vipo", "ratio_level": "position", "clip_range": 1e-4,
                  "adv_clip": 5.0, "timestep_fraction": 0.6, "lr": 5e-6, "grad_accum": 4,
                  "max_grad_norm": 1.0, "iterations": 10000, "fsdp": True},
        "run": {"image_every": 10, "checkpoint_every": 100},
    },
    # docs/method.md 8, column sd35_flowgrpo (Flow-GRPO config/grpo.py): the GRPO baseline.
    # 6 prompts x 24 samples per process on 8 processes gives Flow-GRPO's 48 groups per
    # epoch; grad_accum = half of a process's 144 samples gives 2 optimiser steps per epoch.
    "sd35_flowgrpo": {
        "model": {"arch": "sd3", "path": "stabilityai/stable-diffusion-3.5-medium",
                  "height": 512, "width": 512, "guidance_scale": 4.5,
                  "max_sequence_length": 256},
        "sample": {"num_steps": 10, "sigma_schedule": "diffusers", "shift": 3.0,
                   "timestep_input": "float", "sde": "flow", "noise_level": 0.7,
                   "group_size": 24, "prompts_per_iter": 6, "same_init_noise": False,
                   "sample_batch_size": 8, "decode_from": "last_sample"},
        "reward": {"reward": ["pickscore"], "eps_std": 1e-4, "std_scope": "batch"},
        "train": {"algorithm": "grpo", "ratio_level": "sample", "clip_range": 1e-4,
                  "adv_clip": 5.0, "timestep_fraction": 0.99,
                  # Flow-GRPO's PickScore kl_coef 0.01 times |delta| / C (docs/method.md 4) with
                  # the mean trained |delta| ~ 0.11 over 10 steps and C = 16.
                  "kl_coef": 7e-5,
                  "timestep_order": "first", "lr": 3e-4, "lora_rank": 32, "lora_alpha": 64,
                  "train_batch_size": 8, "grad_accum": 72, "max_grad_norm": 1.0,
                  "ema_decay": 0.9, "ema_every": 8, "iterations": 1000},
        "run": {"image_every": 10, "checkpoint_every": 50},
    },
}


# ---- the newer generators (vipo/adapters/qwenimage.py, flux2.py, zimage.py, wan22.py) --------
# Each model's published inference settings (the hub checkpoint, resolution, guidance, negative
# prompt, text length; its own pipeline's sigma levels, so its shift, through
# sigma_schedule=pipeline, with the float timestep the pipeline passes) and the ViPO recipe of
# flux_vipo / wan_vipo for the RL side (T_s 8 for images and 16 for video instead of the
# pipelines' 50 / 40 inference steps; the step-distilled Z-Image-Turbo keeps its 8). LoRA
# (r32/a64, lr 3e-4 as sd35_flowgrpo) for the 20B Qwen-Image and the two 14B Wan 2.2 experts,
# full fine-tuning (lr 1e-5 as flux_vipo) for the 4B and 6B models. None of these has been run
# at real size (no GPU here); each trains at tiny size (`tiny arch=...`) in the tests.
NOT_RUN_AT_REAL_SIZE = ("qwenimage_vipo", "flux2_klein_vipo", "zimage_vipo", "wan22_vipo")
_IMAGE_RL = {"sde": "dance", "eta": 0.3, "group_size": 12, "prompts_per_iter": 1,
             "same_init_noise": True, "sample_batch_size": 4, "decode_from": "x0_pred",
             "sigma_schedule": "pipeline", "timestep_input": "float"}
_VIPO_TRAIN = {"algorithm": "vipo", "ratio_level": "position", "clip_range": 1e-4,
               "adv_clip": 5.0, "timestep_fraction": 0.6, "grad_accum": 4,
               "max_grad_norm": 1.0}
_LORA = {"lora_rank": 32, "lora_alpha": 64, "lr": 3e-4}
_PSM = {"backbone": "facebook/dinov2-large", "n_components": 3, "aggregation": "weighted",
        "psm_sigma": 1.0}


def _image_vipo(model: dict, train: dict) -> dict:
    """An image preset: ``model`` (gradient checkpointing on) and the image RL recipe."""
    return {"model": {**model, "gradient_checkpointing": True},
            "sample": {**_IMAGE_RL, "num_steps": 8},
            "reward": {"reward": ["hpsv2"], "eps_std": 1e-8}, "psm": _PSM,
            "train": {**_VIPO_TRAIN, **train, "iterations": 300},
            "run": {"image_every": 10, "checkpoint_every": 50}}


PRESETS.update({
    # Qwen/Qwen-Image: 1328x1328 (its 1:1 size), true_cfg_scale 4 with the negative " ".
    "qwenimage_vipo": _image_vipo(
        {"arch": "qwenimage", "path": "Qwen/Qwen-Image", "height": 1328, "width": 1328,
         "guidance_scale": 4.0, "negative_prompt": " ", "max_sequence_length": 512}, _LORA),
    # black-forest-labs/FLUX.2-klein-base-4B: the undistilled klein, 1024x1024, CFG 4 against
    # the empty prompt (the step-distilled FLUX.2-klein-4B runs without CFG: guidance 1).
    "flux2_klein_vipo": _image_vipo(
        {"arch": "flux2", "path": "black-forest-labs/FLUX.2-klein-base-4B", "height": 1024,
         "width": 1024, "guidance_scale": 4.0, "max_sequence_length": 512}, {"lr": 1e-5}),
    # Tongyi-MAI/Z-Image-Turbo: 1024x1024, 8 steps, guidance 0 (no CFG).
    "zimage_vipo": _image_vipo(
        {"arch": "zimage", "path": "Tongyi-MAI/Z-Image-Turbo", "height": 1024, "width": 1024,
         "guidance_scale": 0.0, "max_sequence_length": 512}, {"lr": 1e-5}),
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: 480P (832x480), 81 frames, CFG 4 (high-noise expert)
    # and 3 (low-noise), the Wan negative prompt; both experts trained.
    "wan22_vipo": {
        "model": {"arch": "wan22", "path": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "height": 480,
                  "width": 832, "num_frames": 81, "guidance_scale": 4.0,
                  "guidance_scale_2": 3.0, "negative_prompt": WAN_NEGATIVE_PROMPT,
                  "max_sequence_length": 512, "gradient_checkpointing": True},
        "sample": {**_IMAGE_RL, "num_steps": 16, "eta": 0.25, "group_size": 8,
                   "sample_batch_size": 1},
        "reward": {"reward": ["pickscore"], "eps_std": 1e-8, "video_frame_stride": 4},
        "psm": _PSM, "train": {**_VIPO_TRAIN, **_LORA, "iterations": 10000},
        "run": {"image_every": 10, "checkpoint_every": 100},
    },
})


if __name__ == "__main__":
    for written in write_preset_yamls(Path(__file__).resolve().parents[1] / "configs"):
        print(f"wrote {written}")
