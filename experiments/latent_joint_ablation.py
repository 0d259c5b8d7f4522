"""What each change to the CCDD joint model buys against its discrete-only baseline, at one training budget.

Every variant is ``configs/latent_joint.yaml`` with the same steps, data and backbone; only the objective
(and, at sampling, the token schedule) changes:

- ``discrete``: the masked-diffusion SFT baseline;
- ``joint``: CCDD as the recipe has it (latent noise levels independent of the tokens');
- ``+dropout``: ``objective.latent_dropout=0.5``: half the rows see pure-noise latents, so the tokens learn to
  answer without them;
- ``+shared``: ``objective.time_coupling=shared``: the latents sit at the tokens' noise level, the pairing
  joint sampling walks along;
- ``+shared+dropout``: both;
- ``+self``: ``objective.self_latents=0.5``: half the rows see the model's own latent estimate from pure
  noise, re-noised to their level (what sampling feeds the tokens), instead of the true latents; one
  extra forward without gradient per step;
- ``+dropout+self``, ``+shared+dropout+self``: the combinations.

Each is scored on every held-out problem with the linear token schedule (and, for the joint variants, the
``aligned`` one, which commits the tokens along the latent noise levels), next to the diagnostics of
:mod:`experiments.latent_joint_diagnosis`: the tokens' accuracy next to pure-noise latents ("tokens alone")
and the MSE of the 4-step latent sample to the true latents.

    python -m experiments.latent_joint_ablation --steps 600 data.n_train=2000
    python -m experiments.latent_joint_ablation --steps 4 --runs /tmp/smoke data.n_train=100 data.n_test=40

At equal training compute (``--equal-compute VARIANT``): every variant's seconds per training step are timed
side by side first (short runs in one process, alternating, the median of ``--cost-rounds``), and the discrete
baseline also trains for the steps that cost what ``--steps`` of VARIANT cost; the table gains the measured
seconds per step and each row's compute in discrete steps:

    python -m experiments.latent_joint_ablation --variants discrete joint+shared+dropout --steps 4000 \
        --equal-compute joint+shared+dropout latents.pool=4

Writes ``experiments/results/latent_joint_ablation.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from omegaconf import OmegaConf

from experiments.latent_joint_diagnosis import latent_errors, noised_oracle, write_report
from experiments.latent_tasks import add_common_args, equal_compute, markdown_table, train_recipe
from latent.data.arithmetic import equation_text
from pipelines.tasks.autoencoders import arithmetic_split
from pipelines.tasks.joint import JointGenerator, answer_scores

VARIANTS = {
    "discrete": ["objective.mode=discrete"],
    "joint": [],
    "joint+dropout": ["objective.latent_dropout=0.5"],
    "joint+shared": ["objective.time_coupling=shared"],
    "joint+shared+dropout": ["objective.time_coupling=shared", "objective.latent_dropout=0.5"],
    "joint+self": ["objective.self_latents=0.5"],
    "joint+dropout+self": ["objective.latent_dropout=0.5", "objective.self_latents=0.5"],
    "joint+shared+dropout+self": ["objective.time_coupling=shared", "objective.latent_dropout=0.5",
                                  "objective.self_latents=0.5"],
}
# (sampling steps, sampling): "linear" / "aligned" token schedules beside the denoised latents;
# "latents at noise": the linear schedule, the latent stream left at pure noise (latent_stream="noise")
SAMPLINGS = [(2, "linear"), (4, "linear"), (4, "aligned"), (8, "linear"), (8, "aligned"), (2, "latents at noise"),
             (4, "latents at noise")]


def run_name(variant: str) -> str:
    return "abl_" + variant.replace("+", "_")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--equal-compute", metavar="VARIANT", choices=list(VARIANTS),
                    help="also train the discrete baseline with the compute of --steps steps of VARIANT")
    ap.add_argument("--cost-steps", type=int, default=100, help="timed steps per variant and round (--equal-compute)")
    ap.add_argument("--cost-rounds", type=int, default=3)
    add_common_args(ap)
    args = ap.parse_intermixed_args(argv)
    if args.equal_compute and args.steps is None:
        ap.error("--equal-compute needs --steps (the budget of the variant it matches)")

    runs = [(v, v, args) for v in args.variants]
    cost = {}
    if args.equal_compute:
        timed = list(dict.fromkeys(["discrete", args.equal_compute, *args.variants]))
        cost, matched = equal_compute("latent_joint", {v: [*VARIANTS[v], f"run.name={run_name(v)}"] for v in timed},
                                      args, args.equal_compute, "discrete")
        runs.append((f"discrete, compute of {args.equal_compute}", "discrete", matched))

    results, diffs, steps = {}, [], None
    for label, variant, a in runs:
        t0 = time.time()
        name = run_name(variant) if label == variant else run_name(variant) + "_equal_compute"
        res = train_recipe("latent_joint", [*VARIANTS[variant], f"run.name={name}"], a)
        train_s = time.time() - t0
        cfg = OmegaConf.load(res.run_dir / "config.yaml")
        steps = cfg.trainer.max_steps
        diag = (dict(steps=steps, s_per_step=cost[variant], compute_discrete_steps=steps * cost[variant] / cost["discrete"])
                if cost else {})
        test = arithmetic_split(cfg)[1]
        diffs = sorted({p.difficulty for p in test})
        gen = JointGenerator.from_pretrained(res.pipeline_dir)
        joint = gen.mode == "joint"
        if joint:
            clean = gen.encode_latents([equation_text(p) for p in test]).float().cpu()
            diag["tokens_alone"] = noised_oracle(gen, test, clean, (1.0,))[1.0]["acc"]
            lat = gen(questions=[p.question for p in test], steps=4, generator=torch.Generator().manual_seed(0)).latents
            diag["latent_mse_4"] = latent_errors(lat.float(), clean)["mse"]
        for ns, schedule in SAMPLINGS:
            if schedule != "linear" and not joint:
                continue
            how = (dict(latent_stream="noise") if schedule == "latents at noise"
                   else dict(token_schedule=schedule, latent_stream="joint"))
            acc, _ = answer_scores(gen, test, "answer", 200, steps=ns, **how)
            results[f"{label}/{ns}/{schedule}"] = dict(acc=acc, train_s=train_s, **diag)
            print(label, ns, schedule, acc["all"], diag, flush=True)

    rows = []
    for key, v in results.items():
        variant, ns, schedule = key.split("/")
        spent = [v["steps"], v["s_per_step"], v["compute_discrete_steps"]] if cost else []
        rows.append([variant, *spent, int(ns), schedule] + [v["acc"].get(d, float("nan")) for d in diffs]
                    + [v["acc"]["all"], v.get("tokens_alone", float("nan")), v.get("latent_mse_4", float("nan"))])
    spent = ["training steps", "s / step (side by side)", "compute (discrete steps)"] if cost else []
    table = markdown_table(["variant", *spent, "steps (NFE)", "sampling"] + [f"acc d={d}" for d in diffs]
                           + ["acc all", "tokens alone", "latent MSE (4 steps)"], rows)
    cmd = "python -m experiments.latent_joint_ablation " + " ".join(sys.argv[1:] if argv is None else argv)
    budget = (f"{args.steps} training steps each, and the discrete baseline at the compute of {args.steps} steps "
              f"of {args.equal_compute}" if cost else f"{steps} training steps each")
    text = (f"# CCDD joint ablation\n\n`{cmd.strip()}` ({budget}, the same data and backbone)"
            f"\n\n{table}\n\n`sampling`: the token schedule beside the denoised latents, or `latents at noise`: the "
            "linear schedule with the latent stream left at pure noise (`latent_stream=\"noise\"`). `tokens alone` (column): answer accuracy "
            "of the tokens next to the true latents noised to pure noise, one token a step (the latent stream carries nothing). `latent MSE`: the 4-step latent sample against the true latents "
            "of the test text (predicting 0 scores 0.62, the mean test latent 0.52: padding slots are 0). `+self` variants run one extra forward without gradient per training step (about a third more training compute).\n")
    write_report(args.out, "latent_joint_ablation", text, dict(args=vars(args), results=results, s_per_step=cost))


if __name__ == "__main__":
    main()
