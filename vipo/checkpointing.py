"""Checkpoints that resume a run exactly, written atomically.

A checkpoint folder ``<run>/checkpoints/<tag>/`` holds
  transformer/ or pytorch_lora_weights.safetensors   the trained weights, loadable by plain
                                 diffusers (``from_pretrained`` / ``pipe.load_lora_weights``)
  ema.safetensors                the EMA weights, when enabled
  optimizer.pt                   AdamW state (tensors and numbers only: torch.load with
                                 weights_only=True reads it)
  rng_<process>.pt               every RNG state of each process (torch, CUDA, numpy, Python,
                                 the trainer's own generator)
  state.json                     counters, data order, LR scheduler, EMA counters, metric
Everything is written into ``.partial-<tag>/`` first, each file fsync'ed, and the folder is
renamed into place last: a checkpoint counts only when its ``state.json`` says complete,
so a crash or a kill during the save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import sharding
from .errors import CheckpointError

STATE = "state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights finds it


# ---- finding checkpoints --------------------------------------------------------------------
def read_state(folder: Path) -> dict | None:
    """The checkpoint's state.json, or None when it is missing, unreadable or incomplete."""
    try:
        state = json.loads((Path(folder) / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("complete") is True else None


def complete_checkpoints(run_dir) -> list[Path]:
    """The run's complete checkpoints, oldest first (by iteration; ``final`` last on a tie)."""
    found = []
    root = Path(run_dir) / "checkpoints"
    for folder in root.glob("*"):
        # .old-<tag> is a complete checkpoint that a kill caught while a new <tag> replaced it
        stale = folder.name.startswith(".old-") and not (root / folder.name[5:]).exists()
        state = read_state(folder) if stale or not folder.name.startswith(".") else None
        if state is not None:
            found.append((state["iteration"], folder.name == "final", folder))
    return [folder for *_, folder in sorted(found)]


# ---- atomic writing -------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders themselves (so renames persist)."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        _fsync(path)


def _commit(partial: Path, final: Path) -> None:
    """Renames the finished ``partial`` folder to ``final`` (replacing an older one)."""
    _fsync_tree(partial)
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    os.replace(partial, final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- save ------------------------------------------------------------------------------------
@dataclass
class Trained:
    """What a checkpoint holds besides the run state: the (maybe sharded) model, its
    optimiser and EMA, and how its weights are written (LoRA: through the pipeline class's
    ``save_lora_weights``, so that ``pipe.load_lora_weights`` reads them)."""
    accelerator: object
    model: torch.nn.Module
    optimizer: object
    ema: object = None
    lora_pipeline: type | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def trained_names(self) -> list:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]


def save_checkpoint(folder: Path, parts: Trained, state: dict, rng: dict) -> Path:
    """Writes the checkpoint ``folder`` (every process must call this; the gathers are
    collectives). state: the JSON run state (vipo.run_state); rng: this process's RNG."""
    acc = parts.accelerator
    final = Path(folder)
    partial = final.with_name(f".partial-{final.name}")
    acc.wait_for_everyone()
    weights = sharding.model_state_dict(parts.module, acc.is_main_process)
    ema = _ema_tensors(parts)
    optimizer = _optimizer_state(parts)
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng, partial / f"rng_{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_weights(parts, partial, weights)
        if ema is not None:
            save_file(ema, partial / "ema.safetensors")
        torch.save(optimizer, partial / "optimizer.pt")
        full = {**state, "tag": final.name, "num_processes": acc.num_processes,
                "complete": True}
        (partial / STATE).write_text(json.dumps(full, indent=1, allow_nan=True))  # last file
        _commit(partial, final)
    acc.wait_for_everyone()
    return final


def _write_weights(parts: Trained, folder: Path, weights: dict) -> None:
    model = parts.module
    if parts.lora_pipeline is not None:
        from peft.utils import get_peft_model_state_dict

        lora = get_peft_model_state_dict(model, state_dict=weights)
        parts.lora_pipeline.save_lora_weights(
            folder, transformer_lora_layers={k: v.contiguous().cpu() for k, v in lora.items()},
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
            safe_serialization=True)
    else:
        write_diffusers_model(model, weights, folder / "transformer")


def write_diffusers_model(model, weights: dict, folder: Path, max_shard_size="10GB") -> None:
    """A diffusers model folder (config.json + safetensors, an index when split) holding
    ``weights``, the full tensors. diffusers' own ``save_pretrained(state_dict=...)``
    (0.42.1) ignores the given state dict and writes the module's (local, sharded)
    tensors, so the files are written here in its layout instead."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    weights = {k: v.contiguous() for k, v in weights.items()}
    split = split_torch_state_dict_into_shards(
        weights, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: weights[n] for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps(index, indent=2))


def _ema_tensors(parts: Trained) -> dict | None:
    """The EMA weights as full CPU tensors by parameter name (a collective when sharded)."""
    if parts.ema is None:
        return None
    return {n: sharding.full_tensor(p.detach()).contiguous().cpu()
            for n, p in zip(parts.trained_names(), parts.ema.shadow_params)}


def _optimizer_state(parts: Trained) -> dict:
    if sharding.is_sharded(parts.model):  # a collective: every process takes part
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        return get_optimizer_state_dict(parts.model, parts.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return parts.optimizer.state_dict()


# ---- load ------------------------------------------------------------------------------------
def load_checkpoint(folder: Path, parts: Trained) -> tuple[dict, dict | None]:
    """Restores weights, EMA and optimiser from ``folder``; returns (its state.json, this
    process's RNG states, or None when the checkpoint was written by another number of
    processes). Raises CheckpointError naming the file that is missing or corrupt."""
    folder = Path(folder)
    state = read_state(folder)
    if state is None:
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete or has no readable "
                              f"{STATE}")
    acc = parts.accelerator
    main = acc.is_main_process or not sharding.is_sharded(parts.model)
    if parts.lora_pipeline is not None:
        lora = _read_safetensors(folder / LORA_FILE) if main else {}
        weights = _lora_to_model_keys(parts.module, lora)
        where = folder / LORA_FILE
    else:
        weights = _read_full(folder / "transformer") if main else {}
        where = folder / "transformer"
    missing, unexpected = sharding.load_model_state_dict(parts.module, weights)
    trained = set(parts.trained_names())
    if unexpected or (parts.lora_pipeline is None and missing) or \
            (parts.lora_pipeline is not None and trained & set(missing)):
        raise CheckpointError(f"checkpoint {str(where)!r} does not match the model: missing "
                              f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    if parts.ema is not None:
        ema = _read_safetensors(folder / "ema.safetensors")
        shadow = [sharding.like(ema[n], p)
                  for n, p in zip(parts.trained_names(), parts.ema.shadow_params)]
        parts.ema.load_state_dict({**state["ema"], "shadow_params": shadow})
    _load_optimizer(parts, _torch_load(folder / "optimizer.pt"))
    rng = None
    if state["num_processes"] == acc.num_processes:
        rng = _torch_load(folder / f"rng_{acc.process_index}.pt")
    else:
        import logging

        logging.getLogger("vipo").warning(
            "checkpoint %s was written by %d processes, this run has %d: RNG streams restart "
            "from the seed, so the run goes on but not bit-identically", folder,
            state["num_processes"], acc.num_processes)
    return state, rng


def _lora_to_model_keys(model, lora: dict) -> dict:
    """diffusers' LoRA file keys (``transformer.<module>.lora_A.weight``) -> the model's
    own parameter names (peft's ``.default`` adapter name inserted)."""
    names = {n.replace(".default", ""): n for n in model.state_dict() if "lora_" in n}
    out = {}
    for key, value in lora.items():
        name = key.removeprefix("transformer.")
        if name not in names:
            raise CheckpointError(f"LoRA weight {key!r} of the checkpoint is not in the model "
                                  f"(another lora_rank or lora_targets?)")
        out[names[name]] = value
    return out


def _read_full(folder: Path) -> dict:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    weights = {}
    for name in files:
        weights.update(_read_safetensors(folder / name))
    return weights


def _load_optimizer(parts: Trained, optimizer_state: dict) -> None:
    if sharding.is_sharded(parts.model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(parts.model, parts.optimizer.optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True,
                                                          broadcast_from_rank0=True))
    else:
        parts.optimizer.load_state_dict(optimizer_state)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated "
                              f"({err})") from None


def _torch_load(path: Path):
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        # weights_only: tensors, numbers, strings and containers only, never arbitrary objects.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated "
                              f"({type(err).__name__}: {str(err).splitlines()[0]})") from None


# ---- retention -------------------------------------------------------------------------------
def prune(run_dir, keep: int, best_metric: str) -> list[Path]:
    """Deletes periodic checkpoints beyond the newest ``keep``, sparing the best by
    ``best_metric`` (its value is stored in each state.json) and ``final``; returns those
    deleted."""
    periodic = [c for c in complete_checkpoints(run_dir) if c.name != "final"]
    kept = set(periodic[-keep:])
    scored = [(read_state(c).get("metric"), c) for c in periodic]
    scored = [(v, c) for v, c in scored if isinstance(v, (int, float)) and math.isfinite(v)]
    if best_metric and scored:
        kept.add(max(scored, key=lambda vc: vc[0])[1])
    deleted = [c for c in periodic if c not in kept]
    for folder in deleted:
        shutil.rmtree(folder)
    return deleted
