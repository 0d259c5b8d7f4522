"""`mmdlm quantize SRC DST --scheme int8|int4`: a pipeline (or backbone) folder with quantized weights.

Every backbone of the pipeline (each component saved as `latent.backbone.DiffusionTransformer` in
model_index.json) is quantized with `latent.quantization.quantize_backbone` and written as plain
safetensors with a quantization.json; the other components (tokenizer, scheduler, adapters) are copied
as they are. DST loads with the same `from_pretrained` as SRC, already quantized. DST is written all at
once: a stopped run leaves no half-written folder.

    mmdlm quantize runs/text_tiny/pipeline runs/text_tiny/pipeline-int8 --scheme int8
    mmdlm quantize runs/text_tiny/pipeline runs/text_tiny/pipeline-int4 --scheme int4 --group-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from latent.backbone import DiffusionTransformer
from latent.folders import atomic_folder
from latent.quantization import DEFAULT_SKIP, SCHEMES, is_quantized_folder, quantize_backbone

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKBONE_ENTRY = ["latent.backbone", "DiffusionTransformer"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="pipeline folder (with model_index.json) or backbone folder (config.json)")
    parser.add_argument("dst", help="folder to write (a new or empty folder, or an earlier output of this command)")
    parser.add_argument("--scheme", required=True, choices=SCHEMES,
                        help="int8: a scale per output channel; int4: a scale per --group-size input weights")
    parser.add_argument("--group-size", type=int, default=None, help="int4 only: weights per scale (default 32)")
    parser.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP), metavar="NAME",
                        help=f"modules kept in full precision (default: {' '.join(DEFAULT_SKIP)}); "
                             "--skip with no name quantizes every linear layer, the untied output head included")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the backbone to this dtype before quantizing (default: as saved)")


def _backbones(src: str) -> list[str]:
    """The subfolders of a pipeline folder that hold a backbone ("" for a backbone folder itself)."""
    index = os.path.join(src, "model_index.json")
    if not os.path.isfile(index):
        if os.path.isfile(os.path.join(src, "config.json")):
            return [""]
        raise ValueError(f"{src!r} is neither a pipeline folder (model_index.json) nor a backbone folder (config.json).")
    with open(index) as f:
        entries = json.load(f)
    names = [k for k, v in entries.items() if not k.startswith("_") and list(v or []) == BACKBONE_ENTRY]
    if not names:
        raise ValueError(f"{src!r}: model_index.json names no latent.backbone DiffusionTransformer to quantize.")
    return names


def quantize_folder(src: str, dst: str, scheme: str, group_size: int | None = None, skip=DEFAULT_SKIP,
                    dtype: torch.dtype | None = None) -> list[str]:
    """Write `src` with its backbones quantized to `dst`; returns the quantized subfolders."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise ValueError(f"{src!r} is not a folder; give a pipeline or backbone folder written by save_pretrained().")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("DST must differ from SRC: the full-precision folder is kept.")
    names = _backbones(src)
    for name in names:
        if is_quantized_folder(os.path.join(src, name)):
            raise ValueError(f"{os.path.join(src, name)!r} is already quantized; quantize the full-precision folder.")
    with atomic_folder(dst, replaces=("model_index.json", "config.json")) as tmp:
        if names != [""]:
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=lambda d, _: names if os.path.samefile(d, src) else [])
        for name in names:
            model = DiffusionTransformer.from_pretrained(src, subfolder=name or None, torch_dtype=dtype)
            quantize_backbone(model, scheme, group_size=group_size, skip=tuple(skip))
            model.save_pretrained(os.path.join(tmp, name))
    return names


def run(args) -> int:
    names = quantize_folder(args.src, args.dst, args.scheme, args.group_size, args.skip,
                            DTYPES[args.dtype] if args.dtype else None)
    where = ", ".join(n or "backbone" for n in names)
    print(f"{args.dst}: {where} quantized to {args.scheme}; load it with the same from_pretrained as {args.src}.")
    return 0
