"""xformers vs SDPA vs eager attention: parity and speed, per layout, with variable lengths (padding).

Run on a CUDA GPU (bf16):   python benchmarks/attention.py --device cuda --dtype bfloat16
On CPU it compares SDPA with eager in float32 (xformers' kernels need CUDA) and says so.
Writes a JSON result (default experiments/results/attention-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from latent.attention import eager_attention, sdpa_attention, xformers_attention, xformers_available
from latent.masks import LAYOUTS, combine_masks, layout_mask


def _timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (kernel selection, allocations)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    g = torch.Generator(device=args.device).manual_seed(0)
    shape_q = (args.batch, args.heads, args.seq, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, args.seq, args.head_dim)
    q = torch.randn(shape_q, generator=g, device=args.device, dtype=dtype)
    k = torch.randn(shape_kv, generator=g, device=args.device, dtype=dtype)
    v = torch.randn(shape_kv, generator=g, device=args.device, dtype=dtype)
    # Variable lengths: row i keeps a different number of trailing positions (left padding).
    lengths = torch.linspace(args.seq // 2, args.seq, args.batch).long().to(args.device)
    keep = torch.arange(args.seq, device=args.device)[None] >= (args.seq - lengths)[:, None]
    slots = torch.arange(args.seq, device=args.device)
    backends = {"eager": eager_attention, "sdpa": sdpa_attention}
    if args.device == "cuda" and xformers_available():
        backends["xformers"] = xformers_attention
    rows = []
    for layout in LAYOUTS:
        mask = combine_masks(layout_mask(layout, slots, args.seq, args.batch, args.seq // 4, 64), keep, slots)
        ref = eager_attention(q, k, v, mask).float()
        valid = keep[:, None, :, None]
        for name, fn in backends.items():
            out = fn(q, k, v, mask).float()
            err = ((out - ref).abs() * valid).max().item()
            sec = _timed(lambda fn=fn, mask=mask: fn(q, k, v, mask), args.repeats, args.device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
            rows.append(dict(layout=layout, backend=name, ms=sec * 1e3, max_abs_err_vs_eager=err, peak_mib=peak))
            print(f"{layout:14s} {name:9s} {sec * 1e3:9.3f} ms   max|err| vs eager {err:.2e}")
    for layout in LAYOUTS:
        by = {r["backend"]: r["ms"] for r in rows if r["layout"] == layout}
        print(f"{layout:14s} speed-up over eager: " + ", ".join(f"{b} {by['eager'] / t:.2f}x" for b, t in by.items()))
    result = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype), args=vars(args), xformers=xformers_available(), rows=rows,
    )
    out = Path(args.out or f"experiments/results/attention-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
