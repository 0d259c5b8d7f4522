"""What the latent experiments share: training a recipe through the one trainer, reading its logs, tables.

The arithmetic task itself (problems, tokenizer, scoring) is :mod:`latent.data.arithmetic`; the models are
trained by the recipes ``configs/latent_*.yaml`` (tasks in ``pipelines/tasks``), so every experiment here is
a driver: it trains recipes, loads what they export and writes tables.
"""

from __future__ import annotations

import copy
import csv
import statistics
import tempfile
from pathlib import Path

__all__ = ["add_common_args", "train_recipe", "step_seconds", "equal_compute", "read_log", "markdown_table"]


def add_common_args(ap) -> None:
    """Options every latent driver takes: where runs and results go, a step count, and recipe overrides."""
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of every recipe (warmup then 5%% of them); default: the recipes'")
    ap.add_argument("--runs", default="runs", help="folder of the run folders (a finished run is not retrained)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every model, e.g. trainer.threads=2")


def train_recipe(recipe: str, overrides=(), args=None):
    """Train ``configs/<recipe>.yaml`` with ``overrides`` (plus the driver's ``--steps`` / ``--runs`` /
    overrides) and return the trainer's result. A run folder that holds a finished run resumes at its end,
    so only the export and the final evaluation run again."""
    import pipelines.tasks  # noqa: F401 - registers the tasks
    from latent.training.config import REPO_CONFIGS, load_config
    from latent.training.trainer import train

    path, over = REPO_CONFIGS / f"{recipe}.yaml", list(overrides)
    if args is not None:
        over += list(args.overrides)
        if args.steps is not None:
            over += [f"trainer.max_steps={args.steps}", f"optim.warmup_steps={max(1, args.steps // 20)}"]
        over.append(f"run.output_dir={Path(args.runs) / load_config(path, over).run.name}")
    return train(load_config(path, over))


def step_seconds(recipe: str, runs: dict[str, list[str]], args, steps: int, rounds: int = 3,
                 warmup: int = 20) -> dict[str, float]:
    """Seconds per training step of each named list of overrides of ``configs/<recipe>.yaml``, timed side by
    side: ``rounds`` alternating runs of ``warmup + steps`` steps in this process, in a temporary folder (the
    time between the two steps' rows of ``train.csv``, so start-up, warm-up, evaluation and export are left
    out); the median per name. The compute of a training budget is its steps times this."""
    times = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, over in runs.items():
                a = copy.copy(args)
                a.steps, a.runs = warmup + steps, f"{tmp}/{r}"
                res = train_recipe(recipe, [*over, "trainer.log_every=1", "trainer.save_every=0", "trainer.eval_every=0",
                                            "eval.problems=4"], a)
                elapsed = {int(row["step"]): row["elapsed_s"] for row in read_log(res.run_dir)}
                times[name].append((elapsed[warmup + steps] - elapsed[warmup]) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def equal_compute(recipe: str, runs: dict[str, list[str]], args, variant: str, baseline: str):
    """Time every named run (:func:`step_seconds`, ``args.cost_steps`` x ``args.cost_rounds``) and return
    ``(seconds per step by name, a copy of args whose --steps are the baseline steps that cost what --steps of
    variant cost)``."""
    cost = step_seconds(recipe, runs, args, args.cost_steps, args.cost_rounds)
    print("seconds per step:", cost, flush=True)
    matched = copy.copy(args)
    matched.steps = round(args.steps * cost[variant] / cost[baseline])
    return cost, matched


def read_log(run_dir, name: str = "train.csv") -> list[dict]:
    """Rows of a run's ``train.csv`` / ``eval.csv`` (numbers as floats, empty cells dropped)."""
    with open(Path(run_dir) / name) as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if v in ("", None):
                continue
            try:
                row[k] = float(v)
            except ValueError:
                row[k] = v
        out.append(row)
    return out


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
