"""Fixtures for the real services (the replica, replication lag, Redis, a Celery worker) and Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
from django.conf import settings
from django.core.cache import BaseCache, caches
from django.db import connections
from support import wait_until

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
#: The Chromium the browser tests drive (Debian's; never Playwright's own download).
CHROMIUM = os.environ.get("DJANGO_SCALE_TEST_CHROMIUM", "/usr/bin/chromium")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the services their fixtures need; deselect them on the SQLite backend.

    Deselected, not skipped: on the embedded default these tests are not part of the run,
    while on the services backend a missing service is an error, never a skip.
    """
    for item in items:
        for fixture, marker in SERVICE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    # Slow end-to-end tests (a fresh virtualenv, the demo on its own services) run in the one
    # env of the matrix that asks for them.
    markers = (*SERVICE_MARKERS, "once") if harness.BACKEND == "sqlite" else ("once",)
    if os.environ.get("DJANGO_SCALE_TEST_ONCE") == "1" and harness.BACKEND != "sqlite":
        markers = ()
    # Tests of what goes through a transaction pooler run where the harness starts PgBouncer.
    if harness.BACKEND == "sqlite" or harness.POOLER != "pgbouncer":
        markers = (*markers, "pgbouncer")
    else:
        # Behind PgBouncer, what only a direct connection does is not there to test.
        markers = (*markers, "direct")
    # PostgreSQL 18 from PyPI (the pg18 env) comes without HypoPG, which Debian packages only
    # for the system's PostgreSQL: the advisor's tests without it run there instead.
    if harness.BACKEND == "sqlite" or os.environ.get("DJANGO_SCALE_TEST_NO_HYPOPG") == "1":
        markers = (*markers, "hypopg")
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in markers) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    if harness.BACKEND == "sqlite":
        return ["django-scale services: none (SQLite + local-memory cache)"]
    services = harness.services()
    return [
        f"django-scale services (started in {services.startup_seconds:.2f} s): "
        f"primary :{services.primary.port}, replica :{services.replica.port}, "
        f"replica2 :{services.replica2.port if services.replica2 else '(= replica)'}, redis :{services.redis.port}"
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
        wait_until(
            lambda: self.has_replayed(target), f"the replica replaying {target}", timeout, interval=0.005
        )

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
def _release_pooled_connections(django_db_setup: None) -> Iterator[None]:
    """Through PgBouncer, close its server connections before the test database is dropped.

    The pooler keeps server connections to the test database after the suite's clients have
    gone; DROP DATABASE refuses a database with sessions (DJANGO_SCALE_TEST_POOLER only).
    """
    yield
    if harness.BACKEND == "sqlite" or harness.services().pooler is None:
        return
    connections.close_all()
    # Every test database, not only default's: "legacy" (test_copy_pipe.py) is one more on the
    # primary, which DROP DATABASE refused while PgBouncer held a server connection to it.
    harness.services().pooler.release(*{connection.settings_dict["NAME"] for connection in connections.all()})


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
    none may carry over from the test before. The replica monitors are not reset: they are
    threads shared by the whole run (see ``readmit`` in test_routing.py for a test that
    takes the replica out of rotation and puts it back).
    """
    from django_scale import metrics

    metrics.reset()
    yield


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    """Start and leave each test with none of what django_scale keeps per process.

    That is what a process that has just started has: the cache's (the invalidation journal's
    view, the log-once messages, the breakers), the ``{% swrcache %}`` tag's (which fragments
    rendered per user) and the per-second window that caps reads falling back to the primary.
    """
    from django_scale.cache import reset_state as reset_cache
    from django_scale.replicas.fallback import fallback_window
    from django_scale.templatetags.scale import reset_state as reset_fragments

    def reset() -> None:
        reset_cache()
        reset_fragments()
        fallback_window.ends = 0.0
        fallback_window.reads = fallback_window.fallbacks = 0
        fallback_window.capped = 0

    reset()
    yield
    reset()


@pytest.fixture(autouse=True)
def _no_routing_left_set() -> Iterator[None]:
    """Fail a test that leaves a routing override, state or read capture set in the thread.

    They are context variables: one left set would route the next test's reads. The test
    that left it is the one that fails, and the next starts without it.
    """
    from django_scale.replicas import state

    variables = (state._state, state._forced, state._capture)
    yield
    left = [variable.name for variable in variables if variable.get() is not None]
    for variable in variables:
        variable.set(None)
    assert not left, f"the test left {', '.join(left)} set"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Close this thread's replica connections before each test, before its fixtures run.

    The router reads from a replica whose connection is already open without opening it
    again (``pick_usable``), and opening it is the step where Django refuses an alias a test
    did not declare in ``databases`` (the router then reads from the primary). A connection
    left open by an earlier test that declared the replica (``TestCase`` does not close its
    connections after a test; ``TransactionTestCase`` does) therefore sent a later test's
    unpinned reads to the replica: ``Database queries to 'replica' are not allowed``, or
    rows the standby had not replayed yet. Each test starts as a ``TransactionTestCase``
    does, with the replica's connection closed.
    """
    if harness.BACKEND == "sqlite":
        return
    from django_scale.conf import conf

    for alias in conf.aliases()[1]:
        connection = connections[alias]
        if connection.connection is not None and not connection.in_atomic_block:
            connection.close()


@pytest.fixture
def data(db: None) -> None:
    """The posts, replies, tags and reporters the prefetch tests share (tests/prefetch_data.py)."""
    from prefetch_data import build

    build()


def _browser_unavailable(reason: str) -> NoReturn:
    """Skip, or fail under CI, where a skipped browser test would hide a missing requirement."""
    hint = (
        "The browser tests need the playwright package (pip install -e '.[test]') and "
        f"Chromium at {CHROMIUM} (apt-get install chromium, or set DJANGO_SCALE_TEST_CHROMIUM); "
        "they never download Playwright's own browsers."
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. {hint}", pytrace=False)
    pytest.skip(f"{reason}. {hint}")


@pytest.fixture
def chromium() -> str:
    """The path of Chromium, once playwright is known to be importable (for the browser tests)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _browser_unavailable("playwright is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        _browser_unavailable(f"no Chromium at {CHROMIUM}")
    return CHROMIUM
