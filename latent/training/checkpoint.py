"""Checkpoints in safetensors + JSON only (nothing is ever pickled or ``torch.load``-ed), written atomically.

Layout of ``<run>/checkpoints/step_00000100/``::

    modules.safetensors               every module's weights, named <module>.<parameter>
    state.safetensors + state.json    stage, step, optimizer, LR scheduler, the task's data position
    rng_rank<r>.safetensors + .json   each rank's torch / CUDA / Python RNG states
    COMPLETE                          written last

Nested state (the optimizer's ``state_dict``, the data stream's state, ...) is flattened by
:func:`flatten`: tensors go to the safetensors file under their path, everything else stays in a JSON
skeleton with ``{"__tensor__": key}`` placeholders. A checkpoint is built in ``.tmp-step_...``, every
file is fsync-ed, and the folder is renamed into place; :func:`latest_checkpoint` only ever returns
folders that were renamed and carry ``COMPLETE``, so a run killed at any moment resumes from its last
complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "flatten", "unflatten", "write_state", "read_state", "latest_checkpoint", "list_checkpoints",
    "CheckpointWriter", "rng_state", "set_rng_state", "check_compatible", "load_module_weights", "save_module_weights",
    "resolve_checkpoint", "saved_shapes", "MODULES_FILE",
]

STEP_RE = re.compile(r"^step_(\d+)$")
MODULES_FILE = "modules.safetensors"


# ------------------------------------------------------------------------------ flatten / unflatten
def flatten(obj, tensors: dict | None = None, prefix: str = "s"):
    """Split a nested structure into (skeleton JSON, {key: tensor})."""
    if tensors is None:
        tensors = {}
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{prefix}.{k}")[0] for k, v in obj.items()}, tensors
        items = [[flatten(k, tensors, f"{prefix}.k{i}")[0], flatten(v, tensors, f"{prefix}.v{i}")[0]]
                 for i, (k, v) in enumerate(obj.items())]
        return {"__dict__": items}, tensors
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)]}, tensors
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}, tensors
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix})")


def unflatten(skel, tensors: dict):
    if isinstance(skel, list):
        return [unflatten(v, tensors) for v in skel]
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__tuple__" in skel:
            return tuple(unflatten(v, tensors) for v in skel["__tuple__"])
        if "__dict__" in skel:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__dtype__" in skel:
            return getattr(torch, skel["__dtype__"])
        return {k: unflatten(v, tensors) for k, v in skel.items()}
    return skel


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_state(folder: Path, name: str, obj) -> None:
    """``name.safetensors`` + ``name.json`` holding ``obj`` (fsync-ed)."""
    skel, tensors = flatten(obj)
    st, js = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_file(tensors, str(st), metadata={"format": "pt"})
    js.write_text(json.dumps(skel))
    _fsync_file(st)
    _fsync_file(js)


def read_state(folder: Path, name: str):
    folder = Path(folder)
    skel = json.loads((folder / f"{name}.json").read_text())
    tensors = {}
    with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return unflatten(skel, tensors)


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


# ------------------------------------------------------------------------------ finding checkpoints
def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = STEP_RE.match(d.name)
            if m and d.is_dir() and (d / "COMPLETE").is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint folder, from itself or from a run folder (its newest complete checkpoint)."""
    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    for root in (p / "checkpoints", p):
        newest = latest_checkpoint(root)
        if newest is not None:
            return newest
    raise FileNotFoundError(f"{str(path)!r} is neither a complete checkpoint folder nor a run folder holding one")


def saved_shapes(weights: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    with safe_open(str(weights), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_compatible(shapes: dict[str, tuple[int, ...]], module: torch.nn.Module, where: str,
                     strict: bool = True) -> list[str]:
    """Raise a clear ValueError when saved weights do not fit ``module`` (another shape, or with ``strict``
    other names); returns the names that will load."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = [f"{k}: saved {list(s)} vs module {list(own[k])}" for k, s in shapes.items() if k in own and own[k] != s]
    if strict:
        problems += [f"{k}: saved, not in the module" for k in shapes if k not in own]
        problems += [f"{k}: in the module, not saved" for k in own if k not in shapes]
    loadable = [k for k in shapes if k in own]
    if not loadable and not problems:
        problems.append("no saved weight name matches the module's (they look like "
                        f"{', '.join(list(shapes)[:3])} vs {', '.join(list(own)[:3])})")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"the weights in {where} were saved from a different model:\n  {shown}")
    return loadable


def save_module_weights(state_dict: dict, folder: Path) -> None:
    """All modules' weights in one safetensors file (tied tensors are stored as copies; safetensors refuses
    shared storage)."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(sd, str(folder / MODULES_FILE), metadata={"format": "pt"})
    _fsync_file(folder / MODULES_FILE)


def load_module_weights(folder: str | os.PathLike, module: torch.nn.Module, what: str = "checkpoint",
                        strict: bool = True) -> list[str]:
    """Load a checkpoint's weights into ``module`` after :func:`check_compatible`; returns the loaded names.
    With ``strict=False`` only the weights whose names the module has are loaded (a stage starting from
    another run that holds a subset of the modules)."""
    weights = Path(folder) / MODULES_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{what}: no {MODULES_FILE} in {folder}")
    names = check_compatible(saved_shapes(weights), module, f"{what} ({folder})", strict=strict)
    sd = {}
    with safe_open(str(weights), framework="pt") as f:
        for k in names:
            sd[k] = f.get_tensor(k)
    module.load_state_dict(sd, strict=strict)
    return names


# ------------------------------------------------------------------------------ writing
class CheckpointWriter:
    """Writes ``step_<n>`` folders atomically under ``root``; in a distributed run every rank calls
    :meth:`begin`, :meth:`write_rank` and :meth:`commit` (with barriers between them), and only the
    main process writes the shared files and renames."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, is_main: bool = True, barrier=None):
        self.root = Path(root)
        self.keep = keep
        self.is_main = is_main
        self.barrier = barrier or (lambda: None)

    def cleanup_partial(self) -> None:
        """Remove half-written folders left by a killed run (main process only)."""
        if self.is_main and self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith(".tmp-") or d.name.startswith(".old-"):
                    shutil.rmtree(d, ignore_errors=True)

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-step_{step:08d}"

    def save(self, step: int, write_main, rank: int = 0) -> Path | None:
        """``write_main(folder)`` writes the shared files (main process only); every rank writes its RNG."""
        tmp = self.tmp_dir(step)
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        write_state(tmp, f"rng_rank{rank}", rng_state())
        self.barrier()
        final = self.root / f"step_{step:08d}"
        if self.is_main:
            write_main(tmp)
            (tmp / "COMPLETE").write_text(f"{step}\n")
            _fsync_file(tmp / "COMPLETE")
            for sub in tmp.rglob("*"):
                if sub.is_dir():
                    _fsync_dir(sub)
            _fsync_dir(tmp)
            old = None
            if final.exists():  # the same step saved again (e.g. a resume that stops at once)
                old = self.root / f".old-step_{step:08d}"
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        ckpts = list_checkpoints(self.root)
        for _, d in ckpts[: -self.keep]:
            trash = self.root / f".old-{d.name}"
            os.rename(d, trash)  # atomic: a half-deleted folder is never taken for a checkpoint
            shutil.rmtree(trash, ignore_errors=True)


def load_pipeline_components(modules, path, names: dict[str, str], what: str) -> None:
    """Load modules from a pipeline folder written by a task's export: ``names`` maps a module name to the
    pipeline component folder (e.g. {"model": "model", "adapter": "vision_adapter"}); the components must
    exist and have the modules' shapes."""
    from safetensors.torch import load_file

    loaded = []
    for module_name, sub in names.items():
        folder = Path(path) / sub
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            continue
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        module = getattr(modules, module_name)
        check_compatible({k: tuple(v.shape) for k, v in sd.items()}, module, f"{what} ({folder})", strict=False)
        module.load_state_dict(sd, strict=False)
        loaded.append(module_name)
    if not loaded:
        raise FileNotFoundError(f"{what}={str(path)!r}: none of {sorted(set(names.values()))} holds weights there")
