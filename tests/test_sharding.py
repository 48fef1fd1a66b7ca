"""FSDP2 sharding on the CPU (gloo, 2 processes launched as a user would): exact resume of
a sharded run, full and LoRA, and the gradient memory a process holds while accumulating.
(Sharded training against one process, and the sharded checkpoint read by plain
from_pretrained: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vipo.checkpointing import complete_checkpoints

from .run_helpers import WEIGHTS, check_call, launch, run_args
from .test_resume import STATEFUL, same_run

PROBE = """
import json, os, sys
import vipo.trainer as trainer
from vipo import sharding
from vipo.train import main

seen, real = [], trainer.Trainer._train_step

def probe(self, *args, **kwargs):
    stats = real(self, *args, **kwargs)
    if not self.accelerator.sync_gradients:  # mid-accumulation: the gradients are held
        grads = [p.grad for p in self.params if p.grad is not None]
        seen.append({"grad_elements": sum(sharding.local_numel(g) for g in grads),
                     "grad_bytes": sum(sharding.local_numel(g) * g.element_size()
                                       for g in grads),
                     "shard_elements": sum(sharding.local_numel(p) for p in self.params),
                     "model_elements": sum(p.numel() for p in self.params)})
    return stats

trainer.Trainer._train_step = probe
code = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], f"probe_{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


@pytest.mark.parametrize("variant", [{"ema_decay": 0.9}, {"lora_rank": 2}], ids=["full", "lora"])
def test_sharded_run_resumes_bit_identically(tiny_world, tmp_path, variant):
    """A 2-process sharded run cut back to its iteration-2 checkpoint and resumed (2
    processes) ends exactly like the uninterrupted one: weights, EMA, metrics."""
    weights = "checkpoints/final/pytorch_lora_weights.safetensors" if "lora_rank" in variant \
        else WEIGHTS
    args = run_args(tiny_world, tmp_path, "whole", fsdp="true", prompts_per_iter=1,
                    **STATEFUL, **variant)
    check_call(launch() + args, tmp_path)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "final")  # as if stopped after iteration 2
    assert [c.name for c in complete_checkpoints(cut)] == ["iter000002"]
    check_call(launch() + [f"resume={cut}", f"output_dir={tmp_path}"], tmp_path)
    same_run(tmp_path / "whole", cut, weights)
    if "ema_decay" in variant:
        ema = [load_file(d / "checkpoints/final/ema.safetensors") for d in (tmp_path / "whole", cut)]
        assert ema[0].keys() == ema[1].keys()
        assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
        final = load_file(tmp_path / "whole" / WEIGHTS)
        assert all(ema[0][k].shape == final[k].shape for k in ema[0])  # full tensors


def test_accumulated_gradients_stay_sharded(tiny_world, tmp_path):
    """Measured inside a 2-process sharded run: between the micro-steps of one optimiser
    step each process holds the gradient of its own shard only (half the model, up to
    FSDP's padding of dim 0), never the whole model's."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    args = run_args(tiny_world, tmp_path, "probe", fsdp="true", prompts_per_iter=1,
                    grad_accum=2, train_batch_size=1, iterations=1)
    check_call(launch(2, [str(script), str(tmp_path)]) + args, tmp_path)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"probe_{rank}.json").read_text())
        assert seen, "no micro-step ran mid-accumulation"
        for record in seen:
            print(rank, record)
            assert record["grad_elements"] == record["shard_elements"]
            assert record["grad_elements"] <= 0.55 * record["model_elements"]
