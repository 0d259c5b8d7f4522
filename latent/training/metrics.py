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


TRAIN_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]
EVAL_FIELDS = ["step", "val_bits_per_token", "val_nll_per_token", "val_tokens"]


class MetricsLogger:
    """``train.csv`` / ``eval.csv`` in the run folder, plus TensorBoard under ``tb/`` (main process)."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, start_step: int = 0, fresh: bool = True):
        self.run_dir = Path(run_dir)
        self.train = CSVLog(self.run_dir / "train.csv", TRAIN_FIELDS)
        self.eval = CSVLog(self.run_dir / "eval.csv", EVAL_FIELDS)
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
            for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if row.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def log_eval(self, row: dict) -> None:
        self.eval.append(row)
        if self.tb is not None:
            self.tb.add_scalar("val/bits_per_token", row["val_bits_per_token"], row["step"])

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
        ax[0].set_ylabel("training loss (nats / token)")
        ax[0].legend()
    if evals:
        ax[1].plot([int(r["step"]) for r in evals], [float(r["val_bits_per_token"]) for r in evals], "o-")
        ax[1].set_xlabel("step")
        ax[1].set_ylabel("validation bound (bits / token)")
    fig.suptitle(title or run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
