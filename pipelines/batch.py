"""Batch captioning of large image collections: `mmdlm caption --model DIR --images ... --out captions.jsonl`.

One JSON line per image: `{"path", "caption", "index", "seconds", "load_seconds"}` on success and
`{"path", "error", "index"}` when the image cannot be used (corrupt, truncated, unsupported, too small...).

- Streaming: a DataLoader's workers load and preprocess images while the model decodes the previous
  batch, and a writer thread turns results into JSON lines, so loading, decoding and writing overlap.
- Resumable: the output is append-only and flushed after every batch. A re-run with the same
  arguments skips every path that already has a complete line (success or error; `--retry-errors` redoes
  errors) and drops a torn last line left by a kill, so nothing is lost or written twice, SIGKILL included.
- One writer: a job holds an exclusive lock on its output (`<out>.lock`, an flock the system releases when
  the process dies, naming its pid, host and start time); a second job on the same output is refused
  with that name, and the lock a dead job left is taken over.
- What produced the records: `<out>.manifest.json` records the model (a hash of every file of its
  folder, computed while the model loads; a `module:factory` by its name; through the Python API the
  captioner's class or the folder it was loaded from, unless `producer=` says more), the decoding
  settings, the dtype and the mmdlm version (not the batch size, device or workers, which do not choose
  the captions). Resuming with other settings is
  refused, naming what differs, unless `--overwrite` (start the file anew: its records are dropped) or
  `--redo` (caption every image again into `<out>.redo`, which replaces `<out>` once complete; until then
  `<out>` stays as it was, and a stopped redo resumes) is given. Duplicate records (an image written more
  than once, e.g. by two jobs of an older version) are reported; `--repair` rewrites the file atomically
  with one record per image (its last success, else its last error).
- Sharding: `--shard i/n` keeps the paths whose CRC32 is i mod n, a pure function of the path string, so n
  processes given the same `--images` cover the set exactly once. Shard i writes
  `<out>.shards/shard-0000i-of-0000n.jsonl` and, when it is complete, a `.done` marker beside it; `<out>`
  itself stays untouched until every shard is done. Then the shard that finishes last merges all shard
  files into `<out>` (lines already in `<out>` are kept, no path is written twice, lines follow the input
  order), under `<out>`'s lock, so two shards never merge at once; shard files whose manifests differ
  are not merged. A stopped shard resumes when rerun. With
  `--no-merge` (or when the merging process died), `--merge-only --shard 0/n --out <out>` merges once all
  n are done (exit status 1 while some are not). Under `torchrun` the shard comes from RANK / WORLD_SIZE and the device from LOCAL_RANK.

- Engines: `run_captioning(engine=...)` chooses what captions the pending images: this process by default
  (`local_engine`), or `--workers` Ray actors (`pipelines.batch_ray`, `mmdlm caption --engine ray`).
  Everything around it (lock, manifest, resume, shards, error records, the writing) is the same, and the
  engine yields each batch's records in input order, so both write the same lines in the same order.
  The command line itself is `pipelines.batch_cli`.

A captioner is any object with `preprocessor` (picklable: one image or path -> float [3, H, W]) and
`caption(pixel_values [B, 3, H, W]) -> list[str]`; `CaptioningPipeline` is one. `--model` takes a
pipeline folder, or `package.module:factory` for a captioner of your own.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import glob
import hashlib
import json
import os
import queue
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "list_images", "shard_of", "parse_shard", "dist_shard", "run_captioning", "merge_shards", "shard_path",
    "BatchJobError", "OutputLocked", "OutputLock", "read_done", "read_records", "repair_output",
    "describe_captioner", "folder_hash", "manifest_path", "load_batch", "caption_batch", "batches_of",
    "local_engine", "load_captioner", "open_captioner", "check_writable", "output_file", "Engine",
]

# An engine captions the pending (index, path) pairs in batches of `batch_size` with these decoding
# settings, and yields each batch's records (`caption_batch`) in input order.
Engine = Callable[[list[tuple[int, str]], int, dict], Iterator[list[dict]]]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class BatchJobError(ValueError):
    """A bad argument of the batch job (inputs, output path, shard spec), or an output it may not write."""


class OutputLocked(BatchJobError):
    """The output is being written by another job (`holder` names it)."""

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder


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
def check_writable(path: str) -> None:
    if os.path.isdir(path):
        raise BatchJobError(f"--out {path!r} is a folder; give a file path such as captions.jsonl.")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as err:
        raise BatchJobError(f"cannot write --out {path!r}: {err.strerror or err}.") from err


@dataclass
class Records:
    """The complete lines of an output file: one record per image path (its last success, else its last
    error), the number of malformed lines, and how many records each image written more than once has."""

    by_path: dict[str, dict] = field(default_factory=dict)
    bad: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.by_path and not self.bad


def read_records(path: str, repair: bool = True) -> Records:
    """Read an output file; a torn last line (killed mid-write) is cut off when `repair`."""
    out = Records()
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:  # torn tail: the line was not finished, so its image was not counted
        with open(path, "r+b") as f:
            f.truncate(end)
    seen: dict[str, int] = {}
    for raw in data[:end].splitlines():
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            p = rec["path"]
        except (ValueError, KeyError, TypeError):
            out.bad += 1
            continue
        seen[p] = seen.get(p, 0) + 1
        old = out.by_path.get(p)
        if old is None or "error" in old or "error" not in rec:  # a success is never replaced by an error
            out.by_path[p] = rec
    out.duplicates = {p: n for p, n in seen.items() if n > 1}
    return out


def read_done(path: str, repair: bool = True) -> tuple[dict[str, dict], int]:
    """(records by path, number of malformed lines) of an output file (see `read_records`)."""
    recs = read_records(path, repair)
    return recs.by_path, recs.bad


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_records(path: str, records) -> int:
    """Replace `path` atomically by these records, one line each, in input order."""
    ordered = sorted(records, key=lambda r: (r.get("index", 1 << 62), r["path"]))
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    return len(ordered)


def _report_duplicates(path: str, recs: Records, log) -> None:
    if recs.duplicates:
        extra = sum(recs.duplicates.values()) - len(recs.duplicates)
        example = next(iter(recs.duplicates))
        log(f"warning: {path} holds {extra} duplicate records: {len(recs.duplicates)} images were written more "
            f"than once (e.g. {example!r}); each counts once, by its last success. Rewrite the file with one "
            f"record per image: mmdlm caption --repair --out {path}")


# ---- one writer at a time -------------------------------------------------------------------------
def _close_quietly(fd: int, _worker_id: int = 0) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class OutputLock:
    """An exclusive lock on a job's output file, held for the job's life.

    `<out>.lock` is flock-ed: the system releases it when the holder dies, however it dies, so a lock a
    dead job left is simply taken over. The file names the holder (pid, host, start time, command) for the
    message a second job gets."""

    def __init__(self, out: str):
        self.path = os.fspath(out) + ".lock"
        self.fd: int | None = None
        self.previous: dict | None = None  # what a dead holder left in the file

    def acquire(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise OutputLocked(
                    f"{self.path[:-5]} is being written by another job ({holder}); two jobs on one output would "
                    "caption every image twice. Wait for it to finish, stop it, or give another --out.", holder
                ) from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise BatchJobError(f"cannot lock {self.path}: this file system has no file locks.") from err
                raise
            try:  # the holder we waited on may have removed the file as we opened it: lock the one in place
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = self._read(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"null")
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _holder(self, fd: int) -> str:
        info = None
        for _ in range(20):  # the holder writes its name right after it locks
            info = self._read(fd)
            if info:
                break
            time.sleep(0.05)
        if not info:
            return "it has not written its name yet"
        return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: {info.get('command')}"

    def took_over(self) -> str | None:
        """A line about the dead job whose lock this one took over, if any."""
        p = self.previous
        if not p or p.get("pid") == os.getpid():
            return None
        return (f"took over the lock {self.path} left by pid {p.get('pid')} on host {p.get('host')} (started "
                f"{p.get('started')}), which is no longer running.")

    def worker_init(self) -> Callable[[int], None] | None:
        """For DataLoader workers: close their inherited copy, so that a worker outliving a killed job
        does not keep its output locked."""
        return None if self.fd is None else functools.partial(_close_quietly, self.fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still locked: a job waiting to open it locks a new file
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- what produced the records --------------------------------------------------------------------
def manifest_path(path: str) -> str:
    return path + ".manifest.json"


def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmdlm")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout that was never installed
        return "unknown"


def folder_hash(folder: str) -> str:
    """sha256 over every file of a folder (relative name and content; hidden files are skipped)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, folder).encode("utf-8", "surrogateescape") + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(functools.partial(f.read, 1 << 22), b""):
                    h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()


def describe_captioner(captioner, caption_kwargs: dict | None = None, dtype: str | None = None,
                       model: str | None = None, model_hash: str | None = None) -> dict:
    """What produces the records: the model (a folder's hash, a factory's name, or the captioner's class),
    the decoding settings, the dtype and the mmdlm version. Any of them changing changes the records.
    `model_hash`: the folder's `folder_hash`, when the caller computed it already."""
    folder = model if model and os.path.isdir(model) else getattr(captioner, "name_or_path", None)
    if folder and os.path.isdir(folder):
        who = {"folder_sha256": model_hash or folder_hash(folder), "path": os.path.abspath(folder)}
    elif model:
        who = {"factory": model}
    else:
        who = {"object": f"{type(captioner).__module__}.{type(captioner).__qualname__}"}
    return {"model": who, "decoding": dict(sorted((caption_kwargs or {}).items())), "dtype": dtype,
            "mmdlm": project_version()}


def _fingerprint(producer: dict) -> str:
    same = {**producer, "model": {k: v for k, v in producer["model"].items() if k != "path"}}  # a copy is the same model
    return hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_manifest(path: str) -> dict | None:
    try:
        with open(manifest_path(path), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise BatchJobError(f"{manifest_path(path)} is not valid JSON ({err}); it says what produced {path}.") from err


def _write_manifest(path: str, producer: dict) -> None:
    manifest = {"records": os.path.basename(path), "fingerprint": _fingerprint(producer), "producer": producer,
                "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    _write_atomic(manifest_path(path), json.dumps(manifest, indent=2, default=str) + "\n")


def _differences(old: dict, new: dict) -> str:
    a, b = _flat(old), _flat(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k) and k != "model.path"]
    return "; ".join(f"{k}: {a.get(k)!r} in the file, {b.get(k)!r} now" for k in keys)


def _start(path: str, producer: dict) -> None:
    """An empty output file, then its manifest: a kill between leaves an empty file, never records under
    another producer's name."""
    _write_atomic(path, "")
    _write_manifest(path, producer)


def _open_output(target: str, producer: dict, overwrite: bool, redo: bool, log) -> tuple[str, Records]:
    """The file this run appends to (`target`, or `<target>.redo` for --redo) and its records so far."""
    redo_file = target + ".redo"
    if overwrite:
        for leftover in (redo_file, manifest_path(redo_file)):
            if os.path.exists(leftover):
                os.unlink(leftover)
        if os.path.exists(target) and os.path.getsize(target):
            log(f"--overwrite: {target} starts anew; its earlier records are dropped.")
        _start(target, producer)
        return target, Records()
    work = redo_file if redo else target
    recs = read_records(work)
    manifest = _read_manifest(work)
    if manifest is not None and manifest.get("fingerprint") == _fingerprint(producer):
        return work, recs
    if redo or recs.empty:  # a fresh redo file, or an output with no records yet
        _start(work, producer)
        return work, Records()
    stopped = (f" (a --redo was stopped: {redo_file} holds its new records; rerun with --redo to finish it)"
               if os.path.exists(redo_file) else "")
    if manifest is None:
        why = (f"{target} holds {len(recs.by_path)} records but no {os.path.basename(manifest_path(target))} "
               "saying what produced them (another program or an older mmdlm wrote it)")
    else:
        why = (f"{target} was produced with other settings ({_differences(manifest['producer'], producer)}), "
               "and resuming would mix the records of both")
    raise BatchJobError(
        f"{why}{stopped}. Give another --out, or pass --redo (caption every image again; the file is replaced "
        "when they are all done) or --overwrite (drop its records now and start anew)."
    )


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
def load_item(preprocessor: Callable, index: int, path: str) -> dict:
    """One image through the preprocessor; any failure becomes an error naming it (the job goes on)."""
    t = time.perf_counter()
    try:
        fn = getattr(preprocessor, "one", preprocessor)
        x = fn(path)
        return {"index": index, "path": path, "pixels": x, "error": None, "load": time.perf_counter() - t}
    except Exception as err:  # noqa: BLE001 - every failure becomes an error line naming the image
        msg = str(err) if str(err) else type(err).__name__
        return {"index": index, "path": path, "pixels": None, "error": msg, "load": time.perf_counter() - t}


class _Images(Dataset):
    def __init__(self, items: list[tuple[int, str]], preprocessor: Callable):
        self.items, self.pre = items, preprocessor

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return load_item(self.pre, *self.items[i])


def _collate(batch: list[dict]) -> dict:
    ok = [b for b in batch if b["error"] is None]
    return {
        "pixels": torch.stack([b["pixels"] for b in ok]) if ok else None,
        "ok": [{k: b[k] for k in ("index", "path", "load")} for b in ok],
        "errors": [{"path": b["path"], "index": b["index"], "error": b["error"]} for b in batch if b["error"]],
    }


def load_batch(preprocessor: Callable, items: list[tuple[int, str]]) -> dict:
    """The images `items` ((index, path) pairs) loaded in this process, as the DataLoader's batches."""
    return _collate([load_item(preprocessor, i, p) for i, p in items])


def caption_batch(captioner, batch: dict, caption_kwargs: dict) -> list[dict]:
    """The records of one loaded batch (its error records included), in input order."""
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
    return recs


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


def output_file(out: str, shard: tuple[int, int] | None) -> str:
    """The file a job writes: `out`, or its shard's file."""
    return out if shard is None else shard_path(out, shard)


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
    overwrite: bool = False,
    redo: bool = False,
    producer: dict | None = None,
    lock: OutputLock | None = None,
    engine: Engine | None = None,
) -> Summary:
    """Caption `images` (see `list_images`) into the JSONL file `out`; resumable and shardable.

    `producer` says what makes the records (default `describe_captioner(captioner, caption_kwargs)`); a file
    made by another is refused unless `overwrite` or `redo`. `lock`: the output's lock when the caller
    already holds it (the command line takes it before loading the model). `engine`: what captions the
    images not yet in the output (default `local_engine(captioner, num_workers)`; `pipelines.batch_ray`
    gives one of Ray actors); this process alone writes the output, in the order the engine yields."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if batch_size < 1:
        raise BatchJobError(f"--batch-size must be >= 1, got {batch_size}.")
    if num_workers < 0:
        raise BatchJobError(f"--num-workers must be >= 0, got {num_workers}.")
    if overwrite and redo:
        raise BatchJobError("--overwrite and --redo exclude each other: start anew now, or replace when done.")
    out = os.fspath(out)
    shard = parse_shard(shard) if shard is not None else dist_shard()
    check_writable(out)
    paths = list_images(images)
    items = list(enumerate(paths))
    target = output_file(out, shard)
    if shard is not None:
        items = [(i, p) for i, p in items if shard_of(p, shard[1]) == shard[0]]
        check_writable(target)
    if captioner is None and (engine is None or producer is None):
        raise BatchJobError("run_captioning needs a captioner, unless an engine and a producer are given.")
    producer = producer or describe_captioner(captioner, caption_kwargs)
    own_lock = lock is None
    lock = lock or OutputLock(target).acquire()
    try:
        if lock.took_over():
            log(lock.took_over())
        if shard is not None and (overwrite or redo) and os.path.exists(target + ".done"):
            os.unlink(target + ".done")  # this shard's file is being made again: it is not done
        work, recs = _open_output(target, producer, overwrite, redo, log)
        if recs.bad:
            log(f"warning: {work} has {recs.bad} malformed lines; they are ignored (their images are redone).")
        _report_duplicates(work, recs, log)
        done = recs.by_path
        if retry_errors:
            done = {p: r for p, r in done.items() if "error" not in r}
        pending = [(i, p) for i, p in items if p not in done]
        log(
            f"{len(items)} images{'' if shard is None else f' in shard {shard[0]}/{shard[1]}'}: "
            f"{len(items) - len(pending)} already in {work}, {len(pending)} to caption."
        )
        t0 = time.perf_counter()
        new = 0
        if pending:
            engine = engine or local_engine(captioner, num_workers, lock.worker_init())
            new = _append_all(engine(pending, batch_size, caption_kwargs or {}), work, len(pending), progress)
        elapsed = time.perf_counter() - t0
        final = read_records(work, repair=False)
        if final.duplicates and retry_errors:  # the errors this run redid: keep one record per image
            _write_records(work, final.by_path.values())
        if work != target:  # --redo: every image is done, so the new file replaces the old one
            os.replace(manifest_path(work), manifest_path(target))
            os.replace(work, target)
            log(f"--redo: {target} now holds the records of these settings only.")
        if shard is not None:
            with open(target + ".done", "w") as f:
                json.dump({"images": len(items), "host": socket.gethostname(), "time": time.time()}, f)
    finally:
        if own_lock:
            lock.release()
    wanted = {p for _, p in items}
    ok = sum(1 for p, r in final.by_path.items() if p in wanted and "error" not in r)
    failed = sum(1 for p, r in final.by_path.items() if p in wanted and "error" in r)
    summary = Summary(target, len(items), ok, failed, new, elapsed, new / elapsed if elapsed > 0 else 0.0)
    if shard is not None and merge:
        summary.merged = merge_shards(out, shard[1], log=log, replace=overwrite or redo)
    elif shard is not None:
        log(f"--no-merge: {out} is not written; once all {shard[1]} shards are done, merge them with "
            f"mmdlm caption --merge-only --shard 0/{shard[1]} --out {out}")
    log(summary.line())
    return summary


def batches_of(pending: list[tuple[int, str]], batch_size: int) -> list[list[tuple[int, str]]]:
    """The batches a job captions: `pending` cut in order into runs of `batch_size` (the last one shorter)."""
    return [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]


def local_engine(captioner, num_workers: int = 2, worker_init=None) -> Engine:
    """Caption in this process; a DataLoader's `num_workers` processes load the next batches meanwhile."""

    def engine(pending, batch_size, caption_kwargs):
        loader = DataLoader(
            _Images(pending, captioner.preprocessor), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_collate, shuffle=False, prefetch_factor=4 if num_workers else None,
            persistent_workers=False, worker_init_fn=worker_init if num_workers else None,
        )
        for batch in loader:
            yield caption_batch(captioner, batch, caption_kwargs)

    return engine


def _append_all(batches: Iterable[list[dict]], target: str, total: int, progress: bool) -> int:
    """Append each batch's records to `target` as it comes (flushed per batch), with a progress bar."""
    writer = _Writer(target)
    writer.start()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="captioning", dynamic_ncols=True, smoothing=0.1)
    n, n_err = 0, 0
    try:
        for recs in batches:
            writer.put(recs)
            n += len(recs)
            n_err += sum("error" in r for r in recs)
            if bar is not None:
                bar.update(len(recs))
                if n_err:
                    bar.set_postfix(errors=n_err)
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    return n


# ---- merging shards and repairing ----------------------------------------------------------------
def merge_shards(out: str, n: int, log: Callable[[str], Any] | None = None, replace: bool = False) -> bool:
    """Merge the n shard files into `out` once all are done (lines of an existing `out` are kept; no
    path is written twice). Returns False, doing nothing, while a shard is unfinished or another
    process writes `out`. The shards must have been made with the same settings, and an `out` that
    already holds records with them too, unless `replace` (then `out` is replaced by the shards' records)."""
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
    try:
        lock = OutputLock(out).acquire()
    except OutputLocked as err:
        log(f"another process is writing {out} ({err.holder}); it merges the shards.")
        return False
    with lock:
        manifests = [_read_manifest(s) for s in shards]
        prints = {m.get("fingerprint") if m else None for m in manifests}
        if len(prints) != 1 or None in prints:
            raise BatchJobError(
                f"the {n} shard files of {out} were not all produced with the same settings (or some have no "
                f"manifest); rerun the odd shards with --redo, or all of them with --overwrite."
            )
        existing = read_records(out)
        mine = _read_manifest(out)
        if not existing.empty and not replace and (mine or {}).get("fingerprint") not in prints:
            raise BatchJobError(
                f"{out} already holds records of other settings than its shards'; merge with --overwrite to "
                f"replace them, or merge into another --out."
            )
        records = {} if replace else dict(existing.by_path)
        for s in shards:
            for p, r in read_records(s, repair=False).by_path.items():
                records.setdefault(p, r)
        written = _write_records(out, records.values())
        _write_manifest(out, manifests[0]["producer"])
        log(f"merged {n} shards into {out}: {written} lines.")
        return True


def repair_output(out: str, log: Callable[[str], Any] | None = None) -> int:
    """Rewrite `out` atomically with one record per image (its last success, else its last error) and no
    malformed or torn lines, under the output's lock. Returns how many records were removed."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not os.path.isfile(out):
        raise BatchJobError(f"--repair: {out!r} is not a file.")
    with OutputLock(out):
        recs = read_records(out)
        extra = sum(recs.duplicates.values()) - len(recs.duplicates)
        if extra or recs.bad:
            _write_records(out, recs.by_path.values())
        log(f"repaired {out}: {len(recs.by_path)} images, {extra} duplicate records and {recs.bad} malformed lines "
            "removed.")
        return extra + recs.bad


# ---- loading a captioner -----------------------------------------------------------------------------------
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


def _device(arg: str | None) -> str:
    if arg is not None and arg != "cuda":
        return arg
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if arg == "cuda":
        raise BatchJobError("--device cuda was asked for but CUDA is not available here.")
    return "cpu"


def open_captioner(model: str, device: str | None = None, dtype: str | None = None, threads: int | None = None):
    """`load_captioner` on the device this process should use (`_device`), with `threads` torch threads."""
    if threads:
        torch.set_num_threads(threads)
    return load_captioner(model, _device(device), dtype)
