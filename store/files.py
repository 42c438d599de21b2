"""Writing files so that a crash or a concurrent reader never sees half of one: the one atomic
writer, checksums, and flushing a freshly written directory to disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes, mode: int | None = None, *, durable: bool = True) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a torn one: a
    temporary file in the same directory, flushed to disk (unless ``durable`` is False: then
    a power cut may leave the file with the wrong bytes, and the reader must be able to tell),
    then renamed over ``path`` (with permission bits ``mode`` if given, else the temporary
    file's 0o600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:12]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_unless_present(path: Path, data: bytes, *, durable: bool = True) -> bool:
    """Write ``data`` to ``path`` atomically (:func:`write_atomic`) unless a file of that size is
    already there (a file named by its content's hash: the same size means the same bytes).
    Returns whether it wrote."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == len(data):
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, durable=durable)
    return True


def write_json_atomic(path: Path, data: Any, mode: int | None = None) -> None:
    """:func:`write_atomic` of ``data`` as indented JSON with sorted keys."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode(), mode)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, lowercase hex, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, and the directories holding them, to disk: before a
    freshly written directory is made visible, its contents must survive a power cut."""
    directories = {root}
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
            directories.add(path.parent)
    for directory in directories:
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a file created or renamed into it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
