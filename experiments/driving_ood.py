"""Closed-loop driving on conditions the demonstrations do not contain: the demonstrator, the behaviour-cloned
diffusion planner, the DAgger planner and the autoregressive (causal) baseline, with 95 % confidence intervals.

    python experiments/driving_ood.py --bc runs/driving_bc/pipeline --dagger runs/driving_dagger/pipeline \\
        --ar runs/driving_ar/pipeline --out experiments/results/driving_ood.json

Conditions (modalities/data/driving_closed_loop.py): ``highway`` (in distribution), ``highway-dense``,
``highway-2lanes``, ``highway-4lanes``, ``merge``, ``roundabout``; what is not evaluated and why is written
into the output (``excluded``). Every policy drives the same seeds (10000 + e) in every condition. Per
(policy, condition): collision rate with the Wilson 95 % interval, mean speed and return with bootstrap 95 %
intervals, and whether the collision rate is within 1.5x the demonstrator's (the target; where the
demonstrator never crashed, only 0 collisions meets it). A planner executes the first action of each plan and
replans every decision. Each cell also gives its collision rate as a multiple of the demonstrator's in the same
condition, with the Katz 95 % interval of that ratio (`modalities.data.metrics.rate_ratio_interval`). Writes the
JSON and a markdown table beside it (.md).

    python experiments/driving_ood.py --policies demonstrator --planner gap=runs/driving_gap/pipeline --prior-tau 0 1

``--planner NAME=PATH`` adds recipe variants, ``NAME=PATH1,PATH2,...`` an ensemble of planners that decode as
one (`pipelines.planning_ensemble`); ``--prior-tau`` decodes each of them also with the label-prior
correction (`PlanningPipeline.prior_correction`).

    python experiments/driving_ood.py --pool runs/standard.json runs/fresh.json --out runs/pooled.json

``--pool`` drives nothing: it joins the episodes of earlier outputs, cell by cell (policy, condition), and writes
the table of the joined cells; outputs that drove one condition on overlapping seeds (``--seed``) are refused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _policy(path, prior_tau=0.0):
    """(policy, whether its observations need the occupancy grid); ``prior_tau`` > 0 decodes with the
    planner's label-prior correction (`PlanningPipeline.prior_correction`)."""
    from modalities.data.driving import RuleBasedDriver

    if path is None:
        return RuleBasedDriver(), False
    from pipelines.planning import PlanningPipeline

    members = [PlanningPipeline.from_pretrained(p) for p in path.split(",")]
    if len(members) > 1:  # NAME=PATH1,PATH2,...: the members decode as one (pipelines.planning_ensemble)
        from pipelines.planning_ensemble import ensemble_planner

        pipe = ensemble_planner(members)
    else:
        pipe = members[0]
    pipe.set_progress_bar_config(disable=True)
    bias = pipe.prior_correction(prior_tau) if prior_tau else None
    return (lambda env, raw: pipe.plan_action(raw, action_bias=bias)), pipe.reads_occupancy


def _job(args):
    """One (policy, condition) cell, in a worker process."""
    name, path, prior_tau, condition, episodes, seed, max_decisions = args
    import torch

    torch.set_num_threads(1)
    from modalities.data.driving_closed_loop import CONDITIONS, drive, summarize

    t = time.perf_counter()
    policy, occupancy = _policy(path, prior_tau)
    rows = drive(policy, CONDITIONS[condition], episodes, seed, max_decisions, occupancy=occupancy)
    return {"policy": name, "condition": condition, "prior_tau": prior_tau, **summarize(rows),
            "seconds": round(time.perf_counter() - t, 1), "per_episode": rows}


def _fmt_ci(r, key, digits=2):
    lo, hi = r[f"{key}_ci95"]
    return f"{r[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main(argv=None):
    from modalities.data.driving_closed_loop import CONDITIONS, seed_ranges

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bc", default="runs/driving_bc/pipeline", help="behaviour-cloned diffusion planner")
    ap.add_argument("--dagger", default="runs/driving_dagger/pipeline", help="DAgger diffusion planner")
    ap.add_argument("--ar", default="runs/driving_ar/pipeline", help="autoregressive (causal) baseline")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--episodes", type=int, default=30, help="episodes per (policy, condition)")
    ap.add_argument("--seed", type=int, default=10_000)
    ap.add_argument("--max-decisions", type=int, default=60, help="cap per episode (merge-v0 has no time limit)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--target", type=float, default=1.5, help="collision rate within this factor of the demonstrator's")
    ap.add_argument("--policies", nargs="*", default=["demonstrator", "bc", "dagger", "ar"],
                    choices=["demonstrator", "bc", "dagger", "ar"])
    ap.add_argument("--planner", nargs="*", default=[], metavar="NAME=PATH",
                    help="more planners to evaluate beside the named ones (recipe variants), as name=pipeline folder")
    ap.add_argument("--prior-tau", nargs="+", type=float, default=[0.0], metavar="TAU",
                    help="evaluate every --planner at each of these label-prior corrections (0 = none; "
                         "PlanningPipeline.prior_correction); a planner at TAU > 0 is named 'NAME, prior TAU'")
    ap.add_argument("--reuse", nargs="*", default=[], help="earlier outputs whose cells of the policies not run now "
                    "are kept (policies evaluated at different times, on the same seeds)")
    ap.add_argument("--pool", nargs="+", default=None, metavar="OUTPUT",
                    help="drive nothing: join the episodes of these outputs (on disjoint seeds) per (policy, "
                         "condition) and tabulate them")
    ap.add_argument("--out", default="experiments/results/driving_ood.json")
    args = ap.parse_args(argv)
    if args.pool:
        outputs = {p: json.loads(Path(p).read_text()) for p in args.pool}
        cells, policies, conditions = _pooled(outputs, ap)
        return _report(args, cells, policies, conditions, 0.0, sorted(r for o in outputs.values() for r in seed_ranges(o)))

    if any(tau < 0 for tau in args.prior_tau):
        ap.error(f"--prior-tau {args.prior_tau}: every TAU must be >= 0")
    demo_name = "demonstrator (IDM+MOBIL)"  # the reference of the target
    policies = [(demo_name, None)] if "demonstrator" in args.policies else []
    taus = {}  # policy name -> prior_tau (0 for the named policies)
    for key, name, path in (("bc", "diffusion BC", args.bc), ("dagger", "diffusion DAgger", args.dagger),
                            ("ar", "autoregressive BC", args.ar)):
        if key not in args.policies:
            continue
        if path and Path(path, "model_index.json").is_file():
            policies.append((name, str(path)))
        else:
            print(f"skipping {name}: no pipeline at {path}")
    for item in args.planner:
        name, sep, path = item.partition("=")
        if not sep or not name or not all(Path(p, "model_index.json").is_file() for p in path.split(",")):
            ap.error(f"--planner {item!r}: give NAME=PATH with a pipeline folder (model_index.json) at PATH, or "
                     "NAME=PATH1,PATH2,... for an ensemble of planners")
        for tau in args.prior_tau:
            named = f"{name}, prior {tau:g}" if tau else name
            policies.append((named, path))
            taus[named] = tau
    jobs = [(name, path, taus.get(name, 0.0), c, args.episodes, args.seed, args.max_decisions)
            for c in args.conditions for name, path in policies]
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        cells = list(pool.map(_job, jobs))
    for earlier in args.reuse:
        prev = json.loads(Path(earlier).read_text())
        done = {(c["policy"], c["condition"]) for c in cells}
        cells += [c for c in prev["cells"] if (c["policy"], c["condition"]) not in done
                  and c["condition"] in args.conditions]
        policies += [(n, p) for n, p in prev["policies"].items() if n not in dict(policies)]
    seeds = [[args.seed, args.seed + args.episodes - 1]]
    return _report(args, cells, policies, args.conditions, round(time.perf_counter() - t, 1), seeds, argv)


def _pooled(outputs: dict[str, dict], ap) -> tuple[list[dict], list, list[str]]:
    from modalities.data.driving_closed_loop import pool_outputs

    try:
        return pool_outputs(outputs)
    except ValueError as err:
        ap.error(f"--pool: {err}")


def _report(args, cells, policies, conditions, seconds, seeds, argv=None):
    from modalities.data.driving_closed_loop import CONDITIONS, EXCLUDED
    from modalities.data.metrics import rate_ratio_interval

    demo_name = "demonstrator (IDM+MOBIL)"
    policies = sorted(policies, key=lambda np_: np_[0] != demo_name)
    cells.sort(key=lambda c: (conditions.index(c["condition"]), [n for n, _ in policies].index(c["policy"])))
    demo = {c["condition"]: c for c in cells if c["policy"] == demo_name}
    for c in cells:
        ref = demo.get(c["condition"])  # None: the demonstrator was not evaluated there
        c["within_target"] = None if ref is None else c["collision_rate"] <= args.target * ref["collision_rate"]
        if ref is not None and c["policy"] != demo_name:
            ratio, lo, hi = rate_ratio_interval(c["collisions"], c["episodes"], ref["collisions"], ref["episodes"])
            c["collision_ratio"], c["collision_ratio_ci95"] = ratio, [lo, hi]
    lines = ["| condition | policy | episodes | collision rate [95% CI] | x demonstrator [95% CI] | mean speed m/s "
             f"[95% CI] | return [95% CI] | within {args.target:g}x demonstrator |", "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        ratio = _fmt_ci(c, "collision_ratio") if "collision_ratio" in c else "-"
        if "collision_ratio" in c and c["collisions"] == demo[c["condition"]]["collisions"] == 0:
            ratio = "no crash in either"  # the ratio of two zero counts says nothing
        lines.append(f"| {c['condition']} | {c['policy']} | {c['episodes']} | {_fmt_ci(c, 'collision_rate')} | {ratio} | "
                     f"{_fmt_ci(c, 'mean_speed', 1)} | {_fmt_ci(c, 'return', 1)} | { {True: 'yes', False: 'no', None: '-'}[c['within_target']] } |")
    table = "\n".join(lines)
    print(table)
    results = {"command": "python experiments/driving_ood.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "policies": dict(policies), "seconds": seconds, "seeds": seeds,
               "conditions": {c: {"env": CONDITIONS[c].env_id, "density": CONDITIONS[c].density,
                                  "config": CONDITIONS[c].config, "lane_frame": CONDITIONS[c].lane_frame,
                                  "in_distribution": CONDITIONS[c].in_distribution, "note": CONDITIONS[c].note}
                              for c in conditions},
               "excluded": EXCLUDED, "target": args.target,
               "target_met_everywhere": {name: all(c["within_target"] is True for c in cells if c["policy"] == name)
                                         for name, _ in policies if name != demo_name},
               "cells": cells, "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    md = [f"# Driving closed loop in and out of distribution\n\n`{results['command']}`\n", table, "",
          "Conditions: " + "; ".join(f"**{k}**: {v['note']}" for k, v in results["conditions"].items()), "",
          "Not evaluated: " + "; ".join(f"**{k}**: {v}" for k, v in EXCLUDED.items())]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
