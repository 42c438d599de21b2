"""Reading what the command lines print: with ``--json``, ``python -m training`` (and ``python -m
store``) end their output with one JSON object, after any other lines."""

from __future__ import annotations

import json
from typing import Any


def last_json(text: str) -> Any:
    """The JSON value on the last line of a command's output."""
    return json.loads(text.strip().splitlines()[-1])
