"""Where a driving planner's closed-loop collisions come from: its first action against the demonstrator's
label, state by state, on the states the demonstrator visits (beta = 1) and on the states the planner reaches
when it drives itself (beta = 0, DAgger's labelling), per traffic density.

    python experiments/driving_action_agreement.py --planner bc=runs/driving_bc4k/pipeline \\
        --densities 1.5 3.0 --episodes 10 --out experiments/results/driving_action_agreement.json

Low agreement on the demonstrator's own states means the planner misreads the scene itself (the inputs are
out of its training distribution); agreement that only drops on its own states means drift (its mistakes lead
to states the data never shows). Per cell: decisions, agreement, the recall of SLOWER (the label a collision
usually follows from missing) and the label x prediction confusion matrix over ``ACTIONS``. Episodes use the
closed-loop evaluation's seeds (10000 + e). Writes the JSON and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np


def agreement(pipe, density: float, beta: float, episodes: int, seed: int) -> dict:
    """One (planner, density, state source) cell."""
    import torch

    from modalities.data.driving import ACTIONS, record

    data = record(densities=(density,), episodes=episodes, seed=seed, occupancy=pipe.reads_occupancy, progress=False,
                  policy=lambda env, raw: pipe.plan_action(raw), beta=beta)
    label = torch.as_tensor(data.actions[:, 0])
    with torch.no_grad():
        pred = pipe(data.inputs()).action_ids[:, 0].cpu()
    slower = label == ACTIONS.index("SLOWER")
    confusion = np.bincount(label.numpy() * len(ACTIONS) + pred.numpy(), minlength=len(ACTIONS) ** 2)
    return {"decisions": len(label), "agreement": float((pred == label).float().mean()),
            "slower_recall": float((pred[slower] == label[slower]).float().mean()) if slower.any() else None,
            "slower_share": float(slower.float().mean()),
            "confusion_label_x_prediction": confusion.reshape(len(ACTIONS), len(ACTIONS)).tolist()}


def main(argv=None):
    import torch

    from modalities.data.driving import ACTIONS
    from pipelines.planning import PlanningPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planner", nargs="+", required=True, metavar="NAME=PATH", help="planners as name=pipeline folder")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.5, 3.0])
    ap.add_argument("--episodes", type=int, default=10, help="episodes per (planner, density, state source)")
    ap.add_argument("--seed", type=int, default=10_000)
    ap.add_argument("--out", default="experiments/results/driving_action_agreement.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cells = []
    for item in args.planner:
        name, sep, path = item.partition("=")
        if not sep or not Path(path, "model_index.json").is_file():
            ap.error(f"--planner {item!r}: give NAME=PATH with a pipeline folder (model_index.json) at PATH")
        pipe = PlanningPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        for density in args.densities:
            for states, beta in (("demonstrator's", 1.0), ("planner's own", 0.0)):
                cell = {"planner": name, "path": path, "density": density, "states": states,
                        **agreement(pipe, density, beta, args.episodes, args.seed)}
                cells.append(cell)
                print(name, density, states, {k: cell[k] for k in ("decisions", "agreement", "slower_recall")},
                      flush=True)

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["| planner | density | states | decisions | agreement | SLOWER recall | SLOWER labelled as FASTER |",
             "|---|---|---|---|---|---|---|"]
    s, f = ACTIONS.index("SLOWER"), ACTIONS.index("FASTER")
    for c in cells:
        lines.append(f"| {c['planner']} | {c['density']:g} | {c['states']} | {c['decisions']} | {fmt(c['agreement'])} | "
                     f"{fmt(c['slower_recall'])} | {c['confusion_label_x_prediction'][s][f]} |")
    table = "\n".join(lines)
    print(table)
    command = "python experiments/driving_action_agreement.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "actions": list(ACTIONS), "episodes": args.episodes,
                               "seed": args.seed, "cells": cells, "table": table}, indent=2))
    out.with_suffix(".md").write_text(f"# Driving: first action against the demonstrator's label\n\n`{command}`\n\n"
                                      f"{table}\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
