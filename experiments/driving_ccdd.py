"""CCDD variant of the planner: meta-actions as masked tokens, waypoints as continuous latents, one backbone.

    python experiments/driving_ccdd.py                          # configs/driving_tiny_ccdd.yaml, then the metrics
    python experiments/driving_ccdd.py trainer.max_steps=30     # smoke run (any recipe override)

Training is the recipe configs/driving_tiny_ccdd.yaml (the driving task with objective.name=ccdd: same data,
size and steps as configs/driving_tiny.yaml, plus ``latent_dim=2``; see pipelines/tasks/driving.py) through
the one trainer. Decoding: ``CCDDPlanner`` of the export (tokens on LLaDA's linear schedule, latents with
DPM-Solver++, one forward per step for both). The open-loop metrics are the ones of experiments/driving_eval.py,
so the rows compare with the token planner's there. Writes experiments/results/driving_ccdd.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/driving_tiny_ccdd.yaml")
    ap.add_argument("--sample-steps", default="3,10", help="decoding steps to report, comma-separated")
    ap.add_argument("--out", default="experiments/results/driving_ccdd.json")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.max_steps=30 objective.lam=0.5")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import pipelines.tasks  # noqa: F401 - registers the tasks
    from latent.training.config import load_config
    from latent.training.trainer import train
    from modalities.data.driving import DrivingDataset
    from pipelines.tasks.driving import CCDDPlanner

    cfg = load_config(args.recipe, args.overrides)
    result = train(cfg)
    with open(result.run_dir / "train.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > result.step - 50] or [{"ce": "nan", "mse": "nan"}]
    planner = CCDDPlanner.from_pretrained(result.pipeline_dir)
    valid = DrivingDataset.load(cfg.data.valid or Path(cfg.data.dir) / "valid.npz")
    k = planner.tokenizer.horizon

    results = {"command": "python experiments/driving_ccdd.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "recipe": args.recipe, "steps": result.step, "train_seconds": result.seconds, "lam": cfg.objective.lam,
               "rows": [], "final_ce_mse": [float(np.mean([float(r[m]) for r in rows])) for m in ("ce", "mse")]}
    for ns in map(int, args.sample_steps.split(",")):
        acts, ways = [], []
        for lo in range(0, len(valid), 128):
            a, w = planner(valid.inputs(np.arange(lo, min(len(valid), lo + 128))), ns, torch.Generator().manual_seed(lo))
            acts.append(a)
            ways.append(w)
        a, w = torch.cat(acts).numpy(), torch.cat(ways).numpy()
        l2 = np.linalg.norm(w - valid.waypoints, axis=-1)
        times = []
        for i in range(min(40, len(valid))):
            x = valid.inputs([i])
            t = time.perf_counter()
            planner(x, ns, torch.Generator().manual_seed(i))
            times.append(1e3 * (time.perf_counter() - t))
        row = {"policy": f"CCDD (action tokens + waypoint latents), {ns} steps", "forwards_per_plan": ns,
               "action_acc": float((a == valid.actions).mean()),
               "first_action_acc": float((a[:, 0] == valid.actions[:, 0]).mean()),
               **{f"l2_{j + 1}s": float(l2[:, j].mean()) for j in range(k)},
               "latency_ms_batch1_median": float(np.median(times[5:] or times))}
        results["rows"].append(row)
        print(json.dumps(row))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
