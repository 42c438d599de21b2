"""Where state lives: one directory, ``TRANSFER_SERVE_HOME``, holds every model version, the
active pointer, the label store, the SQLite database and caches."""

from __future__ import annotations

import os
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
