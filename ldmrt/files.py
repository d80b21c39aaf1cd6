"""Files that are written whole or not at all, folders swapped in only when complete, and ldmrt's cache.

`atomic_write` is the one way ldmrt writes a file a user or a reader may see (PNGs, checkpoints, manifests,
TensorRT plans, benchmark JSON): a temporary file with a unique name beside the target, fsync, rename. Two
writers of one target each produce a whole file and the last rename wins; a reader sees the old file or the
new one, never a part. The temporary names start with `.NAME.` and end with `TMP_SUFFIX`, so that they are
recognisably ldmrt's.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import OutputError

TMP_SUFFIX = ".ldmrt-tmp"


def cache_root() -> Path:
    """Where ldmrt keeps what it can rebuild (engines made by `ldmrt generate`, the C++ library, TensorRT
    timing caches): $LDMRT_CACHE, else $XDG_CACHE_HOME/ldmrt, else ~/.cache/ldmrt."""
    if os.environ.get("LDMRT_CACHE"):
        return Path(os.environ["LDMRT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldmrt"


def sha256(path: Path) -> str:
    """Streamed: engine files are gigabytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def atomic_write(path, data) -> Path:
    """Write `data` (bytes, str, or a callable that writes the file at the path it is given) to `path`.

    Raises OutputError naming the path and the reason (read-only, full disk, a folder at `path`, a file where
    a parent folder should be); then neither `path` nor a temporary file is left changed.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_reason(e)}") from None
    try:
        if callable(data):
            os.close(fd)
            fd = None
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
        else:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data.encode() if isinstance(data, str) else memoryview(data))
        os.fsync(fd)  # the data is on disk before the name points at it
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException as e:
        if fd is not None:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path}: {_reason(e)}") from None
        raise
    return path


def check_writable(path) -> Path:
    """Fail fast, before any heavy work, when `path` cannot be written: a folder in its place, a file where a
    parent folder should be, or a read-only folder (a full disk shows only when writing: atomic_write)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {parent} is not writable (read-only or not yours)")
    return path
