"""Folders written all at once: a reader sees the old folder or the new one, never half of one.

A pipeline or model folder is written into a temporary sibling (`.tmp-<name>`) that is renamed into
place once complete. A kill during the write leaves the old folder as it was and a `.tmp-` folder,
which loaders refuse (`is_unfinished`) and the next write clears.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TMP_PREFIX", "replace_dir", "atomic_folder", "is_unfinished"]

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def replace_dir(src: Path, dst: Path) -> None:
    """Move a fully written folder into place (the old one, if any, is removed only after the rename)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        old = dst.with_name(f"{OLD_PREFIX}{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


@contextmanager
def atomic_folder(dst: str | os.PathLike, replaces: tuple[str, ...] | None = None) -> Iterator[Path]:
    """`with atomic_folder(dst) as tmp:` write everything into `tmp`; when the block ends without an
    error, `tmp` replaces `dst`. On an error (or an interrupt) `dst` stays as it was and `tmp` is removed.

    `replaces`: for a destination the caller does not own (a user's path), the names one of which an
    existing non-empty `dst` must hold to be replaced, so that a folder of other files is never removed."""
    dst = Path(os.fspath(dst)).resolve()
    if replaces is not None and dst.is_dir() and any(dst.iterdir()) and not any((dst / n).exists() for n in replaces):
        raise ValueError(f"{str(dst)!r} holds other files (none of {list(replaces)}); it is not replaced. Give a new "
                         "or empty folder.")
    tmp = dst.with_name(f"{TMP_PREFIX}{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a write that was killed
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)


def is_unfinished(path: str | os.PathLike) -> bool:
    """True for the temporary or replaced folder of an atomic write (never a finished export)."""
    return Path(os.fspath(path)).resolve().name.startswith((TMP_PREFIX, OLD_PREFIX))
