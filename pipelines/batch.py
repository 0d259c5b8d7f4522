"""Batch captioning of large image collections: `mmdlm caption --model DIR --images ... --out captions.jsonl`.

One JSON line per image: `{"path", "caption", "index", "seconds", "load_seconds"}` on success and
`{"path", "error", "index"}` when the image cannot be used (corrupt, truncated, unsupported, too small...).

- Streaming: a DataLoader's workers load and preprocess images while the model decodes the previous
  batch, and a writer thread turns results into JSON lines, so loading, decoding and writing overlap.
- Resumable: the output is append-only and flushed after every batch. A re-run with the same
  arguments skips every path that already has a complete line (success or error; `--retry-errors` redoes
  errors) and drops a torn last line left by a kill, so nothing is lost or written twice, SIGKILL included.
- Sharding: `--shard i/n` keeps the paths whose CRC32 is i mod n, a pure function of the path string, so n
  processes given the same `--images` cover the set exactly once. Shard i writes
  `<out>.shards/shard-0000i-of-0000n.jsonl` and, when it is complete, a `.done` marker beside it; `<out>`
  itself stays untouched until every shard is done. Then the shard that finishes last merges all shard
  files into `<out>` (lines already in `<out>` are kept, no path is written twice, lines follow the input
  order), under a lock file so two shards never merge at once. A stopped shard resumes when rerun. With
  `--no-merge` (or when the merging process died), `--merge-only --shard 0/n --out <out>` merges once all
  n are done (exit status 1 while some are not). Under `torchrun` the shard comes from RANK / WORLD_SIZE and the device from LOCAL_RANK.

A captioner is any object with `preprocessor` (picklable: one image or path -> float [3, H, W]) and
`caption(pixel_values [B, 3, H, W]) -> list[str]`; `CaptioningPipeline` is one. `--model` takes a
pipeline folder, or `package.module:factory` for a captioner of your own.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "list_images", "shard_of", "parse_shard", "dist_shard", "run_captioning", "merge_shards", "shard_path",
    "configure", "run", "BatchJobError",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class BatchJobError(ValueError):
    """A bad argument of the batch job (inputs, output path, shard spec)."""


# ---- inputs ---------------------------------------------------------------------------------------
def list_images(spec: str | os.PathLike | list) -> list[str]:
    """Image paths from a folder (recursive), a glob pattern, a .txt list (one path per line, relative
    to the list's folder, '#' comments), a single image file, or a Python list. Sorted for folders and
    globs, in file order for lists; duplicates are dropped."""
    if isinstance(spec, (list, tuple)):
        paths = [os.fspath(p) for p in spec]
        where = "the image list"
    else:
        spec = os.fspath(spec)
        where = repr(spec)
        if os.path.isdir(spec):
            paths = []
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                paths += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            paths.sort()
            if not paths:
                raise BatchJobError(
                    f"--images {where} is a folder with no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                    "in subfolders too)."
                )
        elif os.path.isfile(spec) and spec.lower().endswith(".txt"):
            base = os.path.dirname(spec)
            with open(spec, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f]
            paths = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
        elif os.path.isfile(spec):
            paths = [spec]
        else:
            paths = sorted(glob.glob(spec, recursive=True))
            paths = [p for p in paths if not os.path.isdir(p)]
            if not paths:
                raise BatchJobError(f"--images {where} is not a folder, a .txt list or a file, and matches no files as a glob.")
    if not paths:
        raise BatchJobError(f"--images {where} names no images.")
    return list(dict.fromkeys(paths))


def parse_shard(spec: str | tuple | None) -> tuple[int, int] | None:
    if spec is None or isinstance(spec, tuple):
        shard = spec
    else:
        try:
            i, n = (int(v) for v in str(spec).split("/"))
        except ValueError as err:
            raise BatchJobError(f"--shard {spec!r} must look like i/n, e.g. 0/4.") from err
        shard = (i, n)
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise BatchJobError(f"--shard {shard[0]}/{shard[1]} needs 0 <= i < n.")
    return shard


def dist_shard() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return int(os.environ.get("RANK", "0")), world
    return None


def shard_of(path: str, n: int) -> int:
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) % n


def shard_path(out: str, shard: tuple[int, int]) -> str:
    i, n = shard
    return os.path.join(out + ".shards", f"shard-{i:05d}-of-{n:05d}.jsonl")


# ---- the output file ------------------------------------------------------------------------------
def _check_writable(path: str) -> None:
    if os.path.isdir(path):
        raise BatchJobError(f"--out {path!r} is a folder; give a file path such as captions.jsonl.")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise BatchJobError(f"cannot write --out {path!r}: {err.strerror or err}.") from err


def read_done(path: str, repair: bool = True) -> tuple[dict[str, dict], int]:
    """Complete lines of an output file by path; a torn last line (killed mid-write) is cut off.
    Returns (records, number of malformed lines)."""
    done: dict[str, dict] = {}
    bad = 0
    if not os.path.exists(path):
        return done, bad
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:  # torn tail: the line was not finished, so its image was not counted
        with open(path, "r+b") as f:
            f.truncate(end)
    for raw in data[:end].splitlines():
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            done[rec["path"]] = rec
        except (ValueError, KeyError, TypeError):
            bad += 1
    return done, bad


class _Writer(threading.Thread):
    """Appends JSON lines from a queue; flushes after each batch so a kill loses at most unflushed batches."""

    def __init__(self, path: str, fsync_every: float = 30.0):
        super().__init__(daemon=True)
        self.path, self.fsync_every = path, fsync_every
        self.q: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in run()

    def run(self):
        last_sync = time.monotonic()
        try:
            while True:
                recs = self.q.get()
                if recs is None:
                    break
                self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
                self.f.flush()
                if time.monotonic() - last_sync > self.fsync_every:
                    os.fsync(self.f.fileno())
                    last_sync = time.monotonic()
            self.f.flush()
            os.fsync(self.f.fileno())
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err
        finally:
            self.f.close()

    def put(self, recs: list[dict]):
        if self.error is not None:
            raise self.error
        self.q.put(recs)

    def close(self):
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


# ---- loading --------------------------------------------------------------------------------------
class _Images(Dataset):
    def __init__(self, items: list[tuple[int, str]], preprocessor: Callable):
        self.items, self.pre = items, preprocessor

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        index, path = self.items[i]
        t = time.perf_counter()
        try:
            fn = getattr(self.pre, "one", self.pre)
            x = fn(path)
            return {"index": index, "path": path, "pixels": x, "error": None, "load": time.perf_counter() - t}
        except Exception as err:  # noqa: BLE001 - every failure becomes an error line naming the image
            msg = str(err) if str(err) else type(err).__name__
            return {"index": index, "path": path, "pixels": None, "error": msg, "load": time.perf_counter() - t}


def _collate(batch: list[dict]) -> dict:
    ok = [b for b in batch if b["error"] is None]
    return {
        "pixels": torch.stack([b["pixels"] for b in ok]) if ok else None,
        "ok": [{k: b[k] for k in ("index", "path", "load")} for b in ok],
        "errors": [{"path": b["path"], "index": b["index"], "error": b["error"]} for b in batch if b["error"]],
    }


# ---- the job --------------------------------------------------------------------------------------
@dataclass
class Summary:
    out: str
    total: int  # images of this shard (or of the whole input)
    succeeded: int  # lines with a caption in the output (all runs)
    failed: int  # error lines in the output (all runs)
    new: int  # images handled by this run
    seconds: float
    images_per_second: float
    merged: bool = False

    def line(self) -> str:
        return (
            f"{self.succeeded} captioned, {self.failed} failed, {self.total} in total -> {self.out} "
            f"({self.new} this run, {self.images_per_second:.2f} images/s)"
            + (" [shards merged]" if self.merged else "")
        )


def run_captioning(
    captioner: Any,
    images,
    out: str | os.PathLike,
    batch_size: int = 32,
    num_workers: int = 2,
    shard: tuple[int, int] | str | None = None,
    merge: bool = True,
    retry_errors: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
    caption_kwargs: dict | None = None,
) -> Summary:
    """Caption `images` (see `list_images`) into the JSONL file `out`; resumable and shardable."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if batch_size < 1:
        raise BatchJobError(f"--batch-size must be >= 1, got {batch_size}.")
    if num_workers < 0:
        raise BatchJobError(f"--num-workers must be >= 0, got {num_workers}.")
    out = os.fspath(out)
    shard = parse_shard(shard) if shard is not None else dist_shard()
    _check_writable(out)
    paths = list_images(images)
    items = list(enumerate(paths))
    target = out
    if shard is not None:
        items = [(i, p) for i, p in items if shard_of(p, shard[1]) == shard[0]]
        target = shard_path(out, shard)
        _check_writable(target)
    done, bad = read_done(target)
    if bad:
        log(f"warning: {target} has {bad} malformed lines; they are ignored (their images are redone).")
    if retry_errors:
        done = {p: r for p, r in done.items() if "error" not in r}
    pending = [(i, p) for i, p in items if p not in done]
    log(
        f"{len(items)} images{'' if shard is None else f' in shard {shard[0]}/{shard[1]}'}: "
        f"{len(items) - len(pending)} already in {target}, {len(pending)} to caption."
    )
    t0 = time.perf_counter()
    new = 0
    if pending:
        new = _caption_all(captioner, pending, target, batch_size, num_workers, progress, caption_kwargs or {})
    elapsed = time.perf_counter() - t0
    if shard is not None:
        with open(target + ".done", "w") as f:
            json.dump({"images": len(items), "host": socket.gethostname(), "time": time.time()}, f)
    final, _ = read_done(target, repair=False)
    wanted = {p for _, p in items}
    ok = sum(1 for p, r in final.items() if p in wanted and "error" not in r)
    failed = sum(1 for p, r in final.items() if p in wanted and "error" in r)
    summary = Summary(target, len(items), ok, failed, new, elapsed, new / elapsed if elapsed > 0 else 0.0)
    if shard is not None and merge:
        summary.merged = merge_shards(out, shard[1], log=log)
    elif shard is not None:
        log(f"--no-merge: {out} is not written; once all {shard[1]} shards are done, merge them with "
            f"mmdlm caption --merge-only --shard 0/{shard[1]} --out {out}")
    log(summary.line())
    return summary


def _caption_all(captioner, pending, target, batch_size, num_workers, progress, caption_kwargs) -> int:
    loader = DataLoader(
        _Images(pending, captioner.preprocessor), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_collate, shuffle=False, prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    writer = _Writer(target)
    writer.start()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pending), unit="img", desc="captioning", dynamic_ncols=True, smoothing=0.1)
    n, n_err = 0, 0
    try:
        for batch in loader:
            recs = list(batch["errors"])
            if batch["pixels"] is not None:
                t = time.perf_counter()
                caps = captioner.caption(batch["pixels"], **caption_kwargs)
                dt = (time.perf_counter() - t) / len(batch["ok"])
                if len(caps) != len(batch["ok"]):
                    raise RuntimeError(f"the captioner returned {len(caps)} captions for {len(batch['ok'])} images.")
                for meta, cap in zip(batch["ok"], caps, strict=True):
                    rec = {"path": meta["path"], "caption": cap if isinstance(cap, str) else cap["caption"],
                           "index": meta["index"], "seconds": round(dt, 6), "load_seconds": round(meta["load"], 6)}
                    if not isinstance(cap, str):
                        rec.update({k: v for k, v in cap.items() if k != "caption"})
                    recs.append(rec)
            recs.sort(key=lambda r: r["index"])
            writer.put(recs)
            n += len(recs)
            n_err += len(batch["errors"])
            if bar is not None:
                bar.update(len(recs))
                if n_err:
                    bar.set_postfix(errors=n_err)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    return n


# ---- merging shards -------------------------------------------------------------------------------
def _lock_is_stale(lock: str, max_age: float = 600.0) -> bool:
    try:
        with open(lock) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return time.time() - os.path.getmtime(lock) > max_age if os.path.exists(lock) else True
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return time.time() - float(info.get("time", 0)) > max_age


def merge_shards(out: str, n: int, log: Callable[[str], Any] | None = None) -> bool:
    """Merge the n shard files into `out` once all are done (lines of an existing `out` are kept; no
    path is written twice). Returns False, doing nothing, while a shard is unfinished or another
    process merges."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    shards = [shard_path(out, (i, n)) for i in range(n)]
    missing = [i for i, s in enumerate(shards) if not os.path.exists(s + ".done")]
    if missing:
        log(
            f"shards {missing[:8]}{'...' if len(missing) > 8 else ''} of {n} are not finished, so {out} is not "
            f"written yet: each shard writes its lines to {out}.shards/, and the shard that finishes last merges "
            f"them all into {out}. If a shard was stopped, rerun it (it resumes), or merge by hand once all are "
            f"done: mmdlm caption --merge-only --shard 0/{n} --out {out}"
        )
        return False
    lock = os.path.join(out + ".shards", "merge.lock")
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if not _lock_is_stale(lock):
                log(f"another process is merging into {out} ({lock} exists).")
                return False
            os.unlink(lock)
    else:
        return False
    try:
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode())
        os.close(fd)
        existing, _ = read_done(out, repair=True)
        records = dict(existing)
        for s in shards:
            recs, _ = read_done(s, repair=False)
            for p, r in recs.items():
                records.setdefault(p, r)
        ordered = sorted(records.values(), key=lambda r: (r.get("index", 1 << 62), r["path"]))
        tmp = f"{out}.merge-{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in ordered:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        log(f"merged {n} shards into {out}: {len(ordered)} lines.")
        return True
    finally:
        if os.path.exists(lock):
            os.unlink(lock)


# ---- command line ---------------------------------------------------------------------------------
def load_captioner(model: str, device: str | None, dtype: str | None = None):
    """A CaptioningPipeline folder, or `module:factory` returning any captioner."""
    if not os.path.isdir(model) and ":" in model:
        import importlib

        mod, _, fn = model.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as err:
            raise BatchJobError(f"--model {model!r}: cannot import {fn!r} from {mod!r} ({err}).") from err
        return factory(device=device)
    if not os.path.isdir(model):
        raise BatchJobError(f"--model {model!r} is not a folder written by CaptioningPipeline.save_pretrained().")
    from pipelines.captioning import CaptioningPipeline

    pipe = CaptioningPipeline.from_pretrained(model)
    if dtype:
        pipe = pipe.to(dtype=getattr(torch, dtype))
    if device:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SHARDING_HELP = (
    "Sharding: with --shard i/n (or under torchrun) a process captions only its share of the images into "
    "OUT.shards/shard-0000i-of-0000n.jsonl and leaves OUT untouched; when a shard finishes it marks its file "
    "done, and the shard that finishes last merges every shard file into OUT (lines already in OUT are kept, "
    "no image twice, input order). Until then the other shards print that they wait. A stopped shard resumes "
    "when rerun with the same arguments. With --no-merge, merge by hand with --merge-only --shard 0/n "
    "--out OUT once all n shards are done."
)


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = SHARDING_HELP
    p.add_argument("--model", help="CaptioningPipeline folder, or package.module:factory (needed unless --merge-only)")
    p.add_argument("--images", help="folder (recursive), glob pattern, or .txt list of paths (needed unless --merge-only)")
    p.add_argument("--out", required=True, help="JSONL output; appended to, so a re-run resumes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader processes loading images")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"])
    p.add_argument("--shard", default=None,
                   help="i/n: caption only shard i of n into OUT.shards/ (default: RANK/WORLD_SIZE); see below")
    p.add_argument("--no-merge", action="store_true", help="leave OUT untouched even when this shard finishes last")
    p.add_argument("--merge-only", action="store_true",
                   help="merge the finished shard files of --shard ?/n into OUT and exit (1 if some are unfinished)")
    p.add_argument("--retry-errors", action="store_true", help="caption again images recorded as errors")
    p.add_argument("--prompt", default=None)
    p.add_argument("--gen-length", type=int, default=None)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None, help="threshold decoding (default: the pipeline's)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the decoding process (default: torch's)")
    p.add_argument("--no-progress", action="store_true")


def _device(arg: str | None) -> str:
    if arg is not None and arg != "cuda":
        return arg
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if arg == "cuda":
        raise BatchJobError("--device cuda was asked for but CUDA is not available here.")
    return "cpu"


def run(args: argparse.Namespace) -> int:
    if args.merge_only:
        shard = parse_shard(args.shard) if args.shard else dist_shard()
        if shard is None:
            raise BatchJobError("--merge-only needs --shard i/n (any i) to know n.")
        return 0 if merge_shards(args.out, shard[1]) else 1
    if args.model is None or args.images is None:
        raise BatchJobError("--model and --images are needed (only --merge-only runs without them).")
    # Check everything cheap before loading the model.
    _check_writable(args.out)
    list_images(args.images)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    captioner = load_captioner(args.model, device, args.dtype)
    gen = {k: getattr(args, k) for k in ("prompt", "gen_length", "block_length", "steps", "threshold", "temperature")}
    gen = {k: v for k, v in gen.items() if v is not None}
    if args.seed is not None and getattr(captioner, "accepts_seed", False):
        gen["seed"] = args.seed
    run_captioning(
        captioner, args.images, args.out, batch_size=args.batch_size, num_workers=args.num_workers,
        shard=args.shard, merge=not args.no_merge, retry_errors=args.retry_errors,
        progress=not args.no_progress, caption_kwargs=gen,
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmdlm caption", description=__doc__.split("\n\n")[0])
    configure(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except BatchJobError as err:
        print(f"mmdlm caption: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
