"""Where the block diffusion decoder's time goes on the copy task, beside the AR peers, in one process.

The decoders of benchmarks/decoding.py's copy table (its trained models, `--work`): block_causal threshold
decoding with the exact block cache, our AR KV-cache loop and transformers' generate(use_cache=True), each
timed as the median of `--repeats` batches after a warm-up; then one profiled batch of the block decoder,
split into matrix products, attention and the rest. From those shares, the ceiling of its ratio to generate
if everything but the matrix products (and attention) took no time:

    python benchmarks/decoding_profile.py --out experiments/results/decoding-copy-cpu-b8-profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoding import _autoregressive, load_model, make_batch  # noqa: E402 - the copy table's helpers

from latent.sampling import generate  # noqa: E402

ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench_decoding", help="benchmarks/decoding.py's trained models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    missing = [p for p in ("block_causal/pipeline/model", "causal/pipeline/model", "causal_hf_llama") if not (work / p).is_dir()]
    if missing:
        sys.exit(f"{missing} missing under {work}: run benchmarks/decoding.py first (it trains and exports them)")
    on_cpu = argparse.Namespace(device="cpu", dtype="float32", attention="auto", gen=256)
    block = load_model(work / "block_causal/pipeline/model", on_cpu)
    causal = load_model(work / "causal/pipeline/model", on_cpu)
    llama = load_model(work / "causal_hf_llama", on_cpu, llama=True)
    prompt, gen = 32, on_cpu.gen
    prompts = make_batch(args.batch, prompt, gen, torch.Generator().manual_seed(123))[:, :prompt]
    knobs = dict(gen_length=gen, block_length=block.config.block_size, commit="threshold", threshold=args.threshold,
                 cache="block_exact")
    decoders = {
        "block_causal_threshold_exact_cache": lambda: generate(block, prompts, **knobs),
        "ar_ours_kv_cache": lambda: _autoregressive(causal, prompts, on_cpu, "ar"),
        "ar_transformers_generate_kv_cache": lambda: _autoregressive(llama, prompts, on_cpu, "hf"),
    }
    seconds = {}
    with torch.no_grad():
        for name, decode in decoders.items():
            decode()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                decode()
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = decoders["block_causal_threshold_exact_cache"]()
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    share = dict(matmul=ops.get("aten::mm", 0) / total, attention=sum(ops.get(k, 0) for k in ATTENTION_OPS) / total)
    tokens = args.batch * gen
    ar, diffusion = seconds["ar_transformers_generate_kv_cache"], seconds["block_causal_threshold_exact_cache"]
    result = dict(
        command="python " + " ".join(sys.argv), torch=torch.__version__, threads=args.threads, batch=args.batch,
        seconds_per_batch=seconds, tokens_per_s={k: tokens / v for k, v in seconds.items()},
        block_decoder_forwards=out.nfe, block_decoder_positions=out.forward_tokens,
        block_decoder_time_share=dict(share, rest=1 - share["matmul"] - share["attention"]),
        ratio_to_generate=ar / diffusion,
        ceiling_to_generate_matmul_only=ar / (diffusion * share["matmul"]),
        ceiling_to_generate_matmul_and_attention=ar / (diffusion * (share["matmul"] + share["attention"])),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
