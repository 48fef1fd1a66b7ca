"""The run around the Trainer: its folder, resume, the evaluation schedule, stop signals and
periodic, stop and crash checkpoints, the metrics files and the closing summary.

``RunLoop(cfg).run()`` is what ``python -m vipo.train`` does. SIGTERM/SIGINT end the run
after the current iteration with a checkpoint (vipo.faults); an error saves a crash
checkpoint first unless the state is not worth it; ``resume=`` continues a run exactly
from the checkpoint's weights, optimiser and run state (vipo.run_state).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from . import faults
from .checkpointing import Trained, load_checkpoint, prune, save_checkpoint
from .errors import CheckpointError
from .logging_utils import MetricsLogger, first_frames, save_grid, summary_line
from .plots import plot_curves
from .trainer import Trainer, make_accelerator

logger = logging.getLogger("vipo")


class RunLoop:
    def __init__(self, cfg, adapter=None):
        self.cfg = cfg.validate()
        self.accelerator = make_accelerator(self.cfg)
        self.run_dir = None
        self.last_checkpoint = None
        try:
            self.run_dir, resume_from = self._open_run_dir()
            self.trainer = Trainer(self.cfg, self.accelerator, adapter)
            if resume_from is not None:
                self._resume(resume_from)
                self._write_config(self.run_dir)
        except BaseException:
            self._remove_unused_run_dir()
            raise
        start = self.trainer.state.iteration
        main = self.accelerator.is_main_process
        self.metrics = MetricsLogger(self.run_dir, cfg.run.tensorboard, start=start) \
            if main else None
        self.history: list[dict] = [{k: v for k, v in r.items() if k != "iteration"}
                                    for r in (self.metrics.rows if self.metrics else [])]
        self._resumed_rows, self.start_iteration = len(self.history), start
        self.eval = self._eval_phase()
        self._saving = False
        self._snapshot = None   # the run state at the start of the current iteration
        self._done = None       # iterations completed (None: the loop has not started)

    # ------------------------------------------------------------------ folder and resume
    def _open_run_dir(self) -> tuple[Path, Path | None]:
        """(run folder, checkpoint to resume): a new folder, or the resumed run's."""
        from accelerate.utils import broadcast_object_list

        from .run_dir import create_run_dir, find_resume

        run, acc = self.cfg.run, self.accelerator
        found = [None, None]
        if acc.is_main_process:  # only the main process touches the file system
            if run.resume:
                found = list(find_resume(run.resume, run.output_dir, run.run_name))
            else:
                found[0] = create_run_dir(run.output_dir, run.run_name, self.cfg.preset)
                self._write_config(found[0])
        broadcast_object_list(found)  # every process writes into the main process's folder
        self._new_run_dir = not run.resume
        return Path(found[0]), found[1] and Path(found[1])

    def _write_config(self, folder: Path) -> None:
        """The resolved config.yaml (a resumed run's only once its checkpoint has loaded)."""
        if self.accelerator.is_main_process:
            saved = copy.deepcopy(self.cfg)
            saved.run.resume = ""
            (folder / "config.yaml").write_text(saved.to_yaml())

    def _remove_unused_run_dir(self) -> None:
        """A run that failed during setup leaves no folder behind (only its config.yaml
        was written), so the name can be used again."""
        folder = self.run_dir
        if folder is None or not getattr(self, "_new_run_dir", False) or \
                not self.accelerator.is_main_process:
            return
        if [p.name for p in folder.iterdir()] == ["config.yaml"]:
            (folder / "config.yaml").unlink()
            folder.rmdir()

    def _parts(self) -> Trained:
        t = self.trainer
        lora = type(t.adapter.pipe) if self.cfg.train.lora_rank > 0 else None
        return Trained(self.accelerator, t.model, t.optimizer, t.ema, lora)

    def _resume(self, folder: Path) -> None:
        try:
            state, rng = load_checkpoint(folder, self._parts())
        except CheckpointError as err:
            raise faults.LoadError(str(err)) from None
        self.trainer.state.load_state_dict(state)
        if rng is not None:
            self.trainer.state.load_rng_state(rng)
        self.trainer.scheduler.load_state_dict(state["scheduler"])
        self.last_checkpoint = folder
        logger.info("resuming %s from iteration %d", folder, self.trainer.state.iteration)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, tag: str, kind: str, snapshot=None) -> Path:
        """Saves a resumable checkpoint of the run state now, or of ``snapshot`` (taken
        when the current iteration began)."""
        t, metric = self.trainer, self.cfg.run.best_metric
        snap = snapshot or t.state.snapshot()
        extra = {"kind": kind, "scheduler": t.scheduler.state_dict(),
                 "ema": {k: v for k, v in t.ema.state_dict().items()
                         if k != "shadow_params"} if t.ema is not None else None,
                 "metric": self.history[-1].get(metric) if metric and self.history else None}
        self._saving = True  # stays set if the save fails: no crash checkpoint after that
        folder = save_checkpoint(self.run_dir / "checkpoints" / tag, self._parts(),
                                 {**snap.state, **extra}, snap.rng)
        self._saving = False
        if self.accelerator.is_main_process and kind != "final":
            prune(self.run_dir, self.cfg.run.keep_checkpoints, metric)
        self.last_checkpoint = folder
        return folder

    def _save_after_failure(self, err: BaseException) -> None:
        """A crash checkpoint: exact (the iteration's start) when no optimiser step had been
        taken in it, else the state as it is, counted as a finished iteration."""
        worth = getattr(err, "save", True) and not isinstance(err, KeyboardInterrupt)
        if self._saving or not worth or self._done is None:
            return
        if self.accelerator.num_processes > 1 and not getattr(err, "everywhere", False):
            # The other processes are not in this except block: a save's barriers would hang.
            logger.error("an error on one of %d processes: no crash checkpoint; the last "
                         "checkpoint stays the latest", self.accelerator.num_processes)
            return
        it, state = self._done, self.trainer.state
        try:
            if self._snapshot is None:  # between iterations (e.g. the evaluation): exact
                self.checkpoint(f"iter{it:06d}", "crash")
            elif self.trainer.stepped:
                state.iteration = it + 1
                self.checkpoint(f"iter{it + 1:06d}", "crash")
            else:
                self.checkpoint(f"iter{it:06d}", "crash", self._snapshot)
        except Exception as save_err:  # noqa: BLE001 - report the original error first
            logger.error("the crash checkpoint could not be written either: %s",
                         faults.one_line(save_err))

    # ------------------------------------------------------------------ evaluation
    def _eval_phase(self):
        if self.cfg.eval.eval_every < 0:
            return None
        from .evaluation import EvalPhase

        t = self.trainer
        return EvalPhase(self.cfg, t.adapter, t.schedule, t.rewards, self.run_dir,
                         device=self.accelerator.device,
                         is_main=self.accelerator.is_main_process, start=self.start_iteration)

    def evaluate(self, iteration: int) -> None:
        """The evaluation phase on the current weights (vipo/evaluation.py)."""
        if self.eval is None:
            return
        with self.trainer.timer("eval"):
            self.eval(self.trainer.model, iteration, self.accelerator.autocast)

    def _eval_due(self, done: int) -> bool:
        every = self.cfg.eval.eval_every
        return every > 0 and done % every == 0 and done < self.cfg.train.iterations

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """The loop. A stop signal ends it after the current iteration with a checkpoint
        (RunStopped); an error saves one first unless the state is not worth it."""
        from tqdm.auto import tqdm

        cfg, start, t = self.cfg, time.perf_counter(), self.trainer
        saving = cfg.run.checkpoint_every >= 0
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), desc="vipo",
                   dynamic_ncols=True, initial=self.start_iteration, total=cfg.train.iterations,
                   disable=not (cfg.run.progress and self.accelerator.is_main_process))
        try:
            with faults.StopSignals() as stop:
                if self.start_iteration == 0 or self._eval_due(self.start_iteration):
                    self.evaluate(self.start_iteration)
                for it in bar:
                    self._done, self._snapshot = it, t.state.snapshot()
                    result = t.iteration(it)
                    self._record(it, result)
                    bar.set_postfix(reward=f"{result.row['reward_mean']:.4f}",
                                    loss=f"{result.row['loss']:.2e}")
                    self._snapshot, self._done = None, it + 1
                    if self._eval_due(it + 1):
                        self.evaluate(it + 1)
                    if it + 1 < cfg.train.iterations:
                        self._between_iterations(it + 1, stop)
                self.evaluate(cfg.train.iterations)
                if saving:
                    self.checkpoint("final", "final")
        except BaseException as err:
            if saving and not isinstance(err, faults.RunStopped):
                self._save_after_failure(err)
            raise
        finally:
            bar.close()
            self._close()
        return self._finish(start)

    def _record(self, it: int, result) -> None:
        """metrics.csv / TensorBoard, and every image_every iterations the sample grid and
        map overlays (main process only)."""
        self.history.append(result.row)
        if not self.accelerator.is_main_process:
            return
        self.metrics.log(it, result.row)
        every = self.cfg.run.image_every
        if every and (it % every == 0 or it == self.cfg.train.iterations - 1):
            with faults.warn_on_failure(f"the sample images of iteration {it}"):
                self._save_images(it, result.media, result.maps)

    def _save_images(self, it: int, media, maps) -> None:
        frames = first_frames(media)
        folder = self.run_dir / "samples"
        save_grid(frames, folder / f"iter{it:06d}.png", nrow=self.cfg.sample.group_size)
        if maps is not None:
            from .psm import overlay

            first = maps[:, 0] if maps.dim() == 4 else maps  # video maps: first latent frame
            heat = overlay(frames, first.to(frames.device))  # (N, h, w, 3) uint8
            save_grid(heat.permute(0, 3, 1, 2).float() / 255, folder / f"maps{it:06d}.png",
                      nrow=self.cfg.sample.group_size)

    def _between_iterations(self, done: int, stop) -> None:
        """The periodic checkpoint, and the stop one (then RunStopped) after a signal."""
        every, signum = self.cfg.run.checkpoint_every, self._stop_requested(stop)
        if every >= 0 and (signum or every > 0 and done % every == 0):
            self.checkpoint(f"iter{done:06d}", "stop" if signum else "periodic")
        if signum:
            raise faults.RunStopped(signum)

    def _stop_requested(self, stop) -> int | None:
        """The signal, if any process received one (all stop together)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return stop.requested
        flag = torch.tensor([stop.requested or 0], device=acc.device)
        return int(acc.reduce(flag, "max")) or None

    def _close(self) -> None:
        if self.accelerator.is_main_process and self.metrics is not None:
            self.metrics.close()
            if self.history:
                with faults.warn_on_failure("curves.png"):
                    plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")

    def _finish(self, start: float) -> dict:
        seconds = time.perf_counter() - start
        # This session's iterations: a resumed run's earlier rows took no time here.
        line = summary_line(self.history[self._resumed_rows:], seconds, self.run_dir)
        if self.start_iteration:
            line += f" (resumed at iteration {self.start_iteration})"
        if self.eval is not None:
            line += self.eval.summary()
            self.eval.close()
        if self.accelerator.is_main_process:
            print(line, flush=True)
        return {"run_dir": self.run_dir, "history": self.history, "summary": line,
                "seconds": seconds, "eval": self.eval.rows if self.eval is not None else []}

    def saved(self) -> str:
        """Where the run's state is, for the one-line messages of ``vipo.train``."""
        if self.last_checkpoint is None:
            return "no checkpoint saved"
        return f"checkpoint {self.last_checkpoint}; continue with resume={self.run_dir}"
