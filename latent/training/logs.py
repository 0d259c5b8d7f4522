"""Run logs: CSV files (the record that resume tests compare), TensorBoard scalars, and a PNG plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path

__all__ = ["CSVLog", "MetricsLogger", "plot_run"]


class CSVLog:
    """Append-only CSV with a fixed header. ``truncate_after(step)`` drops rows a killed run wrote after
    the checkpoint it resumes from, so a resumed run's log equals an uninterrupted one."""

    def __init__(self, path: str | os.PathLike, fields: list[str]):
        self.path = Path(path)
        self.fields = fields

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self._rewrite(rows)

    def _rewrite(self, rows) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def reset(self) -> None:
        self._rewrite([])

    def append(self, row: dict) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in self.fields})

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # exact round trip
    return v


TRAIN_FIELDS = ["step", "stage", "loss", "lr", "grad_norm", "samples", "samples_per_s", "elapsed_s"]
EVAL_FIELDS = ["step"]


class MetricsLogger:
    """``train.csv`` / ``eval.csv`` in the run folder, plus TensorBoard under ``tb/`` (main process). The
    columns are the trainer's (``TRAIN_FIELDS``) followed by the task's metrics."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, start_step: int = 0, fresh: bool = True,
                 train_fields=(), eval_fields=()):
        self.run_dir = Path(run_dir)
        self.train_fields = TRAIN_FIELDS + [f for f in train_fields if f not in TRAIN_FIELDS]
        self.eval_fields = EVAL_FIELDS + [f for f in eval_fields if f not in EVAL_FIELDS]
        self.train = CSVLog(self.run_dir / "train.csv", self.train_fields)
        self.eval = CSVLog(self.run_dir / "eval.csv", self.eval_fields)
        for log in (self.train, self.eval):
            if fresh:
                log.reset()
            else:
                log.truncate_after(start_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step if not fresh else None)
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                self.tb = None

    def log_train(self, row: dict) -> None:
        self.train.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "stage", "elapsed_s") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def log_eval(self, row: dict) -> None:
        self.eval.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"val/{k}", v, row["step"])

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Training loss (raw and smoothed) and validation bits per token against steps -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = CSVLog(run_dir / "train.csv", TRAIN_FIELDS).read()
    evals = CSVLog(run_dir / "eval.csv", EVAL_FIELDS).read()
    eval_key = next((k for k in (evals[0] if evals else {}) if k != "step" and evals[0][k] not in ("", None)), None)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [int(r["step"]) for r in train]
        loss = [float(r["loss"]) for r in train]
        ax[0].plot(steps, loss, alpha=0.35, label="loss")
        ema, smooth = None, []
        for v in loss:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax[0].plot(steps, smooth, label="smoothed")
        ax[0].set_xlabel("step")
        ax[0].set_ylabel("training loss")
        ax[0].legend()
    if evals and eval_key is not None:
        ax[1].plot([int(r["step"]) for r in evals], [float(r[eval_key]) for r in evals], "o-")
        ax[1].set_xlabel("step")
        ax[1].set_ylabel(eval_key.replace("_", " "))
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
