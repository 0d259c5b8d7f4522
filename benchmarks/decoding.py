"""Decoding speed at equal quality: LLaDA 1 token/step, threshold decoding, Fast-dLLM caches, the exact
block cache, and diffusers' LLaDA2Pipeline, all on trained models, on CPU (or a GPU when given).

The task has a verifiable answer so quality is exact-match accuracy: the prompt is a random sequence
of `--prompt` symbols and the answer repeats it up to `--gen` tokens. Two small models learn it first
(a few minutes on 2 CPU cores) with the copy task's recipes (configs/copy_*.yaml, through the one trainer):
a bidirectional one (SFT loss), a block_causal one (BD3-LM loss) and the autoregressive peer of the same
size (next-token loss), which decodes with our KV cache and, exported to a transformers LlamaForCausalLM,
with `generate(use_cache=True)`.
Every configuration then runs in its own process, so its peak memory (max RSS) is its own.

    python benchmarks/decoding.py                      # train, measure, write experiments/results/decoding-cpu.json
    python benchmarks/decoding.py --gen 256 --batch 4  # the defaults
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from latent import DiffusionTransformer
from latent.sampling import generate
from pipelines.tasks.copy import copy_batch

REPO = Path(__file__).resolve().parents[1]

SYMBOLS = 48  # answer/prompt symbols are ids 0..47; the mask id is SYMBOLS


def make_batch(n: int, prompt: int, gen: int, generator: torch.Generator) -> torch.Tensor:
    return copy_batch(n, prompt, gen, SYMBOLS, generator)


def train(layout: str, args, out_dir: Path) -> Path:
    """The model of a layout, trained once by its recipe (configs/copy_<layout>.yaml) through the trainer."""
    import pipelines.tasks  # noqa: F401 - registers the copy task
    from latent.training.config import load_config
    from latent.training.trainer import train as run_recipe

    run = out_dir / layout
    path = run / "pipeline" / "model"
    if (path / "config.json").exists():
        return path
    cfg = load_config(REPO / "configs" / f"copy_{layout}.yaml", [
        f"run.output_dir={run}", f"data.prompt_length={args.prompt}", f"data.answer_length={args.gen}",
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.block_size={args.block}",
        f"trainer.max_steps={args.train_steps}", f"trainer.batch_size={args.train_batch}", f"optim.lr={args.lr}",
        f"trainer.threads={args.threads}",
    ])
    run_recipe(cfg)
    return path


def export_llama(causal_model: str, work: Path) -> str:
    """The AR peer's weights as a Hugging Face Llama folder (pipelines.convert.export), once."""
    from pipelines.convert import export

    out = work / "causal_hf_llama"
    if not (out / "config.json").exists():
        export(causal_model, str(out), family="llama")
    return str(out)


def _llada2(model, prompts, args, threshold):
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=args.block), tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    calls = {"n": 0}
    forward = model.forward

    def counted(*a, **k):
        calls["n"] += 1
        return forward(*a, **k)

    model.forward = counted
    out = pipe(input_ids=prompts, gen_length=args.gen, block_length=args.block, num_inference_steps=args.block,
               threshold=threshold, editing_threshold=None, eos_early_stop=False, mask_token_id=SYMBOLS,
               output_type="seq", use_chat_template=False)
    model.forward = forward
    return torch.cat([prompts, out.sequences], dim=1), calls["n"]


def _autoregressive(model, prompts, args, engine):
    """The AR peer: our causal backbone with its KV cache, or the same weights exported to a transformers
    LlamaForCausalLM decoding with generate(use_cache=True) (greedy)."""
    if engine == "ar":
        from latent.sampling import autoregressive_generate

        out = autoregressive_generate(model, prompts, args.gen)
        return out.sequences, out.nfe
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.gen, min_new_tokens=args.gen,
                         do_sample=False, use_cache=True, pad_token_id=SYMBOLS)
    return out, args.gen


def _load(spec):
    if spec["engine"] == "hf":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(spec["model"]).eval()
    return DiffusionTransformer.from_pretrained(spec["model"]).eval()


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec,
    so a spawned child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_config(spec: dict, queue) -> None:
    """One configuration in a fresh process: decode the evaluation prompts, report speed/quality/RSS."""
    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec["args"])
    model = _load(spec)
    g = torch.Generator().manual_seed(123)
    data = make_batch(args.batch * args.rounds, args.prompt, args.gen, g)
    rss0 = peak_rss_mib()
    correct = total = nfe = 0
    elapsed = 0.0
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        batch = data[(r % args.rounds) * args.batch : (r % args.rounds + 1) * args.batch]
        prompts = batch[:, : args.prompt]
        start = time.perf_counter()
        with torch.no_grad():
            if spec["engine"] == "llada2":
                seq, calls = _llada2(model, prompts, args, spec["knobs"].get("threshold", 2.0))
            elif spec["engine"] in ("ar", "hf"):
                seq, calls = _autoregressive(model, prompts, args, spec["engine"])
            else:
                out = generate(model, prompts, gen_length=args.gen, block_length=args.block, **spec["knobs"])
                seq, calls = out.sequences, out.nfe
        took = time.perf_counter() - start
        if r == 0:
            continue
        elapsed += took
        nfe += calls
        correct += int((seq[:, args.prompt :] == batch[:, args.prompt :]).sum())
        total += batch[:, args.prompt :].numel()
    queue.put(dict(
        name=spec["name"], tokens_per_s=total / elapsed, nfe_per_batch=nfe / args.rounds, accuracy=correct / total,
        seconds=elapsed, peak_rss_mib=peak_rss_mib(), rss_before_decoding_mib=rss0,
    ))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_decoding", help="where the trained models are kept")
    ap.add_argument("--out", default="experiments/results/decoding-cpu.json")
    args = ap.parse_args(argv)
    if args.prompt != args.block:
        sys.exit("--prompt must equal --block: the block_causal model is trained with the prompt as block 0")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    models = {layout: str(train(layout, args, work)) for layout in ("bidirectional", "block_causal", "causal")}
    models["hf_llama"] = export_llama(models["causal"], work)
    steps = args.gen  # 1 token per step
    th = args.threshold
    configs = [
        ("llada_1tok_per_step", "bidirectional", "ours", dict(steps=steps)),
        ("threshold", "bidirectional", "ours", dict(commit="threshold", threshold=th)),
        ("threshold+prefix_cache", "bidirectional", "ours", dict(commit="threshold", threshold=th, cache="prefix")),
        ("threshold+dual_cache", "bidirectional", "ours", dict(commit="threshold", threshold=th, cache="dual")),
        ("block_causal_1tok_no_cache", "block_causal", "ours", dict(steps=steps, cache="none")),
        ("block_causal_1tok_exact_cache", "block_causal", "ours", dict(steps=steps, cache="block_exact")),
        ("block_causal_threshold_exact_cache", "block_causal", "ours",
         dict(commit="threshold", threshold=th, cache="block_exact")),
        ("diffusers_llada2_1tok", "block_causal", "llada2", dict(threshold=2.0)),
        ("diffusers_llada2_threshold", "block_causal", "llada2", dict(threshold=th)),
        ("ar_ours_kv_cache", "causal", "ar", {}),
        ("ar_transformers_generate_kv_cache", "hf_llama", "hf", {}),
    ]
    ctx = mp.get_context("spawn")
    rows = []
    for name, layout, engine, knobs in configs:
        queue = ctx.Queue()
        spec = dict(name=name, model=models[layout], engine=engine, knobs=knobs, args=vars(args), threads=args.threads)
        proc = ctx.Process(target=run_config, args=(spec, queue))
        proc.start()
        row = queue.get()
        proc.join()
        row["layout"] = layout
        rows.append(row)
        print(f"{name:36s} {row['tokens_per_s']:9.1f} tok/s  nfe/batch {row['nfe_per_batch']:7.1f}  "
              f"acc {row['accuracy']:.4f}  peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    by = {r["name"]: r for r in rows}
    ratios = {
        "threshold_vs_1tok": by["threshold"]["tokens_per_s"] / by["llada_1tok_per_step"]["tokens_per_s"],
        "threshold_dual_vs_1tok": by["threshold+dual_cache"]["tokens_per_s"] / by["llada_1tok_per_step"]["tokens_per_s"],
        "exact_block_cache_vs_none_1tok": by["block_causal_1tok_exact_cache"]["tokens_per_s"]
        / by["block_causal_1tok_no_cache"]["tokens_per_s"],
        "ours_vs_llada2_1tok": by["block_causal_1tok_exact_cache"]["tokens_per_s"]
        / by["diffusers_llada2_1tok"]["tokens_per_s"],
        "ours_vs_llada2_threshold": by["block_causal_threshold_exact_cache"]["tokens_per_s"]
        / by["diffusers_llada2_threshold"]["tokens_per_s"],
        "best_diffusion_vs_transformers_ar": max(r["tokens_per_s"] for r in rows if r["layout"] != "causal"
                                                 and r["layout"] != "hf_llama")
        / by["ar_transformers_generate_kv_cache"]["tokens_per_s"],
        "block_causal_threshold_exact_vs_transformers_ar": by["block_causal_threshold_exact_cache"]["tokens_per_s"]
        / by["ar_transformers_generate_kv_cache"]["tokens_per_s"],
    }
    for k, v in ratios.items():
        print(f"{k:36s} {v:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join(sys.argv), machine=platform.processor() or platform.machine(),
        torch=torch.__version__, threads=args.threads, args=vars(args), rows=rows, ratios=ratios,
    ), indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
