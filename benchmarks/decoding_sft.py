"""Decoding speed at equal quality on a real-text SFT task: WordNet definitions of held-out words.

The prompt is 'What does "X" (pos) mean?' and the answer the word's definition, then EOS; the words of
data/english/sft_valid.jsonl are never trained on. The models are SFT'd on the training pairs by the
one trainer from the text recipes' models: the block diffusion model (configs/text_tiny_sft_bd3.yaml, from
text_tiny_adapt_bd3: block_causal, blocks from slot 0, logit shift) and its autoregressive peer of the same
size on the same pairs and steps (configs/text_tiny_sft_ar.yaml, from text_tiny_ar). Every decoder stops
at EOS. The peers: our AR backbone with its KV cache, the same weights exported to a transformers
LlamaForCausalLM decoding with generate(use_cache=True), diffusers' LLaDA2Pipeline on the diffusion model,
and the diffusion model at one token per forward. DiffuSpec rows draft with the diffusion model and verify
with the AR peer (its answers are the peer's greedy answers by construction; the question is the speed).

Quality, against the reference definitions: exact match and chrF (sacrebleu), and the share of answers
equal to the AR peer's greedy answer. Speed: answers/s and answer tokens/s (up to EOS) at batch 1 and
batch 8, forwards per answer, peak RSS; ratios to the AR peer and to one token per forward. Prompts of
one token length are drawn, so a batch has no padding and batch 8 answers equal batch 1's.

    python train.py configs/text_tiny_sft_bd3.yaml && python train.py configs/text_tiny_sft_ar.yaml
    python benchmarks/decoding_sft.py --threads 1       # writes experiments/results/decoding-sft-cpu.json

`--pairs` scores another file of pairs instead: the recall split (experiments/results/README.md,
`decoding-sft-recall-cpu.json`) asks for the definitions of words both models were SFT'd on, closed-book
recall of what was trained, where both models can be right and a parallel decoder can be confident.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoding import (  # noqa: E402 - shared bench helpers
    _llada2,
    add_device_arguments,
    check_device,
    export_llama,
    in_own_process,
    load_model,
    machine_fields,
    peak_memory,
    timed_batches,
)

from latent.sampling import StartTokenVerifier, autoregressive_generate, generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {"block_causal": "runs/text_tiny_sft_bd3/pipeline", "causal": "runs/text_tiny_sft_ar/pipeline"}


def sft_prompts(tok, n: int, pairs: Path, seed: int = 0) -> tuple[list[list[int]], list[str]]:
    """n prompts of the pairs file of its most common token length (as SFTStream writes them: prompt +
    newline), and their reference answers."""
    by_len = collections.defaultdict(list)
    with open(pairs) as f:
        for line in f:
            row = json.loads(line)
            ids = tok(row["prompt"] + "\n", add_special_tokens=False)["input_ids"]
            by_len[len(ids)].append((ids, row["answer"]))
    rows = max(by_len.values(), key=len)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(rows), generator=g)[:n].sort().values.tolist()
    if len(pick) < n:
        sys.exit(f"only {len(pick)} prompts of {pairs} share one length; lower --prompts")
    return [rows[i][0] for i in pick], [rows[i][1] for i in pick]


def answer_ids(seq: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row's answer tokens, up to (without) its first EOS."""
    out = []
    for row in seq.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def decode_batch(model, prompts: torch.Tensor, spec: dict, a, eos: int) -> tuple[torch.Tensor, int]:
    """Generated positions [B, gen] and forwards of one batch."""
    engine, knobs = spec["engine"], spec["knobs"]
    P = prompts.shape[1]
    if engine == "ar":  # our KV cache; the AR model was trained with EOS as BOS
        bos = torch.full_like(prompts[:, :1], eos)
        out = autoregressive_generate(model, torch.cat([bos, prompts], 1), a.gen, eos_token_id=eos)
        return out.sequences[:, P + 1 :], out.nfe
    if engine == "hf":
        bos = torch.full_like(prompts[:, :1], eos)
        ids = torch.cat([bos, prompts], 1)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.gen, do_sample=False,
                             use_cache=True, eos_token_id=eos, pad_token_id=eos)
        return out[:, P + 1 :], out.shape[1] - P - 1
    if engine == "llada2":
        seq, calls = _llada2(model, prompts, argparse.Namespace(gen=a.gen, block=model.config.block_size),
                             knobs["threshold"], mask_token_id=model.config.mask_token_id, eos_token_id=eos)
        return seq[:, P:], calls
    out = generate(model, prompts, gen_length=a.gen, block_length=spec["block"], eos_token_id=eos, **knobs)
    return out.sequences[:, P:], out.nfe


def run_sft_config(spec: dict, queue) -> None:
    """One decoder in a fresh process: every prompt at batch 1 and at batch 8 (after a warm-up batch)."""
    torch.set_num_threads(spec["threads"])
    a = argparse.Namespace(**spec["args"])
    model = load_model(spec["model"] if spec["engine"] == "hf" else Path(spec["model"]) / "model", a,
                       llama=spec["engine"] == "hf")
    eos, prompts = spec["eos"], torch.tensor(spec["prompts"], device=a.device)
    if spec["knobs"].get("verifier") == "diffuspec":  # the AR peer verifies, with the EOS-as-BOS it was trained with
        verifier = load_model(Path(spec["verifier"]) / "model", a)
        spec["knobs"] = dict(spec["knobs"], verifier_model=StartTokenVerifier(verifier, eos))
    row = dict(name=spec["name"])
    for batch in (1, 8):
        gens, nfe, elapsed = timed_batches(prompts, batch, lambda chunk: decode_batch(model, chunk, spec, a, eos), a.device)
        answers = [x for gen in gens for x in answer_ids(gen, eos)]
        tokens = sum(len(x) + 1 for x in answers)  # the answer and its EOS
        row[f"batch{batch}"] = dict(answers_per_s=len(prompts) / elapsed, tokens_per_s=tokens / elapsed,
                                    seconds=elapsed, forwards_per_answer=nfe * batch / len(prompts))
        row.setdefault("answers", answers)
        row[f"batch{batch}_equals_batch1"] = answers == row["answers"]
    row.update(peak_memory(a))
    queue.put(row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="prompts drawn from --pairs (a multiple of 8)")
    ap.add_argument("--pairs", default=str(REPO / "data" / "english" / "sft_valid.jsonl"),
                    help="the prompt/answer pairs scored (default: the held-out words)")
    ap.add_argument("--gen", type=int, default=32, help="generated positions (a multiple of the block, 16)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/bench_decoding_sft", help="where the exported Llama peer is kept")
    ap.add_argument("--out", default="experiments/results/decoding-sft-cpu.json")
    ap.add_argument("--only", nargs="*", default=None, help="run only these decoders (names as in the table)")
    ap.add_argument("--bd3", default=MODELS["block_causal"],
                    help="the block diffusion pipeline folder (e.g. runs/text_tiny_sft_bd3_from_ar/pipeline)")
    ap.add_argument("--ar", default=MODELS["causal"], help="the autoregressive peer's pipeline folder")
    add_device_arguments(ap)
    args = ap.parse_args(argv)
    check_device(args)
    if args.prompts % 8:
        sys.exit(f"--prompts must be a multiple of 8 (the batch-8 rows), got {args.prompts}")
    if not Path(args.pairs).is_file():
        sys.exit(f"--pairs {args.pairs} is not a file (the held-out pairs are built by the text recipes' first run)")
    MODELS["block_causal"], MODELS["causal"] = args.bd3, args.ar
    from latent.data.tokenizer import load_tokenizer

    for folder in MODELS.values():
        if not (Path(folder) / "model" / "config.json").exists():
            sys.exit(f"{folder} is missing: train it first (python train.py configs/{Path(folder).parent.name}.yaml)")
    tok = load_tokenizer(str(Path(MODELS["causal"]) / "tokenizer"))
    eos = tok.eos_token_id
    prompts, refs = sft_prompts(tok, args.prompts, Path(args.pairs))
    llama = export_llama(str(Path(MODELS["causal"]) / "model"), Path(args.work))
    bc = "block_causal"
    eos_stop = dict(eos_early_stop=True)
    configs = [
        ("ar_kv_cache", "causal", "ar", {}),
        ("ar_transformers_generate_kv_cache", "causal", "hf", {}),
        ("bd3_1tok_block_cache", bc, "ours", dict(commit="threshold", threshold=1.0, cache="block_exact", **eos_stop)),
        ("bd3_threshold0.9_block_cache", bc, "ours", dict(commit="threshold", threshold=0.9, cache="block_exact", **eos_stop)),
        ("bd3_threshold0.7_block_cache", bc, "ours", dict(commit="threshold", threshold=0.7, cache="block_exact", **eos_stop)),
        ("bd3_threshold0.5_block_cache", bc, "ours", dict(commit="threshold", threshold=0.5, cache="block_exact", **eos_stop)),
        ("bd3_threshold0.9_block_cache_eotp", bc, "ours",
         dict(commit="threshold", threshold=0.9, cache="block_exact", stopping="eotp")),
        ("bd3_threshold0.7_block_cache_eotp", bc, "ours",
         dict(commit="threshold", threshold=0.7, cache="block_exact", stopping="eotp")),
        ("bd3_threshold0.9_block_cache_independent_rows", bc, "ours",
         dict(commit="threshold", threshold=0.9, cache="block_exact", row_blocks="independent", **eos_stop)),
        ("bd3_threshold0.5_block_cache_independent_rows", bc, "ours",
         dict(commit="threshold", threshold=0.5, cache="block_exact", row_blocks="independent", **eos_stop)),
        ("bd3_sub_blocks8_threshold0.9_block_cache", bc, "ours",
         dict(commit="threshold", threshold=0.9, cache="block_exact", sub_block_length=8, **eos_stop)),
        ("bd3_diffuspec_ar_verifier_block_cache", bc, "ours",
         dict(verifier="diffuspec", cache="block_exact", diffuspec_weight=1.0, diffuspec_draft_lengths=(8, 16), **eos_stop)),
        ("bd3_diffuspec_argmax_draft_block_cache", bc, "ours",
         dict(verifier="diffuspec", cache="block_exact", diffuspec_weight=1.0, diffuspec_draft_lengths=(8, 16),
              diffuspec_beam=1, diffuspec_candidates=1, **eos_stop)),
        ("bd3_diffusers_llada2_threshold0.9", bc, "llada2", dict(threshold=0.9)),
    ]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    import sacrebleu

    rows = []
    for name, layout, engine, knobs in configs:
        spec = dict(name=name, model=llama if engine == "hf" else MODELS[layout], engine=engine, knobs=knobs,
                    args=vars(args), threads=args.threads, prompts=prompts, block=16, eos=eos, verifier=MODELS["causal"])
        row = in_own_process(run_sft_config, spec)
        row["layout"] = layout
        texts = [tok.decode(x, skip_special_tokens=True).strip() for x in row["answers"]]
        row["exact_match"] = sum(t == r for t, r in zip(texts, refs, strict=True)) / len(refs)
        row["chrf"] = sacrebleu.corpus_chrf(texts, [refs]).score
        row["examples"] = [dict(reference=r, answer=t) for t, r in list(zip(texts, refs, strict=True))[:4]]
        rows.append(row)
        print(f"{name:42s} b1 {row['batch1']['answers_per_s']:6.2f} ans/s  b8 {row['batch8']['answers_per_s']:6.2f} ans/s  "
              f"fwd/ans {row['batch1']['forwards_per_answer']:5.1f}  chrF {row['chrf']:5.1f}  EM {row['exact_match']:.3f}",
              flush=True)
    by = {r["name"]: r for r in rows}
    ar = by.get("ar_transformers_generate_kv_cache")
    one = by.get("bd3_1tok_block_cache")
    for r in rows:
        if "ar_kv_cache" in by:
            r["same_answer_as_ar"] = sum(x == y for x, y in zip(r["answers"], by["ar_kv_cache"]["answers"],
                                                                strict=True)) / len(refs)
        for b in ("batch1", "batch8"):
            if ar is not None:
                r[b]["answers_per_s_vs_transformers_generate"] = r[b]["answers_per_s"] / ar[b]["answers_per_s"]
            if one is not None and r["layout"] == bc:
                r[b]["answers_per_s_vs_1tok"] = r[b]["answers_per_s"] / one[b]["answers_per_s"]
        if ar is not None:
            r["chrf_vs_transformers_generate"] = r["chrf"] / max(ar["chrf"], 1e-9)
    for r in rows:
        r.pop("answers")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join(sys.argv), **machine_fields(args),
        torch=torch.__version__, threads=args.threads, models=MODELS, pairs=args.pairs, prompts=len(prompts),
        prompt_tokens=len(prompts[0]), gen_positions=args.gen, rows=rows,
        load_note=f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; ratios within the run",
    ), indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
