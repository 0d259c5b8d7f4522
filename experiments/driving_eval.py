"""Evaluate driving planners open loop (validation set) and closed loop (they drive highway-env).

    python experiments/driving_eval.py --diffusion runs/driving_tiny/pipeline --ar runs/driving_tiny_ar/pipeline

Open loop, on data/driving/valid.npz: waypoint L2 error at 1/2/3 s (mean over samples, metres), meta-action
accuracy (all K decisions, and the first one), decoding forwards per plan (per row: its last commit; the exact
prefix cache adds one sensor-only forward), and latency per decision at batch 1.
Decoding settings of the diffusion planner: the saved default (threshold 0.9), and the LLaDA schedule with
9, 3 and 1 forwards. References: "constant" (IDLE and constant speed straight ahead).

Closed loop: each policy drives the ego for N episodes per traffic density on seeds never used for the data
(10000 + ...): collision rate, mean speed, distance travelled, episodes completed (time limit reached without
a crash), latency per decision (the policy call: preprocessing, adapter, decoding). Policies: the rule-based
demonstrator (IDM + MOBIL on meta-actions), the diffusion planner, the autoregressive planner, and "idle".
A planner executes the first action of each plan and replans at every decision (receding horizon).
Results go to experiments/results/driving_eval.json (and are printed as tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def open_loop(name, plan_fn, data, tok, batch_size=128):
    """plan_fn(DrivingInputs) -> (action_ids [B, K], waypoints [B, K, 2], decoding forwards per row [B])."""
    preds, ways, nfe = [], [], 0.0
    for lo in range(0, len(data), batch_size):
        rows = np.arange(lo, min(len(data), lo + batch_size))
        a, w, n = plan_fn(data.inputs(rows))
        preds.append(a)
        ways.append(w)
        nfe += float(torch.as_tensor(n, dtype=torch.float64).sum())
    a = torch.cat(preds).numpy()
    w = torch.cat(ways).numpy()
    l2 = np.linalg.norm(w - data.waypoints, axis=-1)  # [S, K]
    res = {"policy": name, "samples": len(data), "forwards_per_plan": nfe / len(data),
           "action_acc": float((a == data.actions).mean()), "first_action_acc": float((a[:, 0] == data.actions[:, 0]).mean())}
    for k in range(tok.horizon):
        res[f"l2_{(k + 1) * tok.dt:g}s"] = float(np.nanmean(l2[:, k]))
    return res


def batch1_latency(planners: dict, data, n=60):
    """{name: (median ms, p90 ms)} of planning one raw observation. The planners take turns on each
    observation (in a rotating order), so a change in machine load hits all of them alike."""
    names = list(planners)
    times = {k: [] for k in names}
    for i in range(min(n, len(data))):
        obs = data.observation(i)
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t = time.perf_counter()
            planners[name](obs)
            times[name].append(1e3 * (time.perf_counter() - t))
    return {k: (float(np.median(v[3:])), float(np.percentile(v[3:], 90))) for k, v in times.items()}


def closed_loop(name, policy, densities, episodes, seed, duration=None):
    from tqdm.auto import tqdm

    from modalities.data.driving import make_env, observe

    rows = []
    bar = tqdm(total=len(densities) * episodes, desc=f"closed loop {name}")
    for di, density in enumerate(densities):
        env = make_env(density, duration)
        try:
            for e in range(episodes):
                obs, _ = env.reset(seed=seed + 1000 * di + e)
                u = env.unwrapped
                x0 = float(u.vehicle.position[0])
                speeds, lat, crashed, done, steps = [], [], False, False, 0
                while not done:
                    raw = observe(env, obs)
                    t = time.perf_counter()
                    action = int(policy(env, raw))
                    lat.append(1e3 * (time.perf_counter() - t))
                    obs, _, terminated, truncated, _ = env.step(action)
                    speeds.append(float(u.vehicle.speed))
                    steps += 1
                    done = terminated or truncated
                    crashed = bool(u.vehicle.crashed)
                rows.append({"density": density, "crashed": crashed, "completed": (not crashed) and truncated,
                             "mean_speed": float(np.mean(speeds)), "distance": float(u.vehicle.position[0]) - x0,
                             "decisions": steps, "latency_ms": lat})
                bar.update(1)
        finally:
            env.close()
    bar.close()

    def summary(sel):
        lat = np.concatenate([r["latency_ms"] for r in sel])
        return {"episodes": len(sel), "collision_rate": float(np.mean([r["crashed"] for r in sel])),
                "completed": int(sum(r["completed"] for r in sel)),
                "mean_speed": float(np.mean([r["mean_speed"] for r in sel])),
                "mean_distance": float(np.mean([r["distance"] for r in sel])),
                "decisions": int(sum(r["decisions"] for r in sel)),
                "latency_ms_median": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90))}

    out = {"policy": name, **summary(rows)}
    out["per_density"] = {str(d): summary([r for r in rows if r["density"] == d]) for d in densities}
    return out


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusion", default="runs/driving_tiny/pipeline")
    ap.add_argument("--ar", default="runs/driving_tiny_ar/pipeline")
    ap.add_argument("--valid", default="data/driving/valid.npz")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--episodes", type=int, default=10, help="closed-loop episodes per density")
    ap.add_argument("--seed", type=int, default=10_000)
    ap.add_argument("--duration", type=int, default=None, help="episode length in s (default: the env's 30)")
    ap.add_argument("--skip-closed-loop", action="store_true")
    ap.add_argument("--valid-limit", type=int, default=None, help="use only the first N validation samples")
    ap.add_argument("--latency-samples", type=int, default=60, help="observations timed at batch 1 per planner")
    ap.add_argument("--closed-loop-steps", type=int, nargs="*", default=[],
                    help="also drive with the diffusion planner on the LLaDA schedule with these step counts")
    ap.add_argument("--policies", nargs="*", default=None,
                    help="closed-loop policies to run (default all): rule-based idle diffusion autoregressive "
                         "and 'diffusion-<steps>' for --closed-loop-steps")
    ap.add_argument("--out", default="experiments/results/driving_eval.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from modalities.data.driving import ACTION_INDEX, DrivingDataset, RuleBasedDriver
    from pipelines.planning import PlanningPipeline

    data = DrivingDataset.load(args.valid)
    if args.valid_limit:
        data = data.subset(np.arange(min(args.valid_limit, len(data))))
    pipes = {}
    for name, path in (("diffusion", args.diffusion), ("autoregressive", args.ar)):
        if path and Path(path, "model_index.json").is_file():
            p = PlanningPipeline.from_pretrained(path)
            p.set_progress_bar_config(disable=True)
            pipes[name] = p
        else:
            print(f"skipping {name}: no pipeline at {path}")
    tok = next(iter(pipes.values())).plan_tokenizer if pipes else None
    results = {"command": "python experiments/driving_eval.py " + " ".join(sys.argv[1:] if argv is None else argv), "open_loop": [],
               "closed_loop": [], "torch_threads": torch.get_num_threads(), "valid": args.valid}

    # ---- open loop
    if tok is not None:
        def constant(inputs):
            b, k = inputs.batch_size, tok.horizon
            t = torch.arange(1, k + 1) * tok.dt
            way = torch.stack([inputs.ego[:, :1] * t, torch.zeros(b, k)], -1)
            return torch.full((b, k), ACTION_INDEX["IDLE"]), way, torch.zeros(b)

        results["open_loop"].append(open_loop("constant (IDLE, constant speed)", constant, data, tok))
        settings = {"diffusion": [("threshold 0.9 (default)", {}), ("threshold 0.9, no cache", {"cache": "none"}),
                                  ("schedule, 9 steps", {"steps": 9}),
                                  ("schedule, 3 steps", {"steps": 3}), ("schedule, 1 step", {"steps": 1})],
                    "autoregressive": [("greedy", {})]}
        latency_fns = {}
        for name, pipe in pipes.items():
            for label, kw in settings[name]:
                def plan(inputs, pipe=pipe, kw=kw):
                    out = pipe(inputs, **kw)
                    return out.action_ids, out.waypoints, out.row_steps
                r = open_loop(f"{name}: {label}", plan, data, tok)
                latency_fns[r["policy"]] = lambda o, pipe=pipe, kw=kw: pipe(o, **kw)
                results["open_loop"].append(r)
                print(json.dumps(r))
        lat = batch1_latency(latency_fns, data, args.latency_samples)
        for r in results["open_loop"]:
            if r["policy"] in lat:
                r["latency_ms_batch1_median"], r["latency_ms_batch1_p90"] = lat[r["policy"]]
        results["open_loop_table"] = table(results["open_loop"], [
            "policy", "l2_1s", "l2_2s", "l2_3s", "action_acc", "first_action_acc", "forwards_per_plan",
            "latency_ms_batch1_median", "latency_ms_batch1_p90"])
        print(results["open_loop_table"])

    # ---- closed loop
    if not args.skip_closed_loop:
        driver = RuleBasedDriver()
        policies = [("rule-based (IDM+MOBIL)", "rule-based", driver),
                    ("idle", "idle", lambda env, raw: ACTION_INDEX["IDLE"])]
        for name, pipe in pipes.items():
            policies.append((name, name, lambda env, raw, pipe=pipe: pipe.plan_action(raw)))
        if "diffusion" in pipes:
            for n in args.closed_loop_steps:
                policies.append((f"diffusion, schedule {n} step(s)", f"diffusion-{n}",
                                 lambda env, raw, n=n: pipes["diffusion"].plan_action(raw, steps=n)))
        for name, key, policy in policies:
            if args.policies is not None and key not in args.policies:
                continue
            r = closed_loop(name, policy, args.densities, args.episodes, args.seed, args.duration)
            results["closed_loop"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "per_density"}))
        results["closed_loop_table"] = table(results["closed_loop"], [
            "policy", "episodes", "collision_rate", "completed", "mean_speed", "mean_distance", "latency_ms_median",
            "latency_ms_p90"])
        per = [{"policy": r["policy"], "density": d, **v} for r in results["closed_loop"] for d, v in r["per_density"].items()]
        results["closed_loop_per_density_table"] = table(per, ["policy", "density", "episodes", "collision_rate",
                                                                "completed", "mean_speed", "mean_distance"])
        print(results["closed_loop_table"])
        print(results["closed_loop_per_density_table"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    md = [f"# Driving planners\n\n`{results['command']}` (torch threads: {results['torch_threads']})\n"]
    for key, title in (("open_loop_table", "Open loop (validation set)"), ("closed_loop_table", "Closed loop"),
                       ("closed_loop_per_density_table", "Closed loop per traffic density")):
        if key in results:
            md.append(f"## {title}\n\n{results[key]}\n")
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
