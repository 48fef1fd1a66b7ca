"""Training a generator made of experts that own different noise levels (Wan 2.2 A14B: the
high-noise ``transformer`` and the low-noise ``transformer_2``, vipo/adapters/wan22.py).

The experts form one module (``ExpertPair``), so one optimiser, one EMA, one checkpoint and
one sharding cover both; a step's gradient reaches only the expert that owns it, and AdamW
leaves an expert without gradient untouched in that optimiser step.

Which steps are trained: each sample's |S| steps (``train_steps_per_sample``) are drawn
from the steps the trained experts (``model.experts``) own, each expert getting a share
proportional to the steps it owns (largest remainder), and the micro-steps run the
high-noise expert's steps first. So at every position of the training loop every process
runs the same expert, which sharded training needs (an expert's blocks are gathered for
its forward, a collective) and DDP with ``find_unused_parameters`` expects. This differs
from a uniform random subset of all steps (DanceGRPO/ViPO) only in fixing how many of a
sample's steps each expert gets; each step is still trained with probability about
|S| / (T_s - 1).
"""

from __future__ import annotations

import torch

from .errors import ConfigError

EXPERTS = ("high", "low")   # train.experts names: transformer, transformer_2


def step_pools(adapter, schedule, cfg) -> list | None:
    """The trainable steps (0..T_s-2) owned by each trained expert, high-noise first, or None
    for a single-transformer model. Raises ConfigError when they are fewer than |S|."""
    owners = getattr(adapter.transformer, "owners", None)
    if owners is None:
        return None
    high = owners(schedule.timesteps[:cfg.sample.num_steps - 1]).cpu()
    pools = [torch.nonzero(mask).flatten() for name, mask in (("high", high), ("low", ~high))
             if name in cfg.model.experts]
    available = sum(len(p) for p in pools)
    if available < cfg.train_steps_per_sample:
        raise ConfigError(f"model.experts: {','.join(cfg.model.experts)} own {available} of the "
                          f"{cfg.sample.num_steps - 1} trainable steps, fewer than the "
                          f"{cfg.train_steps_per_sample} that train.timestep_fraction trains "
                          f"per sample; lower timestep_fraction or name both experts")
    return pools


def quotas(count: int, sizes: list) -> list:
    """``count`` split over pools of ``sizes`` in proportion (largest remainder; ties to the
    earlier pool), never more than a pool holds."""
    total = sum(sizes)
    shares = [count * s / total for s in sizes]
    out = [int(s) for s in shares]
    order = sorted(range(len(sizes)), key=lambda i: (out[i] - shares[i], i))
    for i in order:
        if sum(out) == count:
            break
        if out[i] < sizes[i]:
            out[i] += 1
    return out


def draw_steps(pools: list, n: int, count: int, first: bool, gen) -> torch.Tensor:
    """(n, count) trained steps: the first ``count`` owned steps in time order (``first``),
    else per sample a random subset with each pool's quota, pools in order."""
    if first:
        return torch.cat(pools)[:count].expand(n, count)
    per_pool = quotas(count, [len(p) for p in pools])
    return torch.stack([torch.cat([pool[torch.randperm(len(pool), generator=gen)[:q]]
                                   for pool, q in zip(pools, per_pool)]) for _ in range(n)])


def ddp_kwargs(cfg) -> list:
    """accelerate kwargs handlers: DDP must expect parameters a backward does not reach when
    the model has experts (each micro-step runs one of them)."""
    if cfg.model.arch != "wan22":
        return []
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


class ExpertPair(torch.nn.Module):
    """``high`` (the pipeline's transformer) for timesteps >= ``boundary``, ``low``
    (transformer_2) below; called like one WanTransformer3DModel with return_dict=False,
    routing each sample of a batch by its own timestep (read on the host: one
    synchronisation per forward). ``trained``: the experts that
    ``requires_grad_(True)``, ``add_adapter`` and the checkpoints cover."""

    def __init__(self, high, low, boundary: float, trained=EXPERTS):
        super().__init__()
        self.high, self.low = high, low
        self.boundary = float(boundary)
        self.trained = tuple(name for name in EXPERTS if name in trained)

    def experts(self, trained_only: bool = False) -> dict:
        pair = {"high": self.high, "low": self.low}
        return {k: v for k, v in pair.items() if k in self.trained or not trained_only}

    def owners(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where the high-noise expert owns the step."""
        return timestep >= self.boundary

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False,
                **kwargs):
        high = self.owners(timestep)
        if bool(high.all()) or not bool(high.any()):  # one expert: no split
            expert = self.high if bool(high.all()) else self.low
            return expert(hidden_states=hidden_states, timestep=timestep,
                          encoder_hidden_states=encoder_hidden_states, return_dict=False,
                          **kwargs)
        out = None
        for expert, rows in ((self.high, high), (self.low, ~high)):
            part = expert(hidden_states=hidden_states[rows], timestep=timestep[rows],
                          encoder_hidden_states=encoder_hidden_states[rows], return_dict=False,
                          **kwargs)[0]
            if out is None:
                out = part.new_empty((hidden_states.shape[0], *part.shape[1:]))
            out[rows] = part
        return (out,)

    # ---- what the trainer, the sharding and the checkpoints ask of a diffusers model ------
    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    @property
    def config(self):
        """The experts' shared architecture (the high-noise expert's config)."""
        return self.high.config

    def requires_grad_(self, requires_grad: bool = True):
        for name, expert in self.experts().items():
            expert.requires_grad_(requires_grad and name in self.trained)
        return self

    def add_adapter(self, config) -> None:
        for expert in self.experts(trained_only=True).values():
            expert.add_adapter(config)

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts().values():
            expert.enable_gradient_checkpointing()

    def disable_adapters(self) -> None:
        for expert in self.experts(trained_only=True).values():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.experts(trained_only=True).values():
            expert.enable_adapters()

    def shard_units(self) -> list:
        """FSDP units, innermost first: every block of both experts, then each expert."""
        from .sharding import blocks

        return blocks(self.high) + blocks(self.low) + [self.high, self.low]

    def diffusers_components(self) -> list:
        """(pipeline component, state-dict prefix, module) of each trained expert: the
        checkpoint writes them as the pipeline's ``transformer`` / ``transformer_2``."""
        folders = {"high": "transformer", "low": "transformer_2"}
        return [(folders[name], f"{name}.", expert)
                for name, expert in self.experts(trained_only=True).items()]
