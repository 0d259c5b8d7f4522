"""Decoders of the literature (FreeCache, AR-guided unmasking, CtrlDiff's dynamic block and classifier
guidance, EDLM) against the base decoder they change, on the copy task: forwards per batch, tokens/s and
exact-match accuracy. A small bidirectional model and its autoregressive peer of the same size (the guide
and energy model) are trained first with the copy recipes (configs/copy_*.yaml) through the trainer, smaller
than benchmarks/decoding.py's so that both train in a few CPU minutes.

    python benchmarks/literature_decoders.py          # train once, measure, write experiments/results/literature-decoders-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoding import make_batch, train  # noqa: E402 - the copy models, trained by benchmarks/decoding.py's recipe

from latent import DiffusionTransformer  # noqa: E402
from latent.sampling import generate  # noqa: E402


def prompt_symbols_classifier(prompts: torch.Tensor, vocab: int):
    """An attribute classifier for classifier guidance: log p(c | x_t = v) is log 0.9 for the symbols of the
    row's prompt and log 0.1 for the others (c: "the answer uses the prompt's symbols")."""
    inside = torch.zeros(prompts.shape[0], vocab, dtype=torch.bool).scatter_(1, prompts, True)
    table = torch.where(inside, torch.tensor(0.9).log(), torch.tensor(0.1).log())

    def classifier(canvas, start, end):
        return table[: canvas.shape[0], None, :].expand(-1, end - start, -1)

    return classifier


def configs(args, guide, vocab: int):
    th = dict(commit="threshold", threshold=args.threshold)
    sampled = dict(steps=args.gen // 4, temperature=1.0)
    return [  # (name, base it is compared with, knobs; a callable gets the prompts)
        ("threshold", None, th),
        ("threshold+freecache", "threshold", dict(th, cache="freecache")),
        ("threshold+prefix_cache", "threshold", dict(th, cache="prefix")),
        ("ar_guided", "threshold", dict(commit="ar_guided", guide_model=guide)),
        ("threshold+dynamic_block", "threshold", dict(th, block_length=args.gen, stopping="dynamic_block",
                                                      dynamic_block_sizes=(4, 8, 16, 32))),
        ("threshold+classifier", "threshold", lambda p: dict(th, guidance="classifier", classifier_scale=2.0,
                                                             classifier=prompt_symbols_classifier(p, vocab))),
        ("sampled_4tok_per_step", None, sampled),
        ("sampled_4tok_per_step+edlm", "sampled_4tok_per_step", dict(sampled, proposal="edlm", energy_model=guide,
                                                                     num_candidates=4, edlm_window=(0.0, 1.0))),
    ]


def measure(model, data, args, knobs) -> dict:
    correct = total = nfe = 0
    elapsed = 0.0
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        batch = data[(r % args.rounds) * args.batch : (r % args.rounds + 1) * args.batch]
        prompts = batch[:, : args.prompt]
        run = knobs(prompts) if callable(knobs) else knobs
        run = {"block_length": args.block, **run}
        start = time.perf_counter()
        with torch.no_grad():
            out = generate(model, prompts, gen_length=args.gen, generator=torch.Generator().manual_seed(r), **run)
        took = time.perf_counter() - start
        if r == 0:
            continue
        elapsed += took
        nfe += out.nfe
        correct += int((out.sequences[:, args.prompt :] == batch[:, args.prompt :]).sum())
        total += batch[:, args.prompt :].numel()
    return dict(tokens_per_s=total / elapsed, nfe_per_batch=nfe / args.rounds, accuracy=correct / total, seconds=elapsed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_literature", help="where the trained models are kept")
    ap.add_argument("--out", default="experiments/results/literature-decoders-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    started = time.perf_counter()
    paths = {layout: train(layout, args, work) for layout in ("bidirectional", "causal")}
    train_s = time.perf_counter() - started
    model = DiffusionTransformer.from_pretrained(paths["bidirectional"]).eval()
    guide = DiffusionTransformer.from_pretrained(paths["causal"]).eval()
    data = make_batch(args.batch * args.rounds, args.prompt, args.gen, torch.Generator().manual_seed(123))
    rows = []
    for name, base, knobs in configs(args, guide, model.config.vocab_size):
        row = dict(name=name, base=base, **measure(model, data, args, knobs))
        rows.append(row)
        print(f"{name:30s} {row['tokens_per_s']:8.1f} tok/s  nfe/batch {row['nfe_per_batch']:6.1f}  "
              f"acc {row['accuracy']:.4f}", flush=True)
    by = {r["name"]: r for r in rows}
    for row in rows:
        if row["base"]:
            row["speed_vs_base"] = row["tokens_per_s"] / by[row["base"]]["tokens_per_s"]
            row["nfe_vs_base"] = row["nfe_per_batch"] / by[row["base"]]["nfe_per_batch"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join(sys.argv), machine=platform.processor() or platform.machine(),
        torch=torch.__version__, threads=args.threads, train_seconds=train_s, args=vars(args), rows=rows,
    ), indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
