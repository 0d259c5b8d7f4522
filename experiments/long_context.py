"""Long context for a masked-diffusion model: does NTK rope scaling keep retrieval working past the trained
length, where plain rotary does not? (LongLLaDA's question, on a tiny model.)

    python experiments/long_context.py                               # train configs/passkey_bidirectional.yaml, evaluate
    python experiments/long_context.py --run runs/passkey_bidirectional     # evaluate a finished run
    python experiments/long_context.py trainer.max_steps=50 --rows 32        # smoke run (any recipe override)

The recipe trains a bidirectional backbone through the one trainer on passkey-retrieval rows of L = 32
tokens (a needle of a key and 4 values at a random offset of a filler haystack, then the key; the answer is
the 4 values: pipelines/tasks/copy.py, data.kind=passkey). The same weights are then evaluated on rows with
longer haystacks, up to three times the trained length, with plain rotary and with {"type": "ntk",
"factor": f} (the backbone's static NTK: base theta * f ** (d / (d - 2))). The recipe's rope_theta = 10 makes
the trained length cover the rotary pairs the way a 4k-context model with base 1e4 does (about the last
third of the pairs never turn a full period within L); with the usual 1e4 only the 3 fastest of 16 pairs
do, and NTK barely moves the pairs that matter (results/long_context_theta1e4.json). Decoding: LLaDA's
schedule, one answer token per forward, greedy. Writes experiments/results/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def with_rope(model, scaling):
    """The same weights under another rope scaling (rotary frequencies are buffers, not weights)."""
    from latent import DiffusionTransformer

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    other = DiffusionTransformer.from_config({**config, "rope_scaling": scaling}).eval()
    other.load_state_dict(model.state_dict())
    return other


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/passkey_bidirectional.yaml")
    ap.add_argument("--run", help="evaluate this finished run (its pipeline/model) instead of training")
    ap.add_argument("--lengths", default="32,34,40,48,64,96", help="row lengths to evaluate (the recipe's is the trained one)")
    ap.add_argument("--rows", type=int, default=512, help="held-out rows per length")
    ap.add_argument("--factors", default="1.5,2,3", help="NTK factors to evaluate, comma-separated")
    ap.add_argument("--out", default="experiments/results/long_context.json")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. trainer.max_steps=50")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from omegaconf import OmegaConf

    import pipelines.tasks  # noqa: F401 - registers the tasks
    from latent import DiffusionTransformer
    from latent.sampling import generate
    from latent.training.config import load_config
    from latent.training.trainer import train
    from pipelines.tasks.copy import task_rows

    cfg = load_config(args.recipe, args.overrides)
    started = time.time()
    if args.run:
        folder, steps = Path(args.run) / "pipeline" / "model", None
    else:
        result = train(cfg)
        folder, steps = result.pipeline_dir / "model", result.step
    model = DiffusionTransformer.from_pretrained(str(folder)).eval()
    d = cfg.data
    answer, trained = d.answer_length, d.prompt_length + d.answer_length
    rows_out = []
    for length in map(int, args.lengths.split(",")):
        data = OmegaConf.merge(d, {"prompt_length": length - answer})  # a longer haystack (or listing)
        rows = task_rows(data, args.rows, torch.Generator().manual_seed(length))
        row = {"length": length, "length_over_trained": round(length / trained, 3)}
        factors = [float(f) for f in args.factors.split(",")]
        for name, scaling in [("plain", None)] + [(f"ntk{f:g}", {"type": "ntk", "factor": f}) for f in factors]:
            scaled = model if scaling is None else with_rope(model, scaling)
            with torch.no_grad():
                out = generate(scaled, rows[:, : length - answer], gen_length=answer, block_length=answer, steps=answer)
            hit = out.sequences[:, length - answer :] == rows[:, length - answer :]
            row[f"token_accuracy_{name}"] = round(hit.float().mean().item(), 4)
            row[f"row_accuracy_{name}"] = round(hit.all(1).float().mean().item(), 4)
        rows_out.append(row)
        print(json.dumps(row))
    results = {
        "command": "python experiments/long_context.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "recipe": args.recipe, "trained_length": trained, "train_steps": steps, "rows_per_length": args.rows,
        "rope_theta": model.config.rope_theta, "ntk_factors": args.factors,
        # a passkey digit is one of its own share of the value symbols
        "token_chance": round((answer if d.kind == "passkey" else 1) / d.value_symbols, 4),
        "seconds": round(time.time() - started, 1),
        "decoding": f"LLaDA schedule, {answer} steps for {answer} answer tokens, greedy", "rows": rows_out,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
