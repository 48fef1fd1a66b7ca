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
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE = "state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights finds it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


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


# ---- RNG states ------------------------------------------------------------------------------
def capture_rng(trainer_rng: random.Random) -> dict:
    """Every RNG state of this process, as tensors and plain numbers (weights_only-loadable)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate(), "trainer": trainer_rng.getstate()}


def restore_rng(states: dict, trainer_rng: random.Random) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, key, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuples(states["python"]))
    trainer_rng.setstate(_tuples(states["trainer"]))


def _tuples(x):
    """random.setstate needs tuples; a weights_only load may hand back lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- save ------------------------------------------------------------------------------------
def save_checkpoint(trainer, tag: str, state: dict, rng: dict | None = None) -> Path:
    """Writes checkpoint ``tag`` of ``trainer`` (every process must call this).

    state: the counters and data order (trainer.resume_state()); rng: this process's RNG
    states to store (default: the current ones)."""
    acc = trainer.accelerator
    final = trainer.run_dir / "checkpoints" / tag
    partial = final.with_name(f".partial-{tag}")
    acc.wait_for_everyone()
    weights = acc.get_state_dict(trainer.model)  # gathers FSDP shards
    optimizer = _optimizer_state(trainer)
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng or capture_rng(trainer.rng), partial / f"rng_{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_weights(trainer, partial, weights)
        torch.save(optimizer, partial / "optimizer.pt")
        full = {**state, "tag": tag, "num_processes": acc.num_processes, "complete": True}
        (partial / STATE).write_text(json.dumps(full, indent=1, allow_nan=True))  # last file
        _commit(partial, final)
    acc.wait_for_everyone()
    return final


def _write_weights(trainer, folder: Path, weights: dict) -> None:
    from safetensors.torch import save_file

    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.cfg.train.lora_rank > 0:
        from peft.utils import get_peft_model_state_dict

        lora = get_peft_model_state_dict(model, state_dict=weights)
        type(trainer.adapter.pipe).save_lora_weights(
            folder, transformer_lora_layers={k: v.contiguous().cpu() for k, v in lora.items()},
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
            safe_serialization=True)
    else:
        model.save_pretrained(folder / "transformer", state_dict=weights, safe_serialization=True)
    if trainer.ema is not None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        save_file({n: p.detach().contiguous().cpu()
                   for n, p in zip(names, trainer.ema.shadow_params)}, folder / "ema.safetensors")


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _optimizer_state(trainer) -> dict:
    acc = trainer.accelerator
    if _is_fsdp(acc):  # a collective: every process takes part (not run on this machine)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        return get_optimizer_state_dict(trainer.model, trainer.optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return trainer.optimizer.state_dict()


# ---- load ------------------------------------------------------------------------------------
def load_checkpoint(trainer, folder: Path) -> dict:
    """Restores weights, EMA, optimizer and this process's RNG from ``folder``; returns its
    state.json. Raises CheckpointError naming the file that is missing or corrupt."""
    folder = Path(folder)
    state = read_state(folder)
    if state is None:
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete or has no readable "
                              f"{STATE}")
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    if trainer.cfg.train.lora_rank > 0:
        from peft.utils import set_peft_model_state_dict

        lora = _read_safetensors(folder / LORA_FILE)
        set_peft_model_state_dict(model, {k.removeprefix("transformer."): v
                                          for k, v in lora.items()})
    else:
        _load_full(model, folder / "transformer")
    if trainer.ema is not None:
        ema = _read_safetensors(folder / "ema.safetensors")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        trainer.ema.load_state_dict({**state["ema"], "shadow_params": [ema[n] for n in names]})
    _load_optimizer(trainer, _torch_load(folder / "optimizer.pt"))
    rng_file = folder / f"rng_{acc.process_index}.pt"
    if state["num_processes"] == acc.num_processes:
        restore_rng(_torch_load(rng_file), trainer.rng)
    else:
        import logging

        logging.getLogger("vipo").warning(
            "checkpoint %s was written by %d processes, this run has %d: RNG streams restart "
            "from the seed, so the run goes on but not bit-identically", folder,
            state["num_processes"], acc.num_processes)
    return state


def _load_full(model, folder: Path) -> None:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    weights = {}
    for name in files:
        weights.update(_read_safetensors(folder / name))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {str(folder)!r} does not match the model: missing "
                              f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}")


def _load_optimizer(trainer, optimizer_state: dict) -> None:
    if _is_fsdp(trainer.accelerator):  # not run on this machine (no GPU)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(trainer.model, trainer.optimizer.optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True,
                                                          broadcast_from_rank0=True))
    else:
        trainer.optimizer.load_state_dict(optimizer_state)


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
