"""Answer-only masked diffusion vs text chain of thought vs latent reasoning, at matched compute.

Task: multi-step arithmetic (:mod:`latent.data.arithmetic`), accuracy per difficulty (1-4 operations). All
three are the recipe ``configs/latent_reasoning.yaml`` (the same ``DiffusionTransformer`` config with
``latent_dim`` set, so the parameter count is identical, the same problems, the same optimiser steps):

- answer:  ``[question | answer]``, masked-diffusion SFT loss on the answer;
- cot:     ``[question | step;step;...;step>answer]``, the same loss on chain + answer; sampled with
           one token per step, confidence order (the chain is in text);
- latent:  ``LatentReasoningPipeline``: each step encoded by the ThoughtVAE of
           ``configs/latent_thought_vae.yaml`` (trained first when its run folder is missing) into k latent
           thought tokens (K = 4 blocks, shorter chains repeat their last step), trained with
           ``latent_reasoning_loss`` (CE on the answer + lam * MSE on noisy thought blocks), sampled block by
           block with a diffusers scheduler (guided by the recipe's ``eval.guidance_scale``, saved as the
           pipeline's default); every thought is decoded back to text by the VAE.

    python -m experiments.latent_reasoning        # ~30-60 min on one busy CPU thread
    python -m experiments.latent_reasoning --steps 4 --runs /tmp/smoke data.n_train=100 data.n_test=40   # smoke

At equal training compute (``--equal-compute latent``): each method's seconds per training step are timed side by
side first (:func:`experiments.latent_tasks.step_seconds`), and answer-only also trains for the steps that cost
what ``--steps`` steps of that method cost; the table gains the steps, seconds per step and compute columns.

Trains ``<runs>/latent_reasoning`` (latent), ``<runs>/latent_reasoning_answer`` and ``<runs>/latent_reasoning_cot``
(and the thought VAE into ``<runs>/latent_thought_vae`` when it is missing), scores the exported folders on
every held-out problem and writes ``experiments/results/latent_reasoning.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from experiments.latent_tasks import add_common_args, equal_compute, markdown_table, read_log, train_recipe
from pipelines.latent_reasoning import LatentReasoningPipeline
from pipelines.tasks.autoencoders import arithmetic_split
from pipelines.tasks.joint import JointGenerator, answer_scores
from pipelines.tasks.latent_reasoning import reasoning_scores


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["answer", "cot", "latent"], choices=["answer", "cot", "latent"])
    ap.add_argument("--block-steps", type=int, default=5, help="latent diffusion steps per thought block")
    ap.add_argument("--vae-overrides", nargs="*", default=[],
                    help="overrides of configs/latent_thought_vae.yaml when the thought VAE is trained first")
    ap.add_argument("--equal-compute", metavar="METHOD", choices=["cot", "latent"],
                    help="also train answer-only with the compute of --steps steps of METHOD")
    ap.add_argument("--cost-steps", type=int, default=100, help="timed steps per method and round (--equal-compute)")
    ap.add_argument("--cost-rounds", type=int, default=3)
    add_common_args(ap)
    args = ap.parse_intermixed_args(argv)
    if args.equal_compute and args.steps is None:
        ap.error("--equal-compute needs --steps (the budget of the method it matches)")
    os.makedirs(args.out, exist_ok=True)
    vae_run = Path(args.runs) / "latent_thought_vae"

    def overrides(method, name):
        return [f"objective.method={method}", f"run.name={name}", f"thought_vae.path={vae_run}",
                f"thought_vae.overrides={json.dumps(args.vae_overrides)}"]

    def run_name(method):
        return "latent_reasoning" + ("" if method == "latent" else f"_{method}")

    runs = [(m, m, run_name(m), args) for m in args.methods]
    cost = {}
    if args.equal_compute:
        timed = list(dict.fromkeys(["answer", args.equal_compute, *args.methods]))
        cost, matched = equal_compute("latent_reasoning", {m: overrides(m, run_name(m)) for m in timed}, args,
                                      args.equal_compute, "answer")
        runs.append((f"answer, compute of {args.equal_compute}", "answer", "latent_reasoning_answer_equal_compute",
                     matched))
    results, curves, examples = {}, {}, {}
    diffs, test = [], []
    for label, method, name, a in runs:
        res = train_recipe("latent_reasoning", overrides(method, name), a)
        cfg = OmegaConf.load(res.run_dir / "config.yaml")
        test = arithmetic_split(cfg)[1]
        diffs = sorted({p.difficulty for p in test})
        train_s = read_log(res.run_dir)[-1]["elapsed_s"]
        curves[label] = [(r["step"], r["loss"]) for r in read_log(res.run_dir)]
        spent = {}
        if cost:
            steps = cfg.trainer.max_steps
            spent = dict(steps=steps, s_per_step=cost[method], compute_answer_steps=steps * cost[method] / cost["answer"])
        if method == "latent":
            pipe = LatentReasoningPipeline.from_pretrained(res.pipeline_dir)
            pipe.set_progress_bar_config(disable=True)
            acc, step_acc, (answers, thoughts) = reasoning_scores(pipe, test, args.block_steps, 100)
            nfe = pipe.config.num_thought_blocks * args.block_steps + pipe.config.answer_length
            results[label] = dict(acc=acc, nfe=nfe, train_s=train_s, thought_step_acc=step_acc, **spent)
            examples[label] = [(p.question, th, a) for p, th, a in zip(test[::100], thoughts[::100], answers[::100], strict=False)]
        else:
            gen = JointGenerator.from_pretrained(res.pipeline_dir)
            acc, texts = answer_scores(gen, test, gen.settings["target"], 200)
            results[label] = dict(acc=acc, nfe=gen.settings["target_length"], train_s=train_s, **spent)
            if label == "cot":
                examples[label] = [(p.question, t) for p, t in zip(test[::100], texts[::100], strict=False)]
        print(label, results[label], examples.get(label), flush=True)

    def spent_cells(r):
        return [r["steps"], r["s_per_step"], r["compute_answer_steps"]] if cost else []

    rows = [[m, *spent_cells(r), r["nfe"], f"{r['train_s'] / 60:.1f}"] + [r["acc"].get(d, float("nan")) for d in diffs]
            + [r["acc"]["all"]] for m, r in results.items()]
    spent_head = ["training steps", "s / step (side by side)", "compute (answer-only steps)"] if cost else []
    table = markdown_table(["method", *spent_head, "NFE (sampling forwards)", "train min"]
                           + [f"acc d={d}" for d in diffs] + ["acc all"], rows)
    cmd = "python -m experiments.latent_reasoning " + " ".join(sys.argv[1:] if argv is None else argv)
    ex = ""
    if "latent" in examples:
        ex += "\nLatent thoughts decoded by the VAE (question -> thoughts -> answer):\n" + "\n".join(
            f"- `{qq}` -> {th} -> `{aa}`" for qq, th, aa in examples["latent"])
        ex += f"\n\nDecoded thoughts equal to the true step: {results['latent']['thought_step_acc']:.3f} (per step)\n"
    if "cot" in examples:
        ex += "\nText chains of thought:\n" + "\n".join(f"- `{qq}` -> `{t}`" for qq, t in examples["cot"])
    steps, batch = args.steps or cfg.trainer.max_steps, cfg.trainer.batch_size
    budget = f"{steps} steps x batch {batch} each" + (
        f", and answer-only at the compute of {steps} steps of {args.equal_compute}" if cost else "")
    text = (f"# Latent reasoning vs answer-only vs text CoT\n\n`{cmd.strip()}` ({budget}, "
            f"same model size, {len(test) // max(1, len(diffs))} test problems per difficulty)\n\n{table}\n{ex}\n")
    with open(os.path.join(args.out, "latent_reasoning.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "latent_reasoning.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results, curves=curves, examples=examples, s_per_step=cost), f,
                  indent=1, default=str)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for m, r in results.items():
        ax[0].plot(diffs, [r["acc"].get(d, float("nan")) for d in diffs], marker="o", label=f"{m} (NFE {r['nfe']})")
    ax[0].set(xlabel="difficulty (operations)", ylabel="exact-match accuracy", title="accuracy per difficulty",
              xticks=diffs, ylim=(0, 1.02))
    ax[0].legend()
    for m, c in curves.items():
        ax[1].plot([s for s, _ in c], [v for _, v in c], label=m)
    ax[1].set(xlabel="step", ylabel="training loss", yscale="log", title="training")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "latent_reasoning.png"), dpi=100)


if __name__ == "__main__":
    main()
