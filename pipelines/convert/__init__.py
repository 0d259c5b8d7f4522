"""Checkpoints from elsewhere: in as a pipeline folder, out as a Hugging Face folder.

```python
from pipelines.convert import convert, export

report = convert("qwen2", "Qwen2.5-0.5B", "runs/qwen2-mdm")   # TextDiffusionPipeline folder
export("runs/qwen2-mdm", "runs/qwen2-hf", family="qwen2")        # Qwen2ForCausalLM loads it
```

Command line: `mmdlm convert --from FAMILY SRC DST [--mask-token-id N]` and `mmdlm convert --to FAMILY SRC DST`.
A converter is a name map plus config checks (families.py); loading streams tensor by tensor
(weights.py, loading.py); export.py writes the backbone back. docs/converting.md walks through it.
"""

from __future__ import annotations

import argparse

import torch

from .export import TARGETS, export
from .families import FAMILIES, Family, get_family
from .loading import ConversionReport, convert, load_backbone
from .weights import ConversionError

__all__ = [
    "convert", "export", "load_backbone", "ConversionReport", "ConversionError", "FAMILIES", "Family",
    "get_family", "configure", "run",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = ("--from converts a local checkpoint folder into a TextDiffusionPipeline folder; --to writes a "
                "backbone or pipeline folder back as a Hugging Face folder. See docs/converting.md.")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="family", choices=sorted(FAMILIES), help="family of the checkpoint SRC")
    way.add_argument("--to", dest="target", choices=sorted(TARGETS), help="export SRC as this Hugging Face family")
    p.add_argument("src", metavar="SRC", help="local folder: config.json + safetensors (or our folder with --to)")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="mask token id (default: the checkpoint's; an autoregressive base gets one added)")
    p.add_argument("--layout", dest="attention_layout", default=None,
                   choices=["bidirectional", "causal", "block_causal", "prefix"], help="attention layout over the family's")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--block-alignment", default=None, choices=["prefix", "start"])
    p.add_argument("--logit-shift", action=argparse.BooleanOptionalAction, default=None,
                   help="logits[i] from slot i - 1 (Dream, Fast-dLLM v2); default: the family's")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the checkpoint's own")
    p.add_argument("--allow-unknown-config", action="store_true",
                   help="convert although config.json has fields this converter does not know")


def run(args: argparse.Namespace) -> int:
    dtype = DTYPES.get(args.dtype)
    if args.target:
        for note in export(args.src, args.dst, family=args.target, dtype=dtype):
            print(f"note: {note}")
        print(f"wrote {args.target} folder {args.dst}")
        return 0
    report = convert(
        args.family, args.src, args.dst, args.mask_token_id, dtype=dtype, allow_unknown_config=args.allow_unknown_config,
        attention_layout=args.attention_layout, block_size=args.block_size, block_alignment=args.block_alignment,
        logit_shift=args.logit_shift,
    )
    print("\n".join(report.lines()))
    return 0
