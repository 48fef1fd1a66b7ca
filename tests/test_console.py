"""A quiet console: the default run prints the trainer's own lines and progress bar; the
libraries' loading bars and advisory warnings appear only with --verbose."""

from __future__ import annotations

import subprocess

from .run_helpers import TRAIN, env, run_args

LIBRARY_NOISE = ("Loading weights", "Loading pipeline components", "[transformers]",
                 "chose 'torch'")


def test_default_run_shows_only_the_trainers_lines(tiny_world, tmp_path):
    outputs = {}
    for flag in ([], ["--verbose"]):
        args = run_args(tiny_world, tmp_path, f"run{len(flag)}", iterations=1, progress="true")
        proc = subprocess.run(TRAIN + args + flag, cwd=tmp_path, env=env(tmp_path),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[bool(flag)] = proc.stdout + proc.stderr
    quiet, verbose = outputs[False], outputs[True]
    assert "vipo.train: 1 iterations in" in quiet and "vipo:" in quiet  # summary, progress bar
    assert not [n for n in LIBRARY_NOISE if n in quiet], quiet[-2000:]
    assert "Loading" in verbose  # the same run with --verbose does show the libraries' bars
