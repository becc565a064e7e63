"""Fixtures for the real services: the replica, replication lag, Redis and a Celery worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import BaseCache, caches
from django.db import connections

from django_scale.testing import pause_replay, resume_replay

import harness

#: Fixtures that need a service, and the marker (service) each one implies.
SERVICE_FIXTURES = {
    "replica": "postgres",
    "paused_replica": "postgres",
    "redis_cache": "redis",
    "celery_worker": "celery",
}
SERVICE_MARKERS = ("postgres", "redis", "celery")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the services their fixtures need; deselect them on the SQLite backend.

    Deselected, not skipped: on the embedded default these tests are not part of the run,
    while on the services backend a missing service is an error, never a skip.
    """
    for item in items:
        for fixture, marker in SERVICE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    if harness.BACKEND != "sqlite":
        return
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in SERVICE_MARKERS) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    if harness.BACKEND == "sqlite":
        return ["django-scale services: none (SQLite + local-memory cache)"]
    services = harness.services()
    return [
        f"django-scale services (started in {services.startup_seconds:.2f} s): "
        f"primary :{services.primary.port}, replica :{services.replica.port}, redis :{services.redis.port}"
    ]


class Replica:
    """The ``replica`` alias on the real hot standby, with ways to wait for and stop replay."""

    alias = "replica"
    primary_alias = "default"

    def _value(self, alias: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with connections[alias].cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]

    def primary_lsn(self) -> str:
        """Return the primary's current WAL write position."""
        return str(self._value(self.primary_alias, "SELECT pg_current_wal_lsn()"))

    def replay_lsn(self) -> str:
        """Return the WAL position the standby has replayed up to."""
        return str(self._value(self.alias, "SELECT pg_last_wal_replay_lsn()"))

    def has_replayed(self, lsn: str) -> bool:
        return bool(self._value(self.alias, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)))

    def wait_for_replay(self, timeout: float = 10.0) -> None:
        """Wait until the standby has replayed everything the primary has written so far."""
        target = self.primary_lsn()
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self.has_replayed(target):
            if time.monotonic() > deadline:
                raise AssertionError(f"the replica did not replay {target} within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def is_paused(self) -> bool:
        return self._value(self.alias, "SELECT pg_get_wal_replay_pause_state()") == "paused"

    def pause(self) -> None:
        """Stop replaying WAL on the standby, so writes on the primary stay invisible there."""
        pause_replay(self.alias)

    def resume(self) -> None:
        resume_replay(self.alias)


@pytest.fixture
def replica(transactional_db: None) -> Iterator[Replica]:
    """The ``replica`` alias on the real standby.

    The test needs ``@pytest.mark.django_db(transaction=True, databases=["default", "replica"])``:
    only committed rows reach a replica.
    """
    handle = Replica()
    handle.wait_for_replay()
    yield handle


@pytest.fixture
def paused_replica(replica: Replica) -> Iterator[Replica]:
    """The replica with WAL replay paused: replication lag on demand, resumed after the test."""
    replica.pause()
    try:
        yield replica
    finally:
        replica.resume()
        replica.wait_for_replay()


@pytest.fixture
def redis_cache() -> Iterator[BaseCache]:
    """The default cache, a django-redis cache on the real Redis, empty before and after."""
    cache = caches["default"]
    assert type(cache).__module__.startswith("django_redis"), f"not a django-redis cache: {cache!r}"
    cache.clear()
    yield cache
    cache.clear()


@pytest.fixture(scope="session", autouse=True)
def _close_redis_connections() -> Iterator[None]:
    """Close the django-redis pools at the end of the run.

    Sockets left to the garbage collector raise ``ResourceWarning`` under ``PYTHONDEVMODE``,
    which the suite turns into errors.
    """
    yield
    if harness.BACKEND == "sqlite":
        return
    from django_redis import get_redis_connection

    for alias in settings.CACHES:
        get_redis_connection(alias).connection_pool.disconnect()


@pytest.fixture(scope="session", autouse=True)
def _stop_replica_monitors(django_db_setup: None) -> Iterator[None]:
    """Stop the replica monitors before the test database is dropped (they are connected to it)."""
    yield
    from django_scale.replicas import stop_monitors

    stop_monitors()


@pytest.fixture(scope="session")
def celery_app() -> Iterator[Any]:
    from celery_app import app

    yield app
    # The result backend is shared by all threads (result_backend_thread_safe), so the one
    # the worker thread used is this one: close its Pub/Sub and pool rather than leaving the
    # sockets to the garbage collector.
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()
    client = getattr(backend, "client", None)
    if client is not None:
        client.connection_pool.disconnect()
    app.pool.force_close_all()


@pytest.fixture(scope="session")
def celery_worker(celery_app: Any) -> Iterator[Any]:
    """A real Celery worker in the test process, consuming from the Redis broker."""
    from celery.contrib.testing.worker import start_worker

    # start_worker pings the worker through the broker with this task before yielding.
    celery_app.loader.import_module("celery.contrib.testing.tasks")
    with start_worker(celery_app, pool="solo", perform_ping_check=True, shutdown_timeout=30) as worker:
        yield worker


@pytest.fixture(autouse=True)
def _fresh_language_and_time_zone() -> Iterator[None]:
    """Start and leave each test with no language or time zone activated in the thread.

    LocaleMiddleware and views that call ``timezone.activate()`` leave theirs active in the
    thread after a test-client request (as in a real server, where the next request's
    middleware activates its own). Cache keys include the active language, so a test that
    computes a key by hand must not see the previous test's.
    """
    from django.utils import timezone, translation

    translation.deactivate()
    timezone.deactivate()
    yield
    translation.deactivate()
    timezone.deactivate()


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    """Start each test with every counter and timing of :mod:`django_scale.metrics` at zero.

    A test reads counters as absolute numbers (``counter("swr.refill.succeeded") == 1``), so
    none may carry over from the test before. Feature state kept per process (the caches'
    breakers, the replica monitors) is reset by the fixtures of the tests that use it.
    """
    from django_scale import metrics

    metrics.reset()
    yield
