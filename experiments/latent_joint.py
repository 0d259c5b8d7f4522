"""Discrete-only masked diffusion vs CCDD joint (tokens + continuous latents) at equal parameters and steps.

Task: multi-step arithmetic (:mod:`latent.data.arithmetic`), question -> answer. Both models are the
recipe ``configs/latent_joint.yaml`` (the same ``DiffusionTransformer`` config, ``latent_dim`` set in both,
so the parameter count is identical), trained on the same problems for the same number of steps:

- discrete: ``objective.mode=discrete``, the masked-diffusion SFT loss on the answer tokens only;
- joint:    ``CE + lam * MSE``, the latents being the frozen MiniLM encoder's token states of the whole
            ``question=answer`` text (PCA to ``latent_dim`` channels, standardised): the continuous view of
            the same sequence, as in CCDD. At test time the latents are generated from noise together with
            the answer tokens, one forward per step.

    python -m experiments.latent_joint                    # ~20-30 min on one busy CPU thread
    python -m experiments.latent_joint --steps 300        # shorter
    python -m experiments.latent_joint --steps 4 --runs /tmp/smoke data.n_train=100 data.n_test=40   # smoke run

Trains ``<runs>/latent_joint_discrete`` and ``<runs>/latent_joint``, scores their exported
``JointGenerator`` folders on every held-out problem and writes ``experiments/results/latent_joint.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from omegaconf import OmegaConf

from experiments.latent_tasks import add_common_args, markdown_table, read_log, train_recipe
from latent.data.arithmetic import accuracy_by_difficulty, equation_text
from pipelines.tasks.autoencoders import arithmetic_split
from pipelines.tasks.joint import JointGenerator, answer_scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample-steps", type=int, nargs="+", default=[2, 4])
    add_common_args(ap)
    args = ap.parse_intermixed_args(argv)
    os.makedirs(args.out, exist_ok=True)

    results, curves, diffs = {}, {}, []
    for mode in ("discrete", "joint"):
        t0 = time.time()
        res = train_recipe("latent_joint", [f"objective.mode={mode}",
                                            f"run.name=latent_joint{'_discrete' if mode == 'discrete' else ''}"], args)
        train_s = time.time() - t0
        cfg = OmegaConf.load(res.run_dir / "config.yaml")
        test = arithmetic_split(cfg)[1]
        diffs = sorted({p.difficulty for p in test})
        gen = JointGenerator.from_pretrained(res.pipeline_dir)
        params = sum(p.numel() for p in gen.model.parameters())
        curves[mode] = [(r["step"], r["loss"]) for r in read_log(res.run_dir)]
        for ns in args.sample_steps:
            t1 = time.time()
            acc, _ = answer_scores(gen, test, "answer", 200, steps=ns)
            results[f"{mode}/{ns}"] = dict(acc=acc, train_s=train_s, sample_s=time.time() - t1, params=params)
            print(mode, ns, acc, flush=True)
        if mode == "joint":  # diagnostic: tokens decoded next to the true clean latents (noise level 0)
            ns = max(args.sample_steps)
            clean = gen.encode_latents([equation_text(p) for p in test])
            texts = []
            for i in range(0, len(test), 200):
                texts += gen(questions=[p.question for p in test[i : i + 200]], steps=ns,
                             clean_latents=clean[i : i + 200]).texts
            results[f"joint-oracle-latents/{ns}"] = dict(acc=accuracy_by_difficulty(test, texts), train_s=train_s,
                                                         sample_s=0.0, params=params)
            print("joint with oracle latents", results[f"joint-oracle-latents/{ns}"]["acc"], flush=True)

    rows = [[k.split("/")[0], int(k.split("/")[1]), v["params"]] + [v["acc"].get(d, float("nan")) for d in diffs]
            + [v["acc"]["all"]] for k, v in results.items()]
    table = markdown_table(["mode", "sampling steps", "params"] + [f"acc d={d}" for d in diffs] + ["acc all"], rows)
    cmd = "python -m experiments.latent_joint " + " ".join(sys.argv[1:] if argv is None else argv)
    steps = OmegaConf.load(res.run_dir / "config.yaml").trainer.max_steps
    text = (f"# Discrete-only vs CCDD joint\n\n`{cmd.strip()}` ({steps} training steps each)\n\n{table}\n\n"
            "`joint-oracle-latents` is a diagnostic, not a method: the joint model's tokens decoded next to the "
            "true clean latents of the test text (which contain the answer), showing how much the token stream "
            "leans on the continuous stream.\n")
    with open(os.path.join(args.out, "latent_joint.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "latent_joint.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results, curves=curves), f, indent=1, default=str)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k, v in results.items():
        ax[0].plot(diffs, [v["acc"].get(d, float("nan")) for d in diffs], marker="o", label=k)
    ax[0].set(xlabel="difficulty (operations)", ylabel="exact-match accuracy", title="answer accuracy", xticks=diffs)
    ax[0].legend()
    for mode, c in curves.items():
        ax[1].plot([s for s, _ in c], [v for _, v in c], label=mode)
    ax[1].set(xlabel="step", ylabel="training loss (joint: CE + lam*MSE)", title="training", yscale="log")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "latent_joint.png"), dpi=100)


if __name__ == "__main__":
    main()
