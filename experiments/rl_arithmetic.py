"""RL with verifiable rewards on arithmetic: greedy accuracy before and after, and the reward curve.

The policy is the answer-only SFT baseline of ``configs/latent_reasoning.yaml`` on 1- and 2-operation
problems (trained first into ``<runs>/rl_sft_arithmetic`` when missing); ``configs/rl_arithmetic.yaml`` then
runs GRPO from it, once per likelihood estimate (``elbo``: coupled-mask ELBO; ``trajectory``: the sampler's
decoding path), at the recipe's fixed budget. Accuracy is greedy exact match on the held-out problems of the
SFT split (the RL task's eval set, scored by its evaluate hook at step 0 and at the end).

    python -m experiments.rl_arithmetic                    # ~10-15 CPU minutes on one thread
    python -m experiments.rl_arithmetic --steps 4 --runs /tmp/rl_smoke     # smoke

Writes ``experiments/results/rl_arithmetic.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from experiments.latent_tasks import read_log, train_recipe

SFT = ["objective.method=answer", "run.name=rl_sft_arithmetic", "data.difficulties=[1,2]", "data.n_test=200",
       "trainer.max_steps=800", "optim.warmup_steps=40", "trainer.save_every=0", "eval.problems=200"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--likelihoods", nargs="+", default=["elbo", "trajectory"], choices=["elbo", "trajectory"])
    ap.add_argument("--steps", type=int, default=None, help="RL steps (default: the recipe's)")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="experiments/results/rl_arithmetic.json")
    ap.add_argument("overrides", nargs="*", help="overrides of configs/rl_arithmetic.yaml")
    args = ap.parse_intermixed_args(argv)
    runs = Path(args.runs)
    sft_dir = runs / "rl_sft_arithmetic"
    t0 = time.process_time()
    if not (sft_dir / "pipeline" / "joint.json").is_file():
        train_recipe("latent_reasoning", [*SFT, f"run.output_dir={sft_dir}", "trainer.progress=false"])
    sft_eval = read_log(sft_dir, "eval.csv")[-1]
    results = {}
    for likelihood in args.likelihoods:
        name = "rl_arithmetic" + ("" if likelihood == "elbo" else f"_{likelihood}")
        over = [f"model.init_from={sft_dir / 'pipeline'}", f"objective.likelihood={likelihood}", f"run.name={name}",
                f"run.output_dir={runs / name}", "trainer.progress=false", *args.overrides]
        if args.steps is not None:
            over.append(f"trainer.max_steps={args.steps}")
        res = train_recipe("rl_arithmetic", over)
        evals, log = read_log(res.run_dir, "eval.csv"), read_log(res.run_dir)
        results[likelihood] = {
            "acc_before": {k: evals[0][k] for k in evals[0] if k.startswith("acc")},
            "acc_after": {k: evals[-1][k] for k in evals[-1] if k.startswith("acc")},
            "formatted_before": evals[0].get("formatted"), "formatted_after": evals[-1].get("formatted"),
            "reward_curve": [[int(r["step"]), round(r["reward"], 4), round(r["accuracy"], 4), round(r["kl"], 5)]
                             for r in log],
            "steps": int(log[-1]["step"]), "wall_s": log[-1]["elapsed_s"],
        }
        print(likelihood, {k: v for k, v in results[likelihood].items() if k != "reward_curve"}, flush=True)
    out = {
        "command": "python -m experiments.rl_arithmetic " + " ".join(sys.argv[1:] if argv is None else argv),
        "policy": {"recipe": "configs/latent_reasoning.yaml", "overrides": SFT, "eval": sft_eval},
        "recipe": "configs/rl_arithmetic.yaml", "overrides": args.overrides,
        "eval": "greedy exact match on the held-out problems (difficulties 1 and 2, one token a step)",
        "reward_curve_columns": ["step", "reward (correct + 0.1 formatted), sampled at T=1",
                                 "accuracy of the sampled completions", "k3 KL per token to the reference"],
        "results": results, "cpu_s_this_invocation": round(time.process_time() - t0, 1),  # runs already trained resume at their end
    }
    os.makedirs(Path(args.out).parent, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
