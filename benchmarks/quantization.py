"""Weight-only quantization of the backbone: memory, load-time peak RSS, decoding speed and quality for
fp32, bf16, int8 and int4 (torchao, `latent.quantization`), on CPU.

Two models:
- the tiny text model trained on the English corpus (`python train.py configs/text_tiny.yaml
  trainer.max_steps=300 run.name=text_tiny_quant`; ~1.4 M parameters, of which the tied 4096 x 128
  embedding, kept in full precision, is a third): every figure, with quality as the validation bound of
  the text task (bits/token on the first 64 validation sequences, 16 ELBO samples, seed 0: the number
  the trainer logs as val_bits_per_token).
- a random-init backbone of hidden 512, 8 layers (~28 M parameters, vocabulary 4096): memory and speed only.

Every configuration loads and decodes in its own process, so the peak RSS is its own. The quantized
configurations load folders written by `mmdlm quantize` (nothing is quantized at load time).

    python train.py configs/text_tiny.yaml trainer.max_steps=300 run.name=text_tiny_quant
    python benchmarks/quantization.py      # writes experiments/results/quantization.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (folder suffix, torch_dtype at load)
    "fp32": ("fp32", None),
    "bf16": ("fp32", "bfloat16"),
    "int8": ("int8", None),
    "int4": ("int4", None),
}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def state_bytes(model) -> int:
    """Bytes of the state dict; a quantized weight counts its integers, scales and zero points."""
    total = 0
    for t in model.state_dict().values():
        if hasattr(t, "tensor_data_names"):
            total += sum(getattr(t, n).nbytes for n in t.tensor_data_names if getattr(t, n, None) is not None)
        else:
            total += t.nbytes
    return total


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The largest resident set seen while the block runs (sampled every millisecond by a thread)."""

    def __enter__(self):
        self.before = self.peak = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())


def measure(job: dict) -> dict:
    """One configuration in a fresh process: load, weight bytes, peak RSS, tokens/s, bits/token."""
    torch.set_num_threads(1)
    import torchao.quantization  # noqa: F401 - imported before the baseline, as in every configuration

    from latent import DiffusionTransformer
    from latent.sampling import generate

    dtype = getattr(torch, job["dtype"]) if job["dtype"] else None
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        model = DiffusionTransformer.from_pretrained(job["folder"], torch_dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    out = dict(load_s=round(load_s, 3), weight_bytes=state_bytes(model), folder_bytes=folder_bytes(Path(job["folder"])),
               rss_mb_before_load=round(rss.before, 1), peak_rss_mb_while_loading=round(rss.peak, 1),
               peak_rss_increase_mb=round(rss.peak - rss.before, 1), rss_mb_after_load=round(current_rss_mb(), 1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size - 8, (job["batch"], job["prompt"]), generator=g)
    if job.get("val_ids") is not None:
        ids = torch.tensor(job["val_ids"])[: job["batch"], : job["prompt"]]
    decode = dict(gen_length=job["gen"], block_length=job["gen"], steps=job["gen"], temperature=0.0)
    with torch.no_grad():
        generate(model, ids, **decode)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(job["repeats"]):
            seq = generate(model, ids, **decode).sequences
        dt = (time.perf_counter() - t0) / job["repeats"]
        cpu = (time.process_time() - c0) / job["repeats"]
    tokens = job["batch"] * job["gen"]
    # CPU seconds are the steadier figure on a shared machine; wall seconds include waiting for a core.
    out.update(tokens_per_cpu_s=round(tokens / cpu, 1), tokens_per_s=round(tokens / dt, 1), decode_s=round(dt, 3),
               generated=seq[:, job["prompt"]:].tolist())
    if job.get("val_ids") is not None:
        from latent.training.evaluate import validation_bound

        res = validation_bound(model, torch.tensor(job["val_ids"]), "mdm", int(model.config.mask_token_id),
                               job["eos"], num_samples=16, batch_size=32, seed=0)
        out["val_bits_per_token"] = round(res["bits_per_token"], 4)
    return out


def run_isolated(job: dict) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (job,))


def write_folders(fp32: Path, root: Path, group_size: int) -> dict[str, Path]:
    from pipelines.quantize import quantize_folder

    folders = {"fp32": fp32}
    for scheme in ("int8", "int4"):
        dst = root / scheme
        quantize_folder(str(fp32), str(dst), scheme, group_size=group_size if scheme == "int4" else None)
        folders[scheme] = dst
    return folders


def bench(folders: dict[str, Path], common: dict) -> dict:
    results = {}
    for name, (suffix, dtype) in CONFIGS.items():
        results[name] = run_isolated(dict(common, folder=str(folders[suffix]), dtype=dtype))
        print(name, {k: v for k, v in results[name].items() if k != "generated"}, flush=True)
    ref = results["fp32"].pop("generated")
    for name in CONFIGS:
        got = results[name].pop("generated", None)
        if got is not None:  # greedy decodes: share of generated tokens equal to fp32's
            same = sum(a == b for ra, rb in zip(ref, got, strict=True) for a, b in zip(ra, rb, strict=True))
            results[name]["greedy_agreement_with_fp32"] = round(same / sum(len(r) for r in ref), 4)
    results["fp32"]["greedy_agreement_with_fp32"] = 1.0
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", default="runs/text_tiny_quant/pipeline", help="trained tiny text pipeline folder")
    ap.add_argument("--work", default="runs/quantization_bench", help="where the quantized folders are written")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--out", default="experiments/results/quantization.json")
    a = ap.parse_args()
    from latent import DiffusionTransformer
    from latent.data.stream import load_sequences
    from latent.data.tokenizer import load_tokenizer

    work = REPO / a.work
    tiny = REPO / a.tiny
    tokenizer = load_tokenizer(str(tiny / "tokenizer"))
    val = load_sequences([str(REPO / "data/english/valid.jsonl")], tokenizer, 64, 64)
    folders = write_folders(tiny / "model", work / "tiny", a.group_size)
    tiny_results = bench(folders, dict(val_ids=val.tolist(), eos=tokenizer.eos_token_id, batch=4, prompt=16, gen=64,
                                       repeats=2))

    torch.manual_seed(0)
    large = DiffusionTransformer(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, mask_token_id=4095,
                                 max_position_embeddings=256)
    large_fp32 = work / "large" / "fp32"
    large.save_pretrained(large_fp32)
    params = sum(p.numel() for p in large.parameters())
    del large
    large_results = bench(write_folders(large_fp32, work / "large", a.group_size),
                          dict(val_ids=None, eos=None, batch=1, prompt=16, gen=32, repeats=1))

    out = REPO / a.out
    out.write_text(json.dumps(dict(
        what="weight-only quantization of the backbone (torchao 0.18 via latent.quantization) on CPU, one thread",
        command="python benchmarks/quantization.py",
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     load_average=os.getloadavg()),
        schemes=dict(int8="symmetric, a scale per output channel", int4=f"symmetric, a scale per {a.group_size} "
                     "input weights (in memory one byte per value, on disk two values per byte)"),
        kept_in_full_precision="embeddings (the tied output head), norms",
        decoding="greedy (temperature 0), one block, one token per step; tokens/s = batch * gen_length / seconds "
                 "(tokens_per_cpu_s: per CPU second of the process, steadier on a shared machine)",
        memory="weight_bytes: the state dict (a quantized weight: its integers, scales, zero points); folder_bytes: "
               "the saved backbone folder; peak RSS: sampled every ms while from_pretrained runs. safetensors maps "
               "the file: pages not yet read count only once touched, so the RSS figures are what loading itself "
               "allocates (bf16: the cast copy; int4: the unpacked values), not the weights' final footprint",
        tiny=dict(folder=a.tiny, parameters=sum(p.numel() for p in DiffusionTransformer.from_pretrained(
            tiny / "model").parameters()), quality="validation bits/token (mdm bound, 64 x 64 tokens, 16 samples, seed 0)",
            decode=dict(batch=4, prompt=16, gen_length=64), results=tiny_results),
        large_random_init=dict(config="hidden 512, 8 layers, 8 heads, vocab 4096", parameters=params,
                               decode=dict(batch=1, prompt=16, gen_length=32), results=large_results),
    ), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
