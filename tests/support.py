"""Small helpers shared by the test modules (the servers themselves are in harness.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from django_scale import metrics

T = TypeVar("T")


def counter(name: str) -> int:
    """Return the per-process counter *name* of :mod:`django_scale.metrics` (0 if unset)."""
    value = metrics.snapshot().get(name, 0)
    assert isinstance(value, int)
    return value


def wait_until(condition: Callable[[], T], what: str, timeout: float = 20.0, interval: float = 0.01) -> T:
    """Poll *condition* every *interval* seconds until it returns a true value, and return it.

    Fail with *what* after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value
