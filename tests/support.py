"""Small helpers shared by the test modules (the servers themselves are in harness.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from django_scale import metrics


def counter(name: str) -> int:
    """Return the per-process counter *name* of :mod:`django_scale.metrics` (0 if unset)."""
    value = metrics.snapshot().get(name, 0)
    assert isinstance(value, int)
    return value


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll *condition* until it holds; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
