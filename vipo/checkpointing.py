"""Checkpoints that resume a run exactly, written atomically.

A checkpoint folder ``<run>/checkpoints/<tag>/`` holds
  transformer/ or pytorch_lora_weights.safetensors   the trained weights, loadable by plain
                                 diffusers (``from_pretrained`` / ``pipe.load_lora_weights``;
                                 Wan 2.2's low-noise expert: transformer_2/ or
                                 pytorch_lora_weights_transformer_2.safetensors)
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

import errno
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
    failure = [None]
    if acc.is_main_process:
        try:
            _write_weights(parts, partial, weights)
            if ema is not None:
                save_file(ema, partial / "ema.safetensors")
            torch.save(optimizer, partial / "optimizer.pt")
            full = {**state, "tag": final.name, "num_processes": acc.num_processes,
                    "complete": True}
            (partial / STATE).write_text(json.dumps(full, indent=1, allow_nan=True))  # last
            _commit(partial, final)
        except Exception as err:  # noqa: BLE001 - every process must learn of it below
            failure = [err]
    if acc.num_processes > 1:  # the others would wait for a process that raised
        from accelerate.utils import broadcast_object_list

        failure = [None if failure[0] is None else _one_line(failure[0])]
        broadcast_object_list(failure)
    if failure[0] is not None:
        _failed_write(partial, final, failure[0])
    return final


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    full = " (No space left on device)" if getattr(err, "errno", None) == errno.ENOSPC else ""
    return f"{text[0] if text else type(err).__name__}{full}"


def _failed_write(partial: Path, final: Path, err):
    """Removes the half-written ``partial`` folder and raises CheckpointError on every
    process (``err``: the exception, or its line as the main process broadcast it); a full
    disk is named as such (torch.save reports it as ``unexpected pos``, safetensors in its
    own way)."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or \
        shutil.disk_usage(partial.parent).free < 16 * 2**20
    shutil.rmtree(partial, ignore_errors=True)
    why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if full:
        why = f"No space left on device on {str(partial.parent)!r} ({why[:200]})"
    raise CheckpointError(f"checkpoint {final.name} not saved: {why}; its half-written files "
                          f"were removed") from None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def needed_bytes(run_dir, parts: Trained) -> int:
    """The size of the next checkpoint: the last one's, or (none yet) an estimate from the
    tensors: the weights written, plus two AdamW moments and the EMA of the trained ones."""
    found = complete_checkpoints(run_dir)
    if found:
        return folder_bytes(found[-1])
    params = list(parts.module.named_parameters())
    trained = sum(p.numel() * 4 for _, p in params if p.requires_grad)
    written = trained if parts.lora_pipeline is not None else \
        sum(p.numel() * p.element_size() for _, p in params)
    return written + trained * (2 + (parts.ema is not None))


def ensure_space(run_dir, tag: str, need: int, keep: int, best_metric: str) -> str | None:
    """None when the checkpoints folder's disk has ``need`` bytes free (10% margin), pruning
    first what the next prune would delete anyway (never the newest); else the one-line
    reason, naming how much is needed and where."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".partial-*"):  # left by a kill during a save
        shutil.rmtree(stale, ignore_errors=True)
    margin = int(need * 1.1)
    if shutil.disk_usage(root).free >= margin:
        return None
    prune(run_dir, max(keep - 1, 1), best_metric)
    free = shutil.disk_usage(root).free
    if free >= margin:
        return None
    return (f"not enough disk space for checkpoint {tag}: it needs about {_size(need)}, "
            f"{_size(free)} free on {str(root)!r}; free space there or lower "
            f"run.keep_checkpoints")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def components(model) -> list:
    """(pipeline component, state-dict prefix, module) of each diffusers model the trained
    module holds: the transformer itself, or the trained experts of a vipo.experts.ExpertPair
    (written as ``transformer`` / ``transformer_2``)."""
    named = getattr(model, "diffusers_components", None)
    return named() if named is not None else [("transformer", "", model)]


def lora_file(component: str) -> str:
    """The LoRA file of a pipeline component: diffusers' default name for the transformer;
    ``pipe.load_lora_weights(folder, weight_name=..., load_into_transformer_2=True)`` reads
    transformer_2's."""
    if component == "transformer":
        return LORA_FILE
    return f"pytorch_lora_weights_{component}.safetensors"


def _write_weights(parts: Trained, folder: Path, weights: dict) -> None:
    for component, prefix, module in components(parts.module):
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if parts.lora_pipeline is not None:
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(module, state_dict=own)
            parts.lora_pipeline.save_lora_weights(
                folder, weight_name=lora_file(component),
                transformer_lora_layers={k: v.contiguous().cpu() for k, v in lora.items()},
                transformer_lora_adapter_metadata=module.peft_config["default"].to_dict(),
                safe_serialization=True)
        else:
            write_diffusers_model(module, own, folder / component)


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
    weights, written = {}, []
    for component, prefix, module in components(parts.module):
        if parts.lora_pipeline is not None:
            where = folder / lora_file(component)
            own = _lora_to_model_keys(module, _read_safetensors(where)) if main else {}
        else:
            where = folder / component
            own = _read_full(where) if main else {}
        weights.update({prefix + k: v for k, v in own.items()})
        written.append(prefix)
    missing, unexpected = sharding.load_model_state_dict(parts.module, weights)
    # Weights the checkpoint does not hold: a frozen expert's (it has no component folder).
    missing = [k for k in missing if k.startswith(tuple(written))]
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
