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
    python benchmarks/decoding.py --only threshold threshold+rows_independent --out /tmp/some.json  # a few rows

`+rows_independent` rows decode with row_blocks="independent": a row moves on to its next block as soon as
its own block is done (at batch 1 they are the plain rows).

The real-text task (`--task text`) decodes continuations of English-corpus prompts (data/english/valid.jsonl)
with the models the text recipes trained: the block diffusion model adapted from the AR baseline
(configs/text_tiny_adapt_bd3.yaml: block_causal, blocks from slot 0, logit shift), the masked-diffusion model
(text_tiny.yaml, bidirectional, for the dual cache) and the AR peer (text_tiny_ar.yaml) on the same data.
Quality: the bits/token of the continuation under the AR peer (a judge: lower is more fluent to it) and the
share of tokens equal to the same model's 1 token/step decoding. Speed at batch 1 and batch 8. Its table
goes into the same JSON file under "text", next to the copy task's rows:

    python benchmarks/decoding.py --task text --threads 1

On a GPU: `--device cuda` (weights in `--dtype`, bfloat16 by default there; our models' attention through
`--attention`, auto = xformers where it imports). Timings then wait for the GPU (torch.cuda.synchronize) and
each row also reports its peak GPU memory (torch.cuda.max_memory_allocated); `--in-process` spares every row
an interpreter and CUDA start (the GPU peak is still per row):

    python benchmarks/decoding.py --device cuda --in-process --batch 8 --out experiments/results/decoding-copy-cuda-b8.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from latent import DiffusionTransformer
from latent.attention import BACKENDS, resolve_backend
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


def _llada2(model, prompts, args, threshold, mask_token_id=SYMBOLS, eos_token_id=None):
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
               threshold=threshold, editing_threshold=None, eos_early_stop=eos_token_id is not None,
               eos_token_id=eos_token_id, mask_token_id=mask_token_id,
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


def add_device_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every decoder runs")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="the decoders' weights (default float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every row in this process (GPU runs: no interpreter and CUDA start per row; the "
                    "peak GPU memory is still per row, the peak RSS is left out)")
    ap.add_argument("--attention", default="auto", choices=BACKENDS,
                    help="our models' attention backend (auto: xformers on CUDA in bf16/fp16 where it imports, else SDPA)")


def check_device(args) -> None:
    """Fill in the dtype default; refuse --device cuda without a GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU here; run on CPU (--device cpu) or on a GPU machine")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")


def load_model(path, args, llama: bool = False):
    """A model folder on args.device in args.dtype (cast by from_pretrained), ours on the attention backend
    asked for; `llama`: a transformers LlamaForCausalLM folder."""
    dtype = getattr(torch, args.dtype)
    if llama:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval().to(args.device)
    model = DiffusionTransformer.from_pretrained(path, torch_dtype=dtype).eval().to(args.device)
    if args.attention != "auto":
        model.set_attention_backend(args.attention)
    return model


def attention_used(args) -> str:
    """The attention kernel our models ran on (auto resolves per device and dtype, as the backbone does)."""
    return resolve_backend(args.attention, torch.zeros(1, device=args.device, dtype=getattr(torch, args.dtype)))


def machine_fields(args) -> dict:
    """Where a table was measured: the machine (the GPU's name on CUDA), the dtype and the attention kernel."""
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return dict(machine=machine, dtype=args.dtype, attention=attention_used(args))


def wait(device: str) -> None:
    """Block until the GPU's queued work is done, so a timer reads the work and not its launch."""
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(args) -> dict:
    """The row's peak RSS (in its own process only: in-process rows share one) and, on CUDA, its peak GPU
    allocation (reset before each row)."""
    row = {} if args.in_process else dict(peak_rss_mib=peak_rss_mib())
    if args.device == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _load(spec):
    return load_model(spec["model"], argparse.Namespace(**spec["args"]), llama=spec["engine"] == "hf")


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec,
    so a spawned child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_text(row: dict) -> str:
    parts = [f"peak {what} {row[key]:.0f} MiB" for key, what in (("peak_rss_mib", "RSS"), ("peak_gpu_mib", "GPU"))
             if key in row]
    return "  ".join(parts)


class _Row:
    def put(self, row):
        self.row = row


def in_own_process(target, spec: dict) -> dict:
    """target(spec, queue) in a fresh (spawned) process, so that its peak memory is its own; its row.
    With args.in_process, in this process (no interpreter and CUDA start per row; GPU peaks are reset)."""
    if spec["args"].get("in_process"):
        if spec["args"].get("device") == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        queue = _Row()
        target(spec, queue)
        return queue.row
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(spec, queue))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def run_config(spec: dict, queue) -> None:
    """One configuration in a fresh process: decode the evaluation prompts, report speed/quality/RSS."""
    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(**spec["args"])
    model = _load(spec)
    g = torch.Generator().manual_seed(123)
    data = make_batch(args.batch * args.rounds, args.prompt, args.gen, g).to(args.device)
    rss0 = peak_rss_mib()
    correct = total = nfe = positions = 0
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
                positions += out.forward_tokens if r else 0
        wait(args.device)
        took = time.perf_counter() - start
        if r == 0:
            continue
        elapsed += took
        nfe += calls
        correct += int((seq[:, args.prompt :] == batch[:, args.prompt :]).sum())
        total += batch[:, args.prompt :].numel()
    queue.put(dict(
        name=spec["name"], tokens_per_s=total / elapsed, nfe_per_batch=nfe / args.rounds, accuracy=correct / total,
        seconds=elapsed, **peak_memory(args), rss_before_decoding_mib=None if args.in_process else rss0,
        # positions the model ran, a cost that does not depend on the machine's load (our sampler only)
        forward_positions_per_batch=positions / args.rounds if spec["engine"] == "ours" else None,
    ))


# ---- the real-text task -------------------------------------------------------------------------------
TEXT_MODELS = {"block_causal": "runs/text_tiny_adapt_bd3/pipeline", "bidirectional": "runs/text_tiny_eval/pipeline",
               "causal": "runs/text_tiny_ar/pipeline"}


def text_prompts(tokenizer_dir: str, n: int, length: int) -> torch.Tensor:
    """The first `length` tokens (after BOS = EOS, as the recipes train) of the first n validation documents
    that are at least that long."""
    from latent.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rows = []
    with open(REPO / "data" / "english" / "valid.jsonl") as f:
        for line in f:
            ids = [tok.eos_token_id] + tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                rows.append(ids[:length])
            if len(rows) == n:
                break
    return torch.tensor(rows)


def timed_batches(prompts: torch.Tensor, batch: int, decode, device: str = "cpu") -> tuple[list, int, float]:
    """decode(chunk) -> (output, forwards) over the prompts in batches of `batch`, after one warm-up batch
    that is not counted: the outputs in order, the forwards and the seconds of the counted batches."""
    outputs, nfe, elapsed = [], 0, 0.0
    for i in range(-1, len(prompts) // batch):
        chunk = prompts[max(i, 0) * batch : (max(i, 0) + 1) * batch]
        start = time.perf_counter()
        with torch.no_grad():
            out, calls = decode(chunk)
        wait(device)
        if i >= 0:
            elapsed += time.perf_counter() - start
            nfe += calls
            outputs.append(out)
    return outputs, nfe, elapsed


def run_text_config(spec: dict, queue) -> None:
    """One text decoder in a fresh process: every prompt at batch 1 and at batch 8 (after a warm-up call)."""
    torch.set_num_threads(spec["threads"])
    a = argparse.Namespace(**spec["args"])
    model = load_model(Path(spec["model"]) / "model", a)
    prompts = torch.tensor(spec["prompts"], device=a.device)
    row = dict(name=spec["name"])

    def decode(chunk):
        if spec["engine"] == "ar":
            from latent.sampling import autoregressive_generate

            out = autoregressive_generate(model, chunk, a.text_gen)
        elif spec["engine"] == "llada2":
            out = _llada2_text(model, chunk, a, spec["knobs"]["threshold"])
        else:
            out = generate(model, chunk, gen_length=a.text_gen, block_length=spec["block"], **spec["knobs"])
        return out.sequences, out.nfe

    for batch in (1, 8):
        seqs, nfe, elapsed = timed_batches(prompts, batch, decode, a.device)
        row[f"batch{batch}"] = dict(tokens_per_s=len(prompts) * a.text_gen / elapsed, seconds=elapsed,
                                    forwards_per_sequence=nfe * batch / len(prompts))
        row.setdefault("sequences", torch.cat(seqs).tolist())
        row[f"batch{batch}_equals_batch1"] = torch.cat(seqs).tolist() == row["sequences"]
    row.update(peak_memory(a))
    queue.put(row)


def _llada2_text(model, prompts, a, threshold):
    seq, calls = _llada2(model, prompts, argparse.Namespace(gen=a.text_gen, block=model.config.block_size), threshold,
                         mask_token_id=model.config.mask_token_id)
    return argparse.Namespace(sequences=seq, nfe=calls)


def judge_bits(judge, sequences: torch.Tensor, prompt_len: int) -> float:
    """Bits/token of the continuations under the AR peer."""
    with torch.no_grad():
        logits = judge(sequences).logits[:, prompt_len - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sequences[:, prompt_len:].flatten())
    return float(nll) / math.log(2)


def main_text(args) -> None:
    """The real-text table: forwards per sequence, tokens/s at batch 1 and 8, peak RSS, quality, ratios."""
    for folder in TEXT_MODELS.values():
        if not (Path(folder) / "model" / "config.json").exists():
            sys.exit(f"{folder} is missing: train it first (python train.py configs/{Path(folder).parent.name}.yaml)")
    prompts = text_prompts(str(Path(TEXT_MODELS["causal"]) / "tokenizer"), args.text_prompts, args.text_prompt)
    g, th = args.text_gen, args.threshold
    bc, bd = "block_causal", "bidirectional"
    configs = [
        ("ar_kv_cache", "causal", "ar", {}),
        # 1 token per forward: the most confident (threshold 1 commits only the top one; with the schedule a
        # prompt off the block grid adds a block, and its zero-quota steps)
        ("bd3_1tok_no_cache", bc, "ours", dict(commit="threshold", threshold=1.0, masked_logits_only=False)),
        ("bd3_1tok_block_cache", bc, "ours",
         dict(commit="threshold", threshold=1.0, cache="block_exact", masked_logits_only=False)),
        ("bd3_1tok_block_cache_masked_logits", bc, "ours", dict(commit="threshold", threshold=1.0, cache="block_exact")),
        ("bd3_threshold_block_cache_all_logits", bc, "ours",
         dict(commit="threshold", threshold=th, cache="block_exact", masked_logits_only=False)),
        ("bd3_threshold_block_cache", bc, "ours", dict(commit="threshold", threshold=th, cache="block_exact")),
        ("bd3_threshold0.7_block_cache", bc, "ours", dict(commit="threshold", threshold=0.7, cache="block_exact")),
        ("bd3_threshold0.5_block_cache", bc, "ours", dict(commit="threshold", threshold=0.5, cache="block_exact")),
        ("bd3_sub_blocks8_threshold_block_cache", bc, "ours",
         dict(commit="threshold", threshold=th, cache="block_exact", sub_block_length=8)),
        ("bd3_diffusers_llada2_threshold", bc, "llada2", dict(threshold=th)),
        ("mdm_1tok_no_cache", bd, "ours", dict(commit="threshold", threshold=1.0, masked_logits_only=False)),
        ("mdm_threshold_no_cache", bd, "ours", dict(commit="threshold", threshold=th)),
        ("mdm_threshold_dual_refresh1", bd, "ours", dict(commit="threshold", threshold=th, cache="dual")),
        ("mdm_threshold_dual_refresh2", bd, "ours",
         dict(commit="threshold", threshold=th, cache="dual", dual_refresh_every=2)),
        ("mdm_threshold_dual_refresh_once", bd, "ours",
         dict(commit="threshold", threshold=th, cache="dual", dual_refresh_every=g)),
    ]
    block = {bc: 16, bd: 16, "causal": 16}
    rows = []
    for name, layout, engine, knobs in configs:
        spec = dict(name=name, model=TEXT_MODELS[layout], engine=engine, knobs=knobs, args=vars(args),
                    threads=args.threads, prompts=prompts.tolist(), block=block[layout])
        row = in_own_process(run_text_config, spec)
        row["layout"] = layout
        rows.append(row)
        print(f"{name:40s} b1 {row['batch1']['tokens_per_s']:8.1f} tok/s  b8 {row['batch8']['tokens_per_s']:8.1f} tok/s  "
              f"fwd/seq {row['batch1']['forwards_per_sequence']:6.1f}  {memory_text(row)}", flush=True)
    judge = DiffusionTransformer.from_pretrained(Path(TEXT_MODELS["causal"]) / "model").eval()
    by = {r["name"]: r for r in rows}
    reference = {bc: "bd3_1tok_no_cache", bd: "mdm_1tok_no_cache", "causal": "ar_kv_cache"}
    for r in rows:
        seq = torch.tensor(r.pop("sequences"))
        ref = torch.tensor(by[reference[r["layout"]]].get("_seq", seq.tolist()))
        r["_seq"] = seq.tolist()
        r["ar_judge_bits_per_token"] = judge_bits(judge, seq, args.text_prompt)
        r["agreement_with_1tok"] = float((seq[:, args.text_prompt :] == ref[:, args.text_prompt :]).float().mean())
    ar, one = by["ar_kv_cache"], {k: by[v] for k, v in reference.items()}
    for r in rows:
        for b in ("batch1", "batch8"):
            r[b]["vs_ar"] = r[b]["tokens_per_s"] / ar[b]["tokens_per_s"]
            r[b]["vs_1tok"] = r[b]["tokens_per_s"] / one[r["layout"]][b]["tokens_per_s"]
    for r in rows:
        r.pop("_seq")
        print(f"{r['name']:40s} judge {r['ar_judge_bits_per_token']:.2f} bits/tok  agree {r['agreement_with_1tok']:.3f}  "
              f"vs AR b1 {r['batch1']['vs_ar']:.2f}x b8 {r['batch8']['vs_ar']:.2f}x  vs 1tok b1 {r['batch1']['vs_1tok']:.2f}x")
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {}
    table["text"] = dict(
        command="python " + " ".join(sys.argv), **machine_fields(args),
        torch=torch.__version__, threads=args.threads, models=TEXT_MODELS, prompt_tokens=args.text_prompt,
        gen_tokens=args.text_gen, prompts=len(prompts), threshold=th, rows=rows,
        load_note=f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; ratios within the run",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2))
    print("wrote", out)


AB_PAIRS = {  # (baseline knobs, changed knobs) of one speed-up, on the block_causal text model, threshold commits
    "masked_logits_only": (dict(cache="block_exact", masked_logits_only=False), dict(cache="block_exact")),
    "block_cache_vs_none": (dict(cache="none", masked_logits_only=False), dict(cache="block_exact", masked_logits_only=False)),
}


def main_text_ab(args) -> None:
    """Each speed-up against its baseline in one process, alternating the two runs `--rounds` times (so that
    the shared machine's load hits both alike): the median time ratio and whether the tokens are equal."""
    import statistics

    model = load_model(Path(TEXT_MODELS["block_causal"]) / "model", args)
    prompts = text_prompts(str(Path(TEXT_MODELS["causal"]) / "tokenizer"), 8, args.text_prompt).to(args.device)
    run = dict(gen_length=args.text_gen, block_length=model.config.block_size, commit="threshold", threshold=args.threshold)
    result = {}
    for name, (base, changed) in AB_PAIRS.items():
        for batch in (1, 8):
            times, equal = {0: [], 1: []}, True
            for _ in range(args.rounds + 1):  # the first round warms up
                outs = []
                for which, knobs in enumerate((base, changed)):
                    start = time.perf_counter()
                    outs.append(torch.cat([generate(model, prompts[i : i + batch], **run, **knobs).sequences
                                           for i in range(0, len(prompts), batch)]))
                    times[which].append(time.perf_counter() - start)
                equal &= torch.equal(*outs)
            ratio = statistics.median(a / b for a, b in zip(times[0][1:], times[1][1:], strict=True))
            result[f"{name}_batch{batch}"] = dict(speedup=ratio, tokens_equal=equal)
            print(f"{name:24s} batch {batch}: {ratio:.2f}x  tokens equal: {equal}", flush=True)
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {}
    table["text_ab"] = dict(command="python " + " ".join(sys.argv), threads=args.threads, rounds=args.rounds,
                            threshold=args.threshold, pairs={k: [str(a), str(b)] for k, (a, b) in AB_PAIRS.items()},
                            result=result)
    out.write_text(json.dumps(table, indent=2))
    print("wrote", out)


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
    ap.add_argument("--task", choices=("copy", "text", "text-ab"), default="copy")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="copy task: run only these rows (and train only their "
                    "models); the ratios that need other rows are left out; give --out another file to keep the table")
    ap.add_argument("--text-prompts", type=int, default=16, help="text task: prompts (a multiple of 8)")
    ap.add_argument("--text-prompt", type=int, default=20, help="text task: prompt tokens (20: not whole blocks of 16)")
    ap.add_argument("--text-gen", type=int, default=48, help="text task: generated tokens (a multiple of 16)")
    add_device_arguments(ap)
    args = ap.parse_args(argv)
    check_device(args)
    if args.task != "copy":
        torch.set_num_threads(args.threads)
        return main_text(args) if args.task == "text" else main_text_ab(args)
    if args.prompt != args.block:
        sys.exit("--prompt must equal --block: the block_causal model is trained with the prompt as block 0")
    torch.set_num_threads(args.threads)
    steps = args.gen  # 1 token per step
    th = args.threshold
    rows_independent = dict(row_blocks="independent")
    configs = [
        ("llada_1tok_per_step", "bidirectional", "ours", dict(steps=steps)),
        ("threshold", "bidirectional", "ours", dict(commit="threshold", threshold=th)),
        ("threshold+rows_independent", "bidirectional", "ours", dict(commit="threshold", threshold=th, **rows_independent)),
        ("threshold+prefix_cache", "bidirectional", "ours", dict(commit="threshold", threshold=th, cache="prefix")),
        ("threshold+prefix_cache+rows_independent", "bidirectional", "ours",
         dict(commit="threshold", threshold=th, cache="prefix", **rows_independent)),
        ("threshold+dual_cache", "bidirectional", "ours", dict(commit="threshold", threshold=th, cache="dual")),
        ("threshold+dual_cache+rows_independent", "bidirectional", "ours",
         dict(commit="threshold", threshold=th, cache="dual", **rows_independent)),
        ("block_causal_1tok_no_cache", "block_causal", "ours", dict(steps=steps, cache="none")),
        ("block_causal_1tok_exact_cache", "block_causal", "ours", dict(steps=steps, cache="block_exact")),
        ("block_causal_threshold_exact_cache", "block_causal", "ours",
         dict(commit="threshold", threshold=th, cache="block_exact")),
        ("block_causal_threshold_exact_cache+rows_independent", "block_causal", "ours",
         dict(commit="threshold", threshold=th, cache="block_exact", **rows_independent)),
        ("diffusers_llada2_1tok", "block_causal", "llada2", dict(threshold=2.0)),
        ("diffusers_llada2_threshold", "block_causal", "llada2", dict(threshold=th)),
        ("ar_ours_kv_cache", "causal", "ar", {}),
        ("ar_transformers_generate_kv_cache", "hf_llama", "hf", {}),
    ]
    if args.only:
        unknown = set(args.only) - {c[0] for c in configs}
        if unknown:
            sys.exit(f"--only: unknown rows {sorted(unknown)}; the rows are {[c[0] for c in configs]}")
        configs = [c for c in configs if c[0] in args.only]
    work = Path(args.work)
    layouts = {c[1] for c in configs}
    models = {layout: str(train(layout, args, work)) for layout in ("bidirectional", "block_causal", "causal")
              if layout in layouts or layout == "causal" and "hf_llama" in layouts}
    if "hf_llama" in layouts:
        models["hf_llama"] = export_llama(models["causal"], work)
    rows = []
    for name, layout, engine, knobs in configs:
        spec = dict(name=name, model=models[layout], engine=engine, knobs=knobs, args=vars(args), threads=args.threads)
        row = in_own_process(run_config, spec)
        row["layout"] = layout
        rows.append(row)
        print(f"{name:36s} {row['tokens_per_s']:9.1f} tok/s  nfe/batch {row['nfe_per_batch']:7.1f}  "
              f"acc {row['accuracy']:.4f}  {memory_text(row)}", flush=True)
    ratios = _ratios(rows)
    for k, v in ratios.items():
        print(f"{k:36s} {v:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        command="python " + " ".join(sys.argv), **machine_fields(args),
        torch=torch.__version__, threads=args.threads, args=vars(args), rows=rows, ratios=ratios,
    ), indent=2))
    print("wrote", out)


# (ratio, row, baseline row) of the copy table's tokens/s; "*diffusion" is the fastest diffusion row
COPY_RATIOS = (
    ("threshold_vs_1tok", "threshold", "llada_1tok_per_step"),
    ("threshold_dual_vs_1tok", "threshold+dual_cache", "llada_1tok_per_step"),
    ("rows_independent_vs_shared_threshold", "threshold+rows_independent", "threshold"),
    ("rows_independent_vs_shared_prefix_cache", "threshold+prefix_cache+rows_independent", "threshold+prefix_cache"),
    ("rows_independent_vs_shared_dual_cache", "threshold+dual_cache+rows_independent", "threshold+dual_cache"),
    ("rows_independent_vs_shared_block_cache", "block_causal_threshold_exact_cache+rows_independent",
     "block_causal_threshold_exact_cache"),
    ("exact_block_cache_vs_none_1tok", "block_causal_1tok_exact_cache", "block_causal_1tok_no_cache"),
    ("ours_vs_llada2_1tok", "block_causal_1tok_exact_cache", "diffusers_llada2_1tok"),
    ("ours_vs_llada2_threshold", "block_causal_threshold_exact_cache", "diffusers_llada2_threshold"),
    ("best_diffusion_vs_transformers_ar", "*diffusion", "ar_transformers_generate_kv_cache"),
    ("block_causal_threshold_exact_vs_transformers_ar", "block_causal_threshold_exact_cache",
     "ar_transformers_generate_kv_cache"),
)


def _ratios(rows: list) -> dict:
    """COPY_RATIOS over the rows that ran (with --only, the others are left out)."""
    speed = {r["name"]: r["tokens_per_s"] for r in rows}
    diffusion = [r["tokens_per_s"] for r in rows if r["layout"] not in ("causal", "hf_llama")]
    if diffusion:
        speed["*diffusion"] = max(diffusion)
    return {name: speed[row] / speed[base] for name, row, base in COPY_RATIOS if row in speed and base in speed}


if __name__ == "__main__":
    main()
