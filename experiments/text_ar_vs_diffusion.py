"""Autoregressive vs masked diffusion (vs block diffusion) on the offline English corpus, same budget.

    python experiments/text_ar_vs_diffusion.py                       # 800 steps each, ~5 min per model on one CPU core
    python experiments/text_ar_vs_diffusion.py --steps 1000 --objectives mdm causal

Every run is the tiny backbone of ``configs/text_tiny*.yaml`` -- same size, same tokenizer, the same
packed training sequences in the same order, the same steps, batch, learning-rate schedule and seed;
only the attention layout and the loss differ:

- ``mdm``: bidirectional attention, masked-diffusion loss (LLaDA / MDLM);
- ``causal``: causal attention, next-token loss (the AR baseline);
- ``block_diffusion``: block-causal attention, BD3-LM loss (16-token blocks).

All are scored on the same validation sequences in bits per token: the diffusion models by their
Monte-Carlo ELBO (an upper bound on the NLL), the AR model by its exact NLL; "untrained" is the bound
of the masked-diffusion model at step 0. Results go to ``<out>/results.json`` / ``results.md`` and a
plot of the training losses (nats per token; for the diffusion objectives the loss is itself a
one-draw estimate of the bound) to ``<out>/losses.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {"mdm": "text_tiny.yaml", "causal": "text_tiny_ar.yaml", "block_diffusion": "text_tiny_bd3.yaml"}
LABELS = {"mdm": "masked diffusion (bidirectional)", "causal": "autoregressive (causal)",
          "block_diffusion": "block diffusion (BD3-LM, 16-token blocks)"}


def run(objective: str, args) -> dict:
    import pipelines.tasks  # noqa: F401 - registers the text task
    from latent.training.config import load_config
    from latent.training.trainer import train

    out = Path(args.out) / objective
    over = [f"run.output_dir={out}", f"run.name={objective}", f"trainer.max_steps={args.steps}",
            f"trainer.eval_every={max(1, args.steps // 4)}", f"trainer.save_every={args.steps}",
            "trainer.resume=never", f"eval.elbo_samples={args.elbo_samples}", f"eval.num_samples={args.samples}",
            f"data.corpus_dir={args.corpus_dir}", f"run.seed={args.seed}", *args.overrides]
    cfg = load_config(REPO / "configs" / RECIPES[objective], over)
    t0 = time.perf_counter()
    res = train(cfg)
    minutes = (time.perf_counter() - t0) / 60
    with open(out / "train.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "eval.csv") as f:
        evals = [(int(r["step"]), float(r["val_bits_per_token"])) for r in csv.DictReader(f)]
    return {
        "objective": objective, "label": LABELS[objective], "steps": res.step,
        "tokens": int(rows[-1]["step"]) * int(rows[-1]["samples"]) if rows else 0, "minutes": round(minutes, 2),
        "initial_bits_per_token": evals[0][1], "final_bits_per_token": evals[-1][1],
        "eval_curve": evals, "train_curve": [(int(r["step"]), float(r["loss"])) for r in rows],
        "samples": res.extra.get("samples", []), "run_dir": str(out),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [s for s, _ in r["train_curve"]]
        vals, ema, smooth = [v for _, v in r["train_curve"]], None, []
        for v in vals:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax[0].plot(steps, smooth, label=r["label"])
        ax[1].plot([s for s, _ in r["eval_curve"]], [v for _, v in r["eval_curve"]], "o-", label=r["label"])
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss, nats/token (smoothed)")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("validation bound, bits/token")
    ax[1].legend(fontsize=8)
    fig.suptitle("same tiny backbone, same data and budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--objectives", nargs="+", default=["mdm", "causal"], choices=list(RECIPES))
    ap.add_argument("--elbo-samples", type=int, default=32, help="mask draws per validation sequence")
    ap.add_argument("--samples", type=int, default=4, help="text samples per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-dir", default="data/english")
    ap.add_argument("--out", default="runs/experiments/ar_vs_diffusion")
    ap.add_argument("overrides", nargs="*", help="train.py overrides applied to every run")
    args = ap.parse_args(argv)

    from latent.data.corpus import missing_sources

    if missing_sources():
        raise SystemExit(f"install the corpus sources first: apt-get install -y {' '.join(missing_sources())}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(obj, args) for obj in args.objectives]
    untrained = next((r["initial_bits_per_token"] for r in results if r["objective"] == "mdm"), None)
    lines = [
        "| model | steps | tokens | CPU minutes | validation bits/token (step 0) | validation bits/token (end) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {r['steps']} | {r['tokens']:,} | {r['minutes']} | "
                     f"{r['initial_bits_per_token']:.3f} | {r['final_bits_per_token']:.3f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "untrained_bits_per_token": untrained,
                                                  "results": results}, indent=2))
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "losses.png")
    print()
    print(table)
    if untrained is not None:
        print(f"\nuntrained masked-diffusion model: {untrained:.3f} bits/token (uniform: "
              f"{math.log2(4096):.3f} with the 4096-token BPE)")
    for r in results:
        for s in r["samples"]:
            print(f"{r['objective']:>16} [{s['prompt']}] {s['text']}")
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}, {out / 'losses.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
