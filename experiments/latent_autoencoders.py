"""Train and measure the latent autoencoders on the arithmetic task's text.

- TextCompressor (frozen MiniLM + learned queries), compression c = 4 and c = 8
  (``configs/latent_compressor.yaml``): token reconstruction accuracy on held-out texts, clean and with
  Gaussian noise added to the (unit-scale) latents.
- ThoughtVAE (``configs/latent_thought_vae.yaml``): one reasoning step ("23+7=30") <-> k thought tokens;
  reconstruction accuracy, exact-match rate and KL per thought token on held-out steps.

    python -m experiments.latent_autoencoders                       # ~10-20 min on one busy CPU core
    python -m experiments.latent_autoencoders --parts compressor --compressions 4 --domain-vocab --steps 600 --tag _domain
    python -m experiments.latent_autoencoders --steps 4 --runs /tmp/smoke trainer.batch_size=8   # smoke run

Trains the recipes into ``<runs>/latent_thought_vae`` and ``<runs>/latent_compressor_c<c><tag>`` (the run
folders the reasoning and text-generation recipes read) and writes
``experiments/results/latent_autoencoders<tag>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from omegaconf import OmegaConf

from experiments.latent_tasks import add_common_args, markdown_table, read_log, train_recipe
from latent.data.arithmetic import encode_fixed, make_tokenizer
from pipelines.tasks.autoencoders import (
    arithmetic_split,
    compressor_accuracy,
    compressor_texts,
    thought_vae_metrics,
)

NOISE_LEVELS = (0.0, 0.3, 0.6)


def run_vae(args):
    from autoencoders.thought_vae import ThoughtVAE

    res = train_recipe("latent_thought_vae", [], args)
    cfg = OmegaConf.load(res.run_dir / "config.yaml")
    vae = ThoughtVAE.from_pretrained(res.pipeline_dir).eval()
    tok = make_tokenizer()
    steps = [s for p in arithmetic_split(cfg)[1] for s in p.steps]
    ids = encode_fixed(tok, steps, vae.config.max_length, tok.pad_token_id, eos=True)
    out = thought_vae_metrics(vae, ids)
    with torch.no_grad():
        pred = [tok.decode(r, skip_special_tokens=True) for r in vae.loss(ids[:4], sample=False).logits.argmax(-1).tolist()]
    curve = [(r["step"], r.get("ce"), r.get("kl"), r.get("acc")) for r in read_log(res.run_dir)]
    return dict(out, scaling_factor=vae.config.scaling_factor, curve=curve, examples=list(zip(steps[:4], pred, strict=False)),
                n_test=len(steps), model=OmegaConf.to_container(cfg.model), steps=cfg.trainer.max_steps)


def run_compressor(c, args):
    from autoencoders.compressor import TextCompressor

    over = [f"model.compression={c}", f"run.name=latent_compressor_c{c}{args.tag}"]
    if args.domain_vocab:
        over.append("model.domain_vocab=true")
    res = train_recipe("latent_compressor", over, args)
    cfg = OmegaConf.load(res.run_dir / "config.yaml")
    m = TextCompressor.from_pretrained(res.pipeline_dir).eval()
    texts = compressor_texts(arithmetic_split(cfg)[1])[: cfg.data.n_test]
    acc = compressor_accuracy(m, texts, NOISE_LEVELS)
    with torch.no_grad():
        examples = list(zip(texts[:4], m.decode_text(m.encode_text(texts[:4])), strict=False))
    vocab = m.config.output_vocab
    return dict(acc=acc, num_latents=m.num_latents, latent_dim=m.config.latent_dim, examples=examples,
                output_vocab=len(vocab) if vocab else None, steps=cfg.trainer.max_steps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compressions", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--domain-vocab", action="store_true",
                    help="decoder emits only the encoder tokens the training texts use (much cheaper softmax)")
    ap.add_argument("--parts", nargs="+", default=["vae", "compressor"], choices=["vae", "compressor"])
    ap.add_argument("--tag", default="", help="suffix of the result files and compressor run folders")
    add_common_args(ap)
    args = ap.parse_intermixed_args(argv)
    os.makedirs(args.out, exist_ok=True)
    res, t0 = {"compressor": {}}, time.time()
    if "vae" in args.parts:
        res["vae"] = run_vae(args)
        print("VAE", {k: v for k, v in res["vae"].items() if k != "curve"}, flush=True)
    for c in args.compressions if "compressor" in args.parts else []:
        res["compressor"][c] = run_compressor(c, args)
        print("compressor", c, res["compressor"][c]["acc"], res["compressor"][c]["examples"], flush=True)
    res["seconds"] = time.time() - t0

    cmd = "python -m experiments.latent_autoencoders " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"# Latent autoencoders\n\n`{cmd.strip()}` ({res['seconds'] / 60:.1f} min)\n\n"
    if res["compressor"]:
        rows = [[c, r["num_latents"], r["latent_dim"]] + [r["acc"][s] for s in NOISE_LEVELS]
                for c, r in res["compressor"].items()]
        t1 = markdown_table(["compression c", "latents (of 16 tokens)", "latent dim"]
                            + [f"token acc, noise {s}" for s in NOISE_LEVELS], rows)
        ex = "\n".join(f"- `{a}` -> `{b}`" for c in res["compressor"] for a, b in res["compressor"][c]["examples"][:2])
        vocab = ("domain vocabulary (tokens of the training texts)" if args.domain_vocab
                 else "full 30522-token vocabulary")
        steps = next(iter(res["compressor"].values()))["steps"]
        text += (f"## TextCompressor (frozen all-MiniLM-L6-v2, decoder over the {vocab}), held-out texts, "
                 f"{steps} steps each\n\n{t1}\n\n"
                 "Noise: Gaussian with that standard deviation added to the layer-normalised latents (unit variance).\n\n"
                 f"Examples (c={args.compressions}, clean):\n{ex}\n\n")
    if "vae" in res:
        v, m = res["vae"], res["vae"]["model"]
        t2 = markdown_table(["k", "latent dim", "beta", "token acc (z=mu)", "exact (z=mu)", "token acc (z~q)",
                             "exact (z~q)", "KL nats/thought token"],
                            [[m["num_latents"], m["latent_dim"], m["beta"], v["acc"], v["exact"], v["acc_sampled"],
                              v["exact_sampled"], v["kl"]]])
        text += f"## ThoughtVAE, {v['n_test']} held-out reasoning steps, {v['steps']} steps\n\n{t2}\n"
    with open(os.path.join(args.out, f"latent_autoencoders{args.tag}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"latent_autoencoders{args.tag}.json"), "w") as f:
        json.dump(dict(args=vars(args), results=res), f, indent=1, default=str)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for c, r in res["compressor"].items():
        ax[0].plot(NOISE_LEVELS, [r["acc"][s] for s in NOISE_LEVELS], marker="o", label=f"c={c}")
    ax[0].set(xlabel="latent noise std", ylabel="token reconstruction accuracy", title="TextCompressor (held out)")
    if res["compressor"]:
        ax[0].legend()
    if "vae" in res:
        cv = res["vae"]["curve"]
        ax[1].plot([x[0] for x in cv], [x[3] for x in cv], label="train token acc")
        ax2 = ax[1].twinx()
        ax2.plot([x[0] for x in cv], [x[2] for x in cv], color="tab:red", label="KL")
        ax2.set_ylabel("KL nats / thought token")
    ax[1].set(xlabel="step", ylabel="token accuracy", title="ThoughtVAE training")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"latent_autoencoders{args.tag}.png"), dpi=100)


if __name__ == "__main__":
    main()
