"""Latent text generation vs token-level masked diffusion: speed at matched quality.

Both generators learn the same texts (true equations of the arithmetic task, e.g. ``4+5*2-3=15``) from
scratch with the same backbone size and training steps:

- latent: Gaussian diffusion (v-prediction, DPM-Solver++) over the 4 latents x 32 channels that the
  frozen-MiniLM ``TextCompressor`` (c = 4, domain vocabulary, trained by the command below) makes of
  a 16-token text, decoded to text by the compressor in one forward;
- token:  masked diffusion over the 16 character tokens of the text, ancestral sampling (random unmasking
  order, tokens drawn at temperature 1; confidence order collapses unconditional samples onto EOS).

Quality is verifiable: the fraction of samples that are well-formed, true equations (left-to-right
evaluation, every partial result in 0..19). Speed: wall-clock milliseconds per sample on one CPU
thread, generation in batches of 100 (decoding included).

    python -m experiments.latent_autoencoders --parts compressor --domain-vocab --comp-steps 600 --tag _domain  # once
    python -m experiments.latent_textgen          # ~10 min on one busy CPU thread

Writes ``experiments/results/latent_textgen.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch
from tqdm.auto import tqdm

from autoencoders.compressor import TextCompressor
from experiments.latent_tasks import (
    MAX_VALUE,
    decode_answer,
    encode_fixed,
    make_tokenizer,
    markdown_table,
    parse_args,
    split,
)
from latent.backbone import DiffusionTransformer
from latent.continuous import GaussianDiffusion, sample_latents
from latent.joint import joint_sample
from latent.losses import masked_diffusion_loss

TOK_LEN = 16


def is_true_equation(text: str) -> bool:
    s = text.replace(" ", "")
    m = re.fullmatch(r"(\d+)((?:[+\-*]\d+)+)=(\d+)", s)
    if not m:
        return False
    x = int(m.group(1))
    for op, n in re.findall(r"([+\-*])(\d+)", m.group(2)):
        x = x + int(n) if op == "+" else x - int(n) if op == "-" else x * int(n)
        if not 0 <= x <= MAX_VALUE:
            return False
    return x == int(m.group(3))


def train(model, loss_fn, args, desc):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.steps, pct_start=0.05)
    g, gb = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    for _ in tqdm(range(args.steps), desc=f"train {desc}"):
        idx = torch.randint(0, args.n_train, (args.batch,), generator=gb)
        loss = loss_fn(idx, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--latent-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--token-steps", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-samples", type=int, default=300)
    ap.add_argument("--compressor", default="runs/latent/compressor_c4_domain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/results")
    args = parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train_set, _ = split(args.n_train, 4, (1, 2, 3, 4), args.seed)
    texts = [p.question + "=" + p.answer for p in train_set]
    assert all(is_true_equation(t) for t in texts)

    comp = TextCompressor.from_pretrained(args.compressor).eval()
    M, C = comp.num_latents, comp.config.latent_dim
    with torch.no_grad():
        z = torch.cat([comp.encode_text(texts[i : i + 256]) for i in range(0, len(texts), 256)])
        recon_ok = sum(map(is_true_equation, comp.decode_text(z[:500]))) / 500
    print(f"compressor round trip: {recon_ok:.3f} of training texts decode to true equations", flush=True)

    tok = make_tokenizer()
    ids = encode_fixed(tok, texts, TOK_LEN, tok.eos_token_id, eos=True)
    mask_id = tok.mask_token_id

    def build(latent_dim):
        torch.manual_seed(args.seed)
        return DiffusionTransformer(vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                                    mask_token_id=mask_id, max_position_embeddings=32, latent_dim=latent_dim)

    diffusion = GaussianDiffusion("v_prediction")
    lat_model = build(C)  # both built with latent_dim = C: identical parameter counts
    train(lat_model, lambda idx, g: diffusion.loss(lat_model, z[idx], generator=g).loss, args, "latent")
    tok_model = build(C)
    train(tok_model, lambda idx, g: masked_diffusion_loss(tok_model, ids[idx], mask_id, generator=g).loss, args, "token")

    rows, res = [], {"latent": {}, "token": {}}
    n, bs = args.n_samples, 100
    with torch.no_grad():
        for s in args.latent_steps:
            t0, outs, dec = time.perf_counter(), [], 0.0
            for i in range(0, n, bs):
                lat = sample_latents(lambda x, t: lat_model(latents=x, timestep=t.expand(x.shape[0])).latent_pred,
                                     diffusion.make_scheduler("dpm"), shape=(bs, M, C), num_inference_steps=s,
                                     diffusion=diffusion, generator=torch.Generator().manual_seed(i))
                t1 = time.perf_counter()
                outs += comp.decode_text(lat)
                dec += time.perf_counter() - t1
            ms = (time.perf_counter() - t0) * 1000 / n
            q = sum(map(is_true_equation, outs)) / n
            res["latent"][s] = dict(valid=q, ms=ms, decode_ms=dec * 1000 / n, examples=outs[:3],
                                    distinct=len(set(outs)) / n)
            rows.append(["latent (c=4)", s, M, q, len(set(outs)) / n, ms, dec * 1000 / n])
            print("latent", s, q, ms, outs[:3], flush=True)
        empty = torch.zeros(bs, 0, dtype=torch.long)
        for s in args.token_steps:
            t0, outs = time.perf_counter(), []
            for i in range(0, n, bs):  # ancestral sampling: Gumbel proposals (temperature 1), random order
                seq = joint_sample(tok_model, empty, TOK_LEN, mask_id, s, temperature=1.0, order="random",
                                   generator=torch.Generator().manual_seed(i)).sequences
                outs += [decode_answer(tok, r.tolist()) for r in seq]
            ms = (time.perf_counter() - t0) * 1000 / n
            q = sum(map(is_true_equation, outs)) / n
            res["token"][s] = dict(valid=q, ms=ms, examples=outs[:3], distinct=len(set(outs)) / n)
            rows.append(["token", s, TOK_LEN, q, len(set(outs)) / n, ms, 0.0])
            print("token", s, q, ms, outs[:3], flush=True)

    table = markdown_table(["generator", "steps", "positions", "true equations", "distinct", "ms / sample", "of which decoding"], rows)
    cmd = "python -m experiments.latent_textgen " + " ".join(sys.argv[1:] if argv is None else argv)
    ex = "\n".join(f"- {k} {s} steps: {v['examples']}" for k in res for s, v in res[k].items())
    text = (f"# Latent text generation vs token masked diffusion\n\n`{cmd.strip()}` ({args.steps} training steps "
            f"each, same model size; {n} samples per row; compressor round trip on training texts: {recon_ok:.3f})\n\n"
            f"{table}\n\nSamples:\n{ex}\n")
    open(os.path.join(args.out, "latent_textgen.md"), "w").write(text)
    json.dump(dict(args=vars(args), results=res, recon_ok=recon_ok), open(os.path.join(args.out, "latent_textgen.json"), "w"),
              indent=1, default=str)
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
