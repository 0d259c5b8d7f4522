"""Latent text generation vs token-level masked diffusion: speed at matched quality.

Both generators are the recipe ``configs/latent_textgen.yaml`` and learn the same texts (true equations of
the arithmetic task, e.g. ``4+5*2-3=15``) from scratch with the same backbone size and training steps:

- latent: Gaussian diffusion (v-prediction, DPM-Solver++) over the 4 latents x 32 channels that the
  frozen-MiniLM ``TextCompressor`` (c = 4, domain vocabulary; the recipe trains it first when its run folder
  is missing) makes of a 16-token text, decoded to text by the compressor in one forward;
- token:  ``objective.mode=discrete``, masked diffusion over the 16 character tokens of the text, ancestral
  sampling (random unmasking order, tokens drawn at temperature 1; confidence order collapses unconditional
  samples onto EOS).

Quality is verifiable: the fraction of samples that are well-formed, true equations (left-to-right
evaluation, every partial result in 0..19). Speed: wall-clock milliseconds per sample on one CPU
thread, generation in batches of 100 (decoding included).

    python -m experiments.latent_textgen          # ~20 min on one busy CPU thread (+ the compressor once)
    python -m experiments.latent_textgen --steps 4 --runs /tmp/smoke data.n_train=100 --n-samples 20 \\
        --compressor-overrides trainer.max_steps=4 data.n_train=100                  # smoke run

(Recipe overrides go before the options that take lists.)

Trains ``<runs>/latent_textgen`` and ``<runs>/latent_textgen_token`` and writes
``experiments/results/latent_textgen.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from experiments.latent_tasks import add_common_args, markdown_table, train_recipe
from latent.data.arithmetic import equation_text, is_true_equation
from pipelines.tasks.autoencoders import arithmetic_split
from pipelines.tasks.joint import JointGenerator

COMPRESSOR = ["model.domain_vocab=true", "trainer.max_steps=600", "optim.warmup_steps=30",
              "run.name=latent_compressor_c4_domain"]


def timed(gen, n: int, steps: int, bs: int = 100, **kw):
    """Samples, ms per sample (decoding included) and, for latent samples, ms per sample of the compressor's
    decoding alone (timed again on the same latents)."""
    outs, lats, t0 = [], [], time.perf_counter()
    for i in range(0, n, bs):
        out = gen(num_samples=min(bs, n - i), steps=steps, generator=torch.Generator().manual_seed(i), **kw)
        outs += out.texts
        lats.append(out.latents)
    ms = (time.perf_counter() - t0) * 1000 / n
    dec = 0.0
    if gen.mode == "continuous":
        t1 = time.perf_counter()
        for lat in lats:
            gen.compressor.decode_text(lat)
        dec = (time.perf_counter() - t1) * 1000 / n
    return outs, ms, dec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--token-steps", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--n-samples", type=int, default=300)
    ap.add_argument("--compressor-overrides", nargs="*", default=[],
                    help="more overrides of configs/latent_compressor.yaml when the compressor is trained first")
    add_common_args(ap)
    args = ap.parse_intermixed_args(argv)
    os.makedirs(args.out, exist_ok=True)
    comp = [f"compressor.path={Path(args.runs) / 'latent_compressor_c4_domain'}",
            f"compressor.overrides={json.dumps(COMPRESSOR + args.compressor_overrides)}"]
    latent = train_recipe("latent_textgen", comp, args)
    token = train_recipe("latent_textgen", [*comp, "objective.mode=discrete", "run.name=latent_textgen_token"], args)
    lat_gen = JointGenerator.from_pretrained(latent.pipeline_dir)
    tok_gen = JointGenerator.from_pretrained(token.pipeline_dir)

    cfg = OmegaConf.load(latent.run_dir / "config.yaml")
    texts = [equation_text(p) for p in arithmetic_split(cfg)[0]]
    with torch.no_grad():
        decoded = lat_gen.compressor.decode_text(lat_gen.compressor.encode_text(texts[:500]))
    recon_ok = sum(map(is_true_equation, decoded)) / len(decoded)
    print(f"compressor round trip: {recon_ok:.3f} of training texts decode to true equations", flush=True)

    M = lat_gen.settings["latent_shape"][0]
    rows, res, n = [], {"latent": {}, "token": {}}, args.n_samples
    for s in args.latent_steps:
        outs, ms, dec_ms = timed(lat_gen, n, s)
        q = sum(map(is_true_equation, outs)) / n
        res["latent"][s] = dict(valid=q, ms=ms, decode_ms=dec_ms, examples=outs[:3], distinct=len(set(outs)) / n)
        rows.append(["latent (c=4)", s, M, q, len(set(outs)) / n, ms, dec_ms])
        print("latent", s, q, ms, outs[:3], flush=True)
    for s in args.token_steps:
        outs, ms, _ = timed(tok_gen, n, s, temperature=1.0, order="random")
        q = sum(map(is_true_equation, outs)) / n
        res["token"][s] = dict(valid=q, ms=ms, examples=outs[:3], distinct=len(set(outs)) / n)
        rows.append(["token", s, tok_gen.settings["target_length"], q, len(set(outs)) / n, ms, 0.0])
        print("token", s, q, ms, outs[:3], flush=True)

    table = markdown_table(["generator", "steps", "positions", "true equations", "distinct", "ms / sample",
                            "of which decoding"], rows)
    cmd = "python -m experiments.latent_textgen " + " ".join(sys.argv[1:] if argv is None else argv)
    ex = "\n".join(f"- {k} {s} steps: {v['examples']}" for k in res for s, v in res[k].items())
    text = (f"# Latent text generation vs token masked diffusion\n\n`{cmd.strip()}` ({cfg.trainer.max_steps} "
            f"training steps each, same model size; {n} samples per row; compressor round trip on training texts: "
            f"{recon_ok:.3f})\n\n{table}\n\nSamples:\n{ex}\n")
    with open(os.path.join(args.out, "latent_textgen.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "latent_textgen.json"), "w") as f:
        json.dump(dict(args=vars(args), results=res, recon_ok=recon_ok), f, indent=1, default=str)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, mk in (("latent", "o"), ("token", "s")):
        xs = [v["ms"] for v in res[k].values()]
        ys = [v["valid"] for v in res[k].values()]
        ax.plot(xs, ys, marker=mk, label=k)
        for s, x, y in zip(res[k], xs, ys, strict=False):
            ax.annotate(str(s), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="ms / sample (1 CPU thread)", ylabel="fraction of true equations", xscale="log",
           title="quality vs speed (labels: steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "latent_textgen.png"), dpi=100)


if __name__ == "__main__":
    main()
