"""Answer-only masked diffusion vs text chain of thought vs latent reasoning, at matched compute.

Task: multi-step arithmetic (experiments/latent_tasks.py), accuracy per difficulty (1-4 operations).
All three use the same ``DiffusionTransformer`` config (``latent_dim`` set in all, so the parameter count
is identical), the same problems in the same order, and the same number of optimiser steps:

- answer:  ``[question | answer]``, masked-diffusion SFT loss on the answer;
- cot:     ``[question | step;step;...;step | answer]``, the same loss on chain + answer; sampled with
           one token per step, confidence order (the chain is in text);
- latent:  ``LatentReasoningPipeline``: each step encoded by the ThoughtVAE of
           ``python -m experiments.latent_autoencoders`` into k latent thought tokens (K = 4 blocks,
           shorter chains repeat their last step), trained with ``latent_reasoning_loss``
           (CE on the answer + lam * MSE on noisy thought blocks), sampled block by block with a
           diffusers scheduler; every thought is decoded back to text by the VAE.

    python -m experiments.latent_autoencoders     # once: trains runs/latent/thought_vae
    python -m experiments.latent_reasoning        # ~20-30 min on one busy CPU thread

Writes ``experiments/results/latent_reasoning.{md,json,png}`` and ``runs/latent/reasoning_pipeline``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from autoencoders.thought_vae import ThoughtVAE
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
from latent.joint import joint_sample
from latent.losses import sft_loss
from pipelines.latent_reasoning import LatentReasoningPipeline, latent_reasoning_loss

Q_LEN, A_LEN, K = 10, 3, 4
COT_LEN = 4 * 7 + 3 + 1 + 2 + 1  # four steps of <= 7 chars, ";" between, ">", the answer, EOS


def cot_text(p):
    return ";".join(p.steps) + ">" + p.answer


def build(args, vocab, latent_dim):
    torch.manual_seed(args.seed)
    return DiffusionTransformer(vocab_size=vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                                mask_token_id=4, max_position_embeddings=96, latent_dim=latent_dim)


def train_loop(model, step_fn, args, desc):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    gb = torch.Generator().manual_seed(args.seed + 1)
    g = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.time()
    for step in tqdm(range(args.steps), desc=f"train {desc}"):
        idx = torch.randint(0, args.n_train, (args.batch,), generator=gb)
        loss = step_fn(idx, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            curve.append((step, loss.item()))
    model.eval()
    return curve, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--block-steps", type=int, default=5, help="latent diffusion steps per thought block")
    ap.add_argument("--scheduler", default="dpm", choices=["ddim", "dpm"])
    ap.add_argument("--methods", nargs="+", default=["answer", "cot", "latent"])
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--vae", default="runs/latent/thought_vae")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--ckpt", default="runs/latent")
    args = parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    tok = make_tokenizer()
    pad, eos, mask_id = tok.pad_token_id, tok.eos_token_id, tok.mask_token_id
    train, test = split(args.n_train, args.n_test, (1, 2, 3, 4), args.seed)
    q = encode_fixed(tok, [p.question for p in train], Q_LEN, pad, left=True)
    tq = encode_fixed(tok, [p.question for p in test], Q_LEN, pad, left=True)
    vae = ThoughtVAE.from_pretrained(args.vae).eval()
    C = vae.config.latent_dim
    results, curves, examples = {}, {}, {}

    if "answer" in args.methods:
        model = build(args, len(tok), C)
        ids = torch.cat([q, encode_fixed(tok, [p.answer for p in train], A_LEN, eos, eos=True)], 1)
        curves["answer"], secs = train_loop(
            model, lambda idx, g: sft_loss(model, ids[idx], mask_id, prompt_lengths=torch.full((len(idx),), Q_LEN),
                                           generator=g).loss, args, "answer")
        with torch.no_grad():
            seq = joint_sample(model, tq, A_LEN, mask_id, A_LEN).sequences
        preds = [decode_answer(tok, r[Q_LEN:].tolist()) for r in seq]
        results["answer"] = dict(acc=accuracy_by_difficulty(test, preds), nfe=A_LEN, train_s=secs)
        print("answer", results["answer"], flush=True)

    if "cot" in args.methods:
        model = build(args, len(tok), C)
        ids = torch.cat([q, encode_fixed(tok, [cot_text(p) for p in train], COT_LEN, eos, eos=True)], 1)
        curves["cot"], secs = train_loop(
            model, lambda idx, g: sft_loss(model, ids[idx], mask_id, prompt_lengths=torch.full((len(idx),), Q_LEN),
                                           generator=g).loss, args, "cot")
        with torch.no_grad():
            seq = joint_sample(model, tq, COT_LEN, mask_id, COT_LEN).sequences
        texts = [decode_answer(tok, r[Q_LEN:].tolist()) for r in seq]
        preds = [t.split(">")[-1] if ">" in t else "" for t in texts]
        results["cot"] = dict(acc=accuracy_by_difficulty(test, preds), nfe=COT_LEN, train_s=secs)
        examples["cot"] = [(p.question, t) for p, t in zip(test[::100], texts[::100], strict=False)]
        print("cot", results["cot"], flush=True)

    if "latent" in args.methods:
        model = build(args, len(tok), C)
        L = vae.config.max_length
        steps = [(p.steps + [p.steps[-1]] * K)[:K] for p in train]
        step_ids = encode_fixed(tok, [s for row in steps for s in row], L, pad, eos=True)
        with torch.no_grad():
            z = torch.cat([vae.to_diffusion(step_ids[i : i + 1024]) for i in range(0, len(step_ids), 1024)])
        z = z.view(len(train), K, vae.config.num_latents, C)
        a = encode_fixed(tok, [p.answer for p in train], A_LEN, eos, eos=True)
        diffusion = GaussianDiffusion("v_prediction")
        curves["latent"], secs = train_loop(
            model, lambda idx, g: latent_reasoning_loss(model, q[idx], a[idx], z[idx], mask_id, diffusion,
                                                        lam=args.lam, p_uncond=0.1, generator=g).loss, args, "latent")
        pipe = LatentReasoningPipeline(model, vae, tok, diffusion.make_scheduler(args.scheduler),
                                       question_length=Q_LEN, answer_length=A_LEN, num_thought_blocks=K,
                                       prediction_type="v_prediction")
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(os.path.join(args.ckpt, "reasoning_pipeline"))
        preds, thoughts = [], []
        for i in range(0, len(test), 100):
            out = pipe(question_ids=tq[i : i + 100], num_inference_steps=args.block_steps,
                       generator=torch.Generator().manual_seed(i))
            preds += out.answers
            thoughts += out.thoughts
        # how often the decoded thoughts are the true steps (readability / faithfulness)
        step_hits = [sum(t == s for t, s in zip(th, p.steps, strict=False)) / len(p.steps) for th, p in zip(thoughts, test, strict=False)]
        results["latent"] = dict(acc=accuracy_by_difficulty(test, preds), nfe=K * args.block_steps + A_LEN,
                                 train_s=secs, thought_step_acc=sum(step_hits) / len(step_hits))
        examples["latent"] = [(p.question, th, a_) for p, th, a_ in zip(test[::100], thoughts[::100], preds[::100], strict=False)]
        print("latent", results["latent"], examples["latent"], flush=True)

    diffs = [1, 2, 3, 4]
    rows = [[m, r["nfe"], f"{r['train_s'] / 60:.1f}"] + [r["acc"][d] for d in diffs] + [r["acc"]["all"]]
            for m, r in results.items()]
    table = markdown_table(["method", "NFE (sampling forwards)", "train min"] + [f"acc d={d}" for d in diffs] + ["acc all"], rows)
    cmd = "python -m experiments.latent_reasoning " + " ".join(sys.argv[1:] if argv is None else argv)
    ex = ""
    if "latent" in examples:
        ex += "\nLatent thoughts decoded by the VAE (question -> thoughts -> answer):\n" + "\n".join(
            f"- `{qq}` -> {th} -> `{aa}`" for qq, th, aa in examples["latent"])
        ex += f"\n\nDecoded thoughts equal to the true step: {results['latent']['thought_step_acc']:.3f} (per step)\n"
    if "cot" in examples:
        ex += "\nText chains of thought:\n" + "\n".join(f"- `{qq}` -> `{t}`" for qq, t in examples["cot"])
    n = len(test) // 4
    text = (f"# Latent reasoning vs answer-only vs text CoT\n\n`{cmd.strip()}` ({args.steps} steps x batch "
            f"{args.batch} each, same model size, {n} test problems per difficulty)\n\n{table}\n{ex}\n")
    open(os.path.join(args.out, "latent_reasoning.md"), "w").write(text)
    json.dump(dict(args=vars(args), results=results, curves=curves, examples=examples),
              open(os.path.join(args.out, "latent_reasoning.json"), "w"), indent=1, default=str)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for m, r in results.items():
        ax[0].plot(diffs, [r["acc"][d] for d in diffs], marker="o", label=f"{m} (NFE {r['nfe']})")
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
