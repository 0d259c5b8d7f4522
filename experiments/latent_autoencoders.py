"""Train and measure the latent autoencoders on the arithmetic task's text.

- TextCompressor (frozen MiniLM + learned queries), compression c = 4 and c = 8: token reconstruction
  accuracy on held-out texts, clean and with Gaussian noise added to the (unit-scale) latents.
- ThoughtVAE: one reasoning step ("23+7=30") <-> k thought tokens; reconstruction accuracy, exact-match
  rate and KL per thought token on held-out steps.

    python -m experiments.latent_autoencoders                  # ~10-20 min on one busy CPU core
    python -m experiments.latent_autoencoders --comp-steps 30 --vae-steps 50    # smoke run

Writes ``experiments/results/latent_autoencoders.{md,json,png}`` and checkpoints under
``runs/latent/`` (``compressor_c4``, ``compressor_c8``, ``thought_vae``) that the reasoning and
text-generation experiments load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from autoencoders.compressor import TextCompressor
from autoencoders.thought_vae import ThoughtVAE
from experiments.latent_tasks import encode_fixed, make_tokenizer, markdown_table, parse_args, split

NOISE_LEVELS = (0.0, 0.3, 0.6)


def compressor_texts(problems):
    return [p.question + "=" + p.answer for p in problems] + [s for p in problems for s in p.steps]


@torch.no_grad()
def eval_compressor(m, ids, am, states, noise_levels, seed=0):
    m.eval()
    res = {}
    for s in noise_levels:
        accs, n = 0.0, 0
        for i in range(0, len(ids), 64):
            o = m.loss(ids[i : i + 64], am[i : i + 64], latent_noise=s, token_mask_prob=0.0,
                       generator=torch.Generator().manual_seed(seed + i), states=states[i : i + 64])
            k = len(ids[i : i + 64])
            accs, n = accs + o.accuracy * k, n + k
        res[s] = accs / n
    m.train()
    return res


def domain_vocab(texts, max_length):
    """Encoder token ids that the training texts use, plus the specials (``--domain-vocab``)."""
    from transformers import AutoTokenizer

    from autoencoders.compressor import default_encoder_path

    tk = AutoTokenizer.from_pretrained(default_encoder_path(), local_files_only=True)
    ids = tk(list(texts), padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    return sorted({i for row in ids for i in row} | set(tk.all_special_ids))


def train_compressor(c, args, train_texts, test_texts, out_dir):
    vocab = domain_vocab(train_texts, args.max_length) if args.domain_vocab else None
    torch.manual_seed(args.seed)
    m = TextCompressor(max_length=args.max_length, compression=c, latent_dim=args.latent_dim,
                       hidden_size=args.hidden, num_layers=2, decoder_layers=2, num_heads=4,
                       latent_noise=0.3, token_mask_prob=0.1, align_weight=0.5, output_vocab=vocab)
    b, bt = m.tokenize(train_texts), m.tokenize(test_texts)
    with torch.no_grad():  # the encoder is frozen: its states are computed once
        states = torch.cat([m.encoder_states(b["input_ids"][i : i + 256], b["attention_mask"][i : i + 256])
                            for i in range(0, len(train_texts), 256)])
        states_t = m.encoder_states(bt["input_ids"], bt["attention_mask"])
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.comp_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in tqdm(range(args.comp_steps), desc=f"compressor c={c}"):
        idx = torch.randint(0, len(train_texts), (args.batch,), generator=g)
        o = m.loss(b["input_ids"][idx], b["attention_mask"][idx], generator=g, states=states[idx])
        opt.zero_grad()
        o.loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            curve.append((step, o.ce.item(), o.align.item(), o.accuracy))
    acc = eval_compressor(m, bt["input_ids"], bt["attention_mask"], states_t, NOISE_LEVELS)
    m.save_pretrained(os.path.join(out_dir, f"compressor_c{c}{args.tag}"))
    m.eval()
    with torch.no_grad():
        examples = list(zip(test_texts[:4], m.decode_text(m.encode(bt["input_ids"][:4], bt["attention_mask"][:4])), strict=False))
    return dict(acc=acc, curve=curve, num_latents=m.num_latents, examples=examples,
                output_vocab=None if vocab is None else len(vocab))


def train_vae(args, train, test, out_dir):
    tok = make_tokenizer()
    steps_tr = [s for p in train for s in p.steps]
    steps_te = [s for p in test for s in p.steps]
    L = args.vae_length
    ids = encode_fixed(tok, steps_tr, L, tok.pad_token_id, eos=True)
    ids_t = encode_fixed(tok, steps_te, L, tok.pad_token_id, eos=True)
    torch.manual_seed(args.seed)
    vae = ThoughtVAE(vocab_size=len(tok), max_length=L, num_latents=args.k, latent_dim=args.vae_dim,
                     hidden_size=args.vae_hidden, num_layers=2, num_heads=4, pad_token_id=tok.pad_token_id,
                     beta=args.beta)
    trained = "vae" in args.parts
    if not trained:  # evaluate the checkpoint of an earlier run
        vae = ThoughtVAE.from_pretrained(os.path.join(out_dir, "thought_vae"))
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=max(args.vae_steps, 1), pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in tqdm(range(args.vae_steps if trained else 0), desc="thought VAE"):
        idx = torch.randint(0, len(ids), (args.vae_batch,), generator=g)
        o = vae.loss(ids[idx], generator=g)
        opt.zero_grad()
        o.loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            curve.append((step, o.ce.item(), o.kl.item(), o.accuracy))
    vae.eval()
    with torch.no_grad():
        o = vae.loss(ids_t, sample=False)
        o_s = vae.loss(ids_t, sample=True, generator=torch.Generator().manual_seed(1))
        if trained:
            vae.fit_scaling_factor(ids)
    if trained:
        vae.save_pretrained(os.path.join(out_dir, "thought_vae"))
        tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
    pred = [tok.decode(r, skip_special_tokens=True) for r in o.logits.argmax(-1)[:4].tolist()]
    return dict(acc=o.accuracy, exact=o.exact, kl=o.kl.item(), acc_sampled=o_s.accuracy, exact_sampled=o_s.exact,
                scaling_factor=vae.config.scaling_factor, curve=curve, examples=list(zip(steps_te[:4], pred, strict=False)),
                n_test=len(steps_te))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comp-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=16)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--compressions", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--domain-vocab", action="store_true",
                    help="decoder emits only the encoder tokens the training texts use (much cheaper softmax)")
    ap.add_argument("--parts", nargs="+", default=["vae", "compressor"], choices=["vae", "compressor"],
                    help="what to train; without vae the saved thought VAE is only evaluated")
    ap.add_argument("--tag", default="", help="suffix of the result files and compressor checkpoints")
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-length", type=int, default=10)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--vae-dim", type=int, default=16)
    ap.add_argument("--vae-hidden", type=int, default=96)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--beta", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--ckpt", default="runs/latent")
    args = parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.ckpt, exist_ok=True)
    train, test = split(args.n_train, args.n_test, (1, 2, 3, 4), args.seed)
    res, t0 = {"compressor": {}}, time.time()
    res["vae"] = train_vae(args, train, test, args.ckpt)
    print("VAE", {k: v for k, v in res["vae"].items() if k != "curve"}, flush=True)
    tr_txt, te_txt = compressor_texts(train), compressor_texts(test)[: args.n_test]
    for c in args.compressions if "compressor" in args.parts else []:
        res["compressor"][c] = train_compressor(c, args, tr_txt, te_txt, args.ckpt)
        print("compressor", c, res["compressor"][c]["acc"], res["compressor"][c]["examples"], flush=True)
    res["seconds"] = time.time() - t0

    cmd = "python -m experiments.latent_autoencoders " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = [[c, r["num_latents"], args.latent_dim] + [r["acc"][s] for s in NOISE_LEVELS] for c, r in res["compressor"].items()]
    t1 = markdown_table(["compression c", "latents (of 16 tokens)", "latent dim"] + [f"token acc, noise {s}" for s in NOISE_LEVELS], rows)
    v = res["vae"]
    t2 = markdown_table(["k", "latent dim", "beta", "token acc (z=mu)", "exact (z=mu)", "token acc (z~q)", "exact (z~q)", "KL nats/thought token"],
                        [[args.k, args.vae_dim, args.beta, v["acc"], v["exact"], v["acc_sampled"], v["exact_sampled"], v["kl"]]])
    ex = "\n".join(f"- `{a}` -> `{b}`" for c in res["compressor"] for a, b in res["compressor"][c]["examples"][:2])
    vocab = "domain vocabulary (tokens of the training texts)" if args.domain_vocab else "full 30522-token vocabulary"
    text = (f"# Latent autoencoders\n\n`{cmd.strip()}` ({res['seconds'] / 60:.1f} min)\n\n"
            f"## TextCompressor (frozen all-MiniLM-L6-v2, decoder over the {vocab}), held-out texts, "
            f"{args.comp_steps} steps each\n\n{t1}\n\n"
            f"Noise: Gaussian with that standard deviation added to the layer-normalised latents (unit variance).\n\n"
            f"Examples (c={args.compressions}, clean):\n{ex}\n\n"
            f"## ThoughtVAE, {v['n_test']} held-out reasoning steps, "
            f"{f'{args.vae_steps} steps' if 'vae' in args.parts else 'checkpoint ' + args.ckpt + '/thought_vae'}\n\n{t2}\n")
    open(os.path.join(args.out, f"latent_autoencoders{args.tag}.md"), "w").write(text)
    json.dump(dict(args=vars(args), results=res), open(os.path.join(args.out, f"latent_autoencoders{args.tag}.json"), "w"),
              indent=1, default=str)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for c, r in res["compressor"].items():
        ax[0].plot(NOISE_LEVELS, [r["acc"][s] for s in NOISE_LEVELS], marker="o", label=f"c={c}")
    ax[0].set(xlabel="latent noise std", ylabel="token reconstruction accuracy", title="TextCompressor (held out)")
    ax[0].legend()
    cv = res["vae"]["curve"]
    ax[1].plot([x[0] for x in cv], [x[3] for x in cv], label="train token acc")
    ax2 = ax[1].twinx()
    ax2.plot([x[0] for x in cv], [x[2] for x in cv], color="tab:red", label="KL")
    ax[1].set(xlabel="step", ylabel="token accuracy", title="ThoughtVAE training")
    ax2.set_ylabel("KL nats / thought token")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"latent_autoencoders{args.tag}.png"), dpi=100)


if __name__ == "__main__":
    main()
