"""Run-folder outputs: metrics CSV + TensorBoard, image grids, phase timers, summary line."""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger("vipo")


class MetricsLogger:
    """Appends one row per iteration to ``metrics.csv`` (fixed columns, from the first row)
    and mirrors every scalar to TensorBoard under ``<run>/tensorboard``.

    ``start`` > 0 continues a resumed run: rows from iteration ``start`` on (written after
    the checkpoint it resumes) are dropped, the rest kept, and new rows appended. A failure
    to write metrics.csv is an error; TensorBoard is optional and only warns."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, *, filename: str = "metrics.csv",
                 tensorboard_dir: str = "tensorboard", start: int = 0):
        self.path = Path(run_dir) / filename
        self.columns: list | None = None
        self.rows: list[dict] = []  # the kept rows of a resumed run (floats, with iteration)
        if start > 0 and self.path.is_file():
            self._truncate(start)
        self.writer = None
        self.tensorboard_dir = Path(run_dir) / tensorboard_dir
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                _quiet_writer_threads()
                self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir),
                                            purge_step=start or None)
            except OSError as err:
                self._disable_tensorboard(err)

    def _truncate(self, start: int) -> None:
        with self.path.open(newline="") as f:
            reader = csv.reader(f)
            self.columns = next(reader, None)
            kept = [r for r in reader if r and float(r[0]) < start]
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([self.columns] + kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.rows = [{k: float(v) if v != "" else math.nan for k, v in zip(self.columns, r)}
                     for r in kept]

    def log(self, step: int, metrics: dict) -> None:
        row = {"iteration": step, **{k: _scalar(v) for k, v in metrics.items()}}
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"metrics {sorted(unknown)} were not logged at the first iteration")
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        if self.writer is not None:
            try:
                for key, value in row.items():
                    if key != "iteration" and math.isfinite(value):
                        self.writer.add_scalar(key, value, step)
            except OSError as err:
                self._disable_tensorboard(err)

    def _disable_tensorboard(self, err: OSError) -> None:
        """One warning; the writer is closed and event files it left empty are removed."""
        text = str(err).strip().splitlines()
        logger.warning("TensorBoard logs disabled, training goes on: %s",
                       text[0] if text else type(err).__name__)
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass  # the same failure again
        if self.tensorboard_dir.is_dir():
            for path in self.tensorboard_dir.rglob("*"):
                if path.is_file() and path.stat().st_size == 0:
                    path.unlink()

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as err:  # a write failed in the writer's thread since the last log
                self._disable_tensorboard(err)


def _quiet_writer_threads() -> None:
    """TensorBoard writes from its own thread; when that fails (a full disk), the thread's
    traceback would go to the console. The same error reaches MetricsLogger at its next write
    (or close), which warns in one line, so the thread's report is dropped."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "vipo_quiet", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and \
                issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.vipo_quiet = True
    threading.excepthook = hook


def _scalar(v) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def read_metrics(path) -> list[dict]:
    """metrics.csv rows as dicts of floats (empty cells become NaN)."""
    with Path(path).open() as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()}
                for row in csv.DictReader(f)]


def first_frames(media: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) as they are; videos (N, F, 3, H, W) by their first frame."""
    return media[:, 0] if media.dim() == 5 else media


def save_grid(images: torch.Tensor, path, nrow: int) -> None:
    """Images (N, 3, H, W) in [0, 1] tiled ``nrow`` per row (one group per row) as PNG."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_pixels(images, nrow)).save(path)


def save_labelled_grids(panels: list, path, nrow: int, scale: int = 2) -> None:
    """Several grids stacked top to bottom, each under its label: ``panels`` is a list of
    (label, images (N, 3, H, W)); pixels are enlarged ``scale`` times (nearest)."""
    from PIL import Image

    save_labelled_pictures([(label, Image.fromarray(grid_pixels(images, nrow)))
                            for label, images in panels], path, scale)


def save_labelled_pictures(panels: list, path, scale: int = 2) -> None:
    """(label, PIL image) panels stacked top to bottom, each enlarged ``scale`` times."""
    from PIL import Image, ImageDraw

    pictures = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for _, p in panels]
    label_h = 16
    canvas = Image.new("RGB", (max(p.width for p in pictures),
                               sum(p.height + label_h for p in pictures)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for (label, _), picture in zip(panels, pictures):
        draw.text((4, top + 2), label, fill=(0, 0, 0))
        canvas.paste(picture, (0, top + label_h))
        top += picture.height + label_h
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def grid_pixels(images: torch.Tensor, nrow: int):
    """(N, 3, H, W) in [0, 1] -> a uint8 (rows, cols, 3) numpy tile of ``nrow`` per row."""
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(3, rows * (h + 2), nrow * (w + 2))
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, nrow)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class PhaseTimer:
    """Wall-clock seconds per named phase; synchronises CUDA so GPU work is attributed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict:
        out, self.seconds = self.seconds, {}
        return out


def summary_line(history: list[dict], seconds: float, run_dir, window: int = 5) -> str:
    """The closing line: iterations, time split, reward at the start and the end."""
    n = len(history)
    if n == 0:
        return f"vipo.train: no iterations run; run folder {run_dir}"

    def mean(key, rows):
        values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        return sum(values) / len(values) if values else math.nan

    w = min(window, n)
    split = ", ".join(f"{p} {mean('time_' + p, history):.2f}"
                      for p in ("sampling", "reward", "psm", "training"))
    return (f"vipo.train: {n} iterations in {seconds:.1f} s ({seconds / n:.2f} s/it; {split}); "
            f"reward_mean {mean('reward_mean', history[:w]):.4f} (first {w}) -> "
            f"{mean('reward_mean', history[-w:]):.4f} (last {w}); run folder {run_dir}")
