"""Helpers for the test suites of projects that use django-scale."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connections
from django.test.utils import TestContextDecorator, override_settings

from django_scale.conf import conf
from django_scale.prefetch import Detector, detect_n_plus_one
from django_scale.replicas.state import _capture
from django_scale.routers import connections_changed

__all__ = [
    "capture_reads",
    "forbid_n_plus_one",
    "override_scale_settings",
    "pause_replay",
    "resume_replay",
    "share_primary_connection",
    "simulate_lag",
]


class override_scale_settings(override_settings):  # noqa: N801 - named like override_settings
    """Override some ``DJANGO_SCALE`` keys, keeping the others the project set.

    Use it like :func:`django.test.override_settings`: as a decorator on a test function or
    class, or as a context manager. The merge happens when it is entered, so it stacks with
    other overrides made before it.
    """

    def __init__(self, **keys: Any) -> None:
        self.scale_keys = keys
        super().__init__()

    def enable(self) -> None:
        merged = {**conf.user_settings(), **self.scale_keys}
        self.options = {"DJANGO_SCALE": merged}
        super().enable()

    def decorate_class(self, cls: type) -> type:
        # override_settings freezes its options onto a SimpleTestCase subclass when the class
        # is decorated, before there is anything to merge with; enter per test instead.
        return TestContextDecorator.decorate_class(self, cls)


@contextmanager
def capture_reads() -> Iterator[Counter[str]]:
    """Count, per database alias, where :class:`~django_scale.routers.ReplicaRouter` sent reads.

    ::

        with capture_reads() as reads:
            client.get("/articles/")
        assert reads == {"replica": 3}

    It counts routing decisions made in this context and the requests and ``sync_to_async``
    calls it starts, including those of Django's test clients.
    """
    counter: Counter[str] = Counter()
    token = _capture.set(counter)
    try:
        yield counter
    finally:
        _capture.reset(token)


class share_primary_connection(TestContextDecorator):  # noqa: N801 - used like override_settings
    """Make every replica alias use the primary's connection, so ``TestCase`` data is visible.

    Inside Django's ``TestCase`` each test runs in a transaction that is never committed, so a
    replica on a connection of its own cannot see the test's rows (Django ticket #23718), and
    :class:`~django_scale.routers.ReplicaRouter` sends such reads to the primary. With this
    decorator the replica aliases share the primary's connection: routing decisions are made
    as in production and the reads see the test's data. Use ``TransactionTestCase`` and a
    real replica to test replication itself.
    """

    def __init__(self, *aliases: str) -> None:
        self.aliases = aliases
        self.saved: dict[str, Any] = {}
        super().__init__()

    def enable(self) -> None:
        primary = connections[conf.PRIMARY]
        for alias in self.aliases or conf.REPLICAS:
            self.saved[alias] = connections[alias]
            connections[alias] = primary
        connections_changed()

    def disable(self) -> None:
        for alias, connection in self.saved.items():
            connections[alias] = connection
        self.saved = {}
        connections_changed()


class forbid_n_plus_one(TestContextDecorator):  # noqa: N801 - used like override_settings
    """Fail the block (or the decorated test) on an N+1 query or an unused eager load.

    ::

        def test_front_page(client):
            with forbid_n_plus_one():
                client.get("/")

    It is :func:`django_scale.prefetch.detect_n_plus_one` with ``mode="raise"``: the
    :exc:`~django_scale.exceptions.NPlusOneError` names the model, the relation and the line.
    A single object never counts as an N+1. Pass ``unused_eager=False`` to allow eager loads
    that no row reads.
    """

    def __init__(self, *, unused_eager: bool = True) -> None:
        self.unused_eager = unused_eager
        self._scopes: list[Any] = []
        super().__init__()

    def enable(self) -> Detector:
        scope = detect_n_plus_one("raise", unused_eager=self.unused_eager)
        detector = scope.__enter__()
        self._scopes.append(scope)
        return detector

    def disable(self) -> None:
        self._scopes.pop().__exit__(None, None, None)


def pause_replay(alias: str, timeout: float = 10.0) -> None:
    """Stop WAL replay on the real PostgreSQL standby *alias*, and wait until it has stopped.

    Needs a superuser (or ``pg_wal_replay_pause`` granted) on the standby.
    """
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout
        while True:
            cursor.execute("SELECT pg_get_wal_replay_pause_state()")
            if cursor.fetchone()[0] == "paused":
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"replay on {alias!r} did not pause within {timeout:g} s")
            time.sleep(0.005)


def resume_replay(alias: str) -> None:
    """Resume WAL replay on the standby *alias* (it catches up on its own)."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_wal_replay_resume()")


@contextmanager
def simulate_lag(alias: str) -> Iterator[None]:
    """Pause WAL replay on the real PostgreSQL standby *alias* for the block: real replication lag.

    Writes made on the primary inside the block stay invisible on the standby until the block
    ends. Needs a superuser (or ``pg_wal_replay_pause`` granted) on the standby.
    """
    pause_replay(alias)
    try:
        yield
    finally:
        resume_replay(alias)
