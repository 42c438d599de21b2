"""The one poller: wait for a condition with a deadline, instead of a loop of sleeps in each test."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T | Literal[False]], *, timeout: float, interval: float = 0.1,
               message: str | Callable[[], str] = "the condition did not hold") -> T:
    """Call ``check`` every ``interval`` seconds until it holds, for at most ``timeout`` seconds
    (``math.inf``: no limit), and return what it returned.

    ``check`` holds unless it returns ``False`` or raises :class:`AssertionError`, so it can be a
    predicate (``lambda: job_done()``) or a block of assertions. On timeout the last
    assertion is raised again, else :class:`TimeoutError` with ``message`` (a callable is called
    then, so it can show the latest log). Any other exception propagates at once: a check that
    sees a state it will never leave can fail fast (``pytest.fail``, ``RuntimeError``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        else:
            if value is not False:
                return value
            if time.monotonic() >= deadline:
                text = message() if callable(message) else message
                raise TimeoutError(f"{text} (not within {timeout:g} s)")
        time.sleep(interval)
