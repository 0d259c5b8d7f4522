"""Training throughput of the one trainer: fp32 against bf16 autocast, SDPA against xformers attention.

Each setting trains the copy task's recipe (configs/copy_<layout>.yaml: no data files to build) at the
size given, for `--steps` steps from the same seed, through `latent.training.trainer.train`. Reported per
setting: samples/s and tokens/s between step `--skip` and the last (kernel selection and allocator
warm-up excluded; tokens are the positions the model runs: the block_causal objective runs [noisy | clean],
twice the sequence), peak GPU memory, and the loss at the last step (bf16 and the attention kernels change
the numbers a little, never the trend). Writes a JSON table.

    python benchmarks/training_throughput.py --device cuda --out experiments/results/training-throughput-cuda.json
    python benchmarks/training_throughput.py --hidden 64 --layers 2 --steps 20 --skip 5   # CPU: fp32/SDPA only
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# (name, trainer.mixed_precision, model.attention_backend)
SETTINGS = (
    ("fp32_sdpa", "no", "sdpa"),
    ("bf16_sdpa", "bf16", "sdpa"),
    ("bf16_xformers", "bf16", "xformers"),
)


def measure(layout: str, precision: str, backend: str, args, work: Path) -> dict:
    """One training run; its rate from the train log's elapsed seconds."""
    import pipelines.tasks  # noqa: F401 - registers the copy task
    from latent.training.config import load_config
    from latent.training.trainer import train

    run = work / f"{layout}_{precision}_{backend}"
    cfg = load_config(REPO / "configs" / f"copy_{layout}.yaml", [
        f"run.output_dir={run}", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}", f"model.attention_backend={backend}", f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch}", "trainer.log_every=1", "trainer.save_every=0", "trainer.plot=false",
        "trainer.progress=false", "trainer.eval_at_start=false", "data.eval_rows=8",
        f"trainer.mixed_precision='{precision}'",  # quoted: YAML reads a bare no as false
        f"trainer.device={'cpu' if args.device == 'cpu' else 'auto'}",
        f"trainer.threads={args.threads}",
    ])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    with open(run / "train.csv", newline="") as f:
        log = {int(r["step"]): r for r in csv.DictReader(f)}
    first, last = log[args.skip], log[args.steps]
    seconds = float(last["elapsed_s"]) - float(first["elapsed_s"])
    samples = args.batch * (args.steps - args.skip)
    tokens_per_sample = (cfg.data.prompt_length + cfg.data.answer_length) * (2 if layout == "block_causal" else 1)
    row = dict(layout=layout, mixed_precision=precision, attention=backend, samples_per_s=samples / seconds,
               tokens_per_s=samples * tokens_per_sample / seconds, seconds=seconds, final_loss=float(last["loss"]))
    if args.device == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--layouts", nargs="+", default=["bidirectional", "block_causal"],
                    choices=("bidirectional", "block_causal", "causal"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--skip", type=int, default=20, help="steps left out of the rate (warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not 0 < args.skip < args.steps:
        sys.exit(f"--skip must be in (0, --steps={args.steps}), got {args.skip}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU here")
    # bf16 autocast and xformers need CUDA: on CPU the trainer runs fp32, so only that row is meaningful
    settings = SETTINGS if args.device == "cuda" else SETTINGS[:1]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for layout in args.layouts:
            for name, precision, backend in settings:
                row = dict(name=f"{layout}_{name}", **measure(layout, precision, backend, args, Path(work)))
                rows.append(row)
                print(f"{row['name']:28s} {row['samples_per_s']:9.1f} samples/s {row['tokens_per_s']:11.0f} tokens/s  "
                      f"loss {row['final_loss']:.4f}  peak {row.get('peak_gpu_mib', float('nan')):.0f} MiB", flush=True)
    by = {r["name"]: r for r in rows}
    ratios = {}
    for layout in args.layouts:
        base = by[f"{layout}_fp32_sdpa"]["samples_per_s"]
        for name, *_ in settings[1:]:
            ratios[f"{layout}_{name}_vs_fp32_sdpa"] = by[f"{layout}_{name}"]["samples_per_s"] / base
    for k, v in ratios.items():
        print(f"{k:40s} {v:.2f}x")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = Path(args.out or f"experiments/results/training-throughput-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(command="python " + " ".join(sys.argv), device=device, torch=torch.__version__,
                                   args=vars(args), rows=rows, ratios=ratios), indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
