"""Safetensors read and written tensor by tensor, so a conversion holds about one copy of the weights.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
and the raw bytes. Reading goes through plain file reads into the destination tensor (no memory map whose
pages would stay resident beside the copy); writing streams each tensor's bytes after the header.
Pickled checkpoints (.bin, .pt, .pth, .ckpt) are never opened: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted, with the field or file that says why."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype, shape and byte range."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


def read_header(path: str) -> dict[str, Entry]:
    """The tensors of one safetensors file, from its header only."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ConversionError(f"{path!r} is not a safetensors file (header length {size}).")
            header = json.loads(f.read(size))
            file_size = os.fstat(f.fileno()).st_size
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path!r} is not a readable safetensors file: {err}") from err
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ConversionError(f"{path!r}: tensor {name!r} has dtype {info['dtype']}, which is not read here.")
        begin, end = info["data_offsets"]
        if base + end > file_size:
            raise ConversionError(f"{path!r} is truncated: tensor {name!r} ends past the end of the file.")
        entries[name] = Entry(path, DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end)
    return entries


def _refuse_pickles(folder: str, names: list[str]) -> None:
    pickled = sorted(n for n in names if n.endswith(PICKLED))
    hint = (
        f" It holds pickled weights {pickled}, which are never loaded here (unpickling runs code). If you trust "
        "them, convert them once with transformers: AutoModelForCausalLM.from_pretrained(folder)"
        ".save_pretrained(new_folder, safe_serialization=True), then convert new_folder."
        if pickled else ""
    )
    raise ConversionError(f"No safetensors weights ({SINGLE} or {INDEX}) in {folder!r}.{hint}")


def checkpoint_index(folder: str) -> dict[str, Entry]:
    """Every tensor of a checkpoint folder: `model.safetensors`, or the shards its
    `model.safetensors.index.json` names (each must exist and hold the tensors the index puts there)."""
    names = os.listdir(folder)
    if INDEX in names:
        try:
            with open(os.path.join(folder, INDEX)) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise ConversionError(f"{os.path.join(folder, INDEX)!r} is not a valid index ({err}).") from err
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise ConversionError(f"{INDEX} in {folder!r} names shard file(s) that are missing: {missing}.")
        headers = {s: read_header(os.path.join(folder, s)) for s in shards}
        entries = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise ConversionError(f"{INDEX} puts tensor {name!r} in {shard!r}, but that file does not hold it.")
            entries[name] = headers[shard][name]
        return entries
    if SINGLE in names:
        return read_header(os.path.join(folder, SINGLE))
    _refuse_pickles(folder, names)


def read_into(entry: Entry, out: torch.Tensor) -> None:
    """Read one tensor into `out` (same shape, contiguous); a different dtype is converted on the way."""
    if tuple(out.shape) != entry.shape:
        raise ConversionError(f"{entry.file!r}: shape {entry.shape} does not fit {tuple(out.shape)}.")
    if not out.numel():
        return
    target = out if out.dtype == entry.dtype else torch.empty(entry.shape, dtype=entry.dtype)
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        if f.readinto(memoryview(target.view(-1).view(torch.uint8).numpy())) != entry.end - entry.begin:
            raise ConversionError(f"{entry.file!r} is truncated.")
    if target is not out:
        out.copy_(target)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (any views; cast to `dtype` one at a time when given) to one safetensors file; written
    to a temporary name and renamed, so a stopped export never leaves a half file under the final name."""
    header, offset = {}, 0
    for name, t in tensors.items():
        kind = dtype or t.dtype
        size = t.numel() * torch.empty((), dtype=kind).element_size()
        header[name] = {"dtype": NAMES[kind], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            t = t.detach().to("cpu", dtype or t.dtype).contiguous()
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)
