"""Command-line tools the tests run (promtool, docker-compose): found on the PATH, or the test
fails, never skips, with the command that installs the tool."""

from __future__ import annotations

import shutil

import pytest


def required_tool(name: str, install: str) -> str:
    """The path of ``name``; the calling test fails (saying ``install``) if it is not on the PATH."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {install}", pytrace=False)
    return found
