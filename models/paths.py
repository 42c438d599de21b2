"""Where state lives: one directory, ``TRANSFER_SERVE_HOME``, holds every model version, the
active pointer, the label store, the SQLite database and caches."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

HOME_ENV = "TRANSFER_SERVE_HOME"
DEFAULT_HOME = Path("~/.transfer-serve")


def state_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: ``explicit`` if given, else ``$TRANSFER_SERVE_HOME``, else
    ``~/.transfer-serve``. Created if missing."""
    raw = explicit if explicit is not None else os.environ.get(HOME_ENV) or DEFAULT_HOME
    home = Path(raw).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a torn one: a
    temporary file in the same directory, flushed to disk, then renamed over ``path``
    (with permission bits ``mode`` if given, else the temporary file's 0o600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:12]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
