"""Sharded training with torch's FSDP2 (``fully_shard``), the same code on CPU/gloo and
GPU/nccl.

accelerate launches the processes and keeps DDP for unsharded runs, but it refuses FSDP
on the CPU, so the project applies ``fully_shard`` itself (``train.fsdp=true``): one FSDP
unit per transformer block plus the root, parameters, gradients and AdamW state sharded
over the processes. Gradients are reduce-scattered after every backward, also under
gradient accumulation, so a process holds a shard of them, never the whole model's.

Checkpoints hold full tensors (``full_state_dict``: gathered on the main process, loaded
back by broadcasting from it), so a sharded run's weights load with plain diffusers.
"""

from __future__ import annotations

import torch
from torch import nn


def blocks(model: nn.Module) -> list:
    """The transformer blocks: every element of the model's top-level ModuleLists
    (SD3/Flux ``transformer_blocks`` and ``single_transformer_blocks``, Wan ``blocks``)."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList)
            for block in child]


def shard(model: nn.Module, precision: str) -> nn.Module:
    """Shards ``model`` in place over the default process group: each block, then the
    root. bf16: parameters are gathered in bf16, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    units = blocks(model)
    if not units:
        raise ValueError(f"train.fsdp: {type(model).__name__} has no ModuleList of blocks to "
                         f"shard")
    for block in units:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param``: this process's shard of it when ``param`` is a
    DTensor, else ``full`` itself on ``param``'s device and dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full


def local_numel(t: torch.Tensor) -> int:
    """Elements this process stores for ``t`` (its shard for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """Clips sharded gradients by the norm over every shard; returns that norm (a plain
    tensor, equal on every process)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return full_tensor(norm)


def model_state_dict(model: nn.Module, main: bool) -> dict:
    """Full weights on the CPU (a collective when sharded; only ``main`` gets them)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def load_model_state_dict(model: nn.Module, weights: dict) -> tuple:
    """Loads full ``weights`` (sharded: read on the main process, broadcast from it; the
    others pass {}). Returns (missing, unexpected) keys, as ``load_state_dict``."""
    if not is_sharded(model):
        return model.load_state_dict(weights, strict=False)
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    keys = [sorted(weights)]
    dist.broadcast_object_list(keys, src=0)
    expected = set(model.state_dict())
    missing = sorted(expected - set(keys[0]))
    unexpected = sorted(set(keys[0]) - expected)
    if not unexpected:
        set_model_state_dict(model, weights, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
    return missing, unexpected
