"""Replica health never waits on the cache where the monitors share it.

Written from the attacker's side: a Redis that accepts connections and never answers (a tiny
socket server in the test), and one that refuses them, as the cache named by ``CACHE_ALIAS``.
Reads must keep going to the healthy replica, nothing may hang, and a replica ejected by one
process must still be skipped by another while the cache is healthy.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import OperationalError, connections
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings
from support import (
    SilentServer,
    SlowFirstAnswer,
    break_replica_connection,
    counter,
    subprocess_env,
    wait_until,
)

from django_scale.exceptions import ReplicaReadError
from django_scale.replicas import (
    ReplicaMonitor,
    Watchdog,
    monitor,
    parse_lsn,
    routing_state,
)
from django_scale.replicas.guard import ReplicaGuard, guard_connection, watchdog
from django_scale.testing import capture_reads, override_scale_settings
from django_scale.timeouts import is_statement_timeout, statement_timeout

import harness
from testapp.models import Author

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])
TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    """Return a port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HealthCache:
    """The cache the replica monitors share their state in, for one test."""

    #: Its alias in ``CACHES`` (a fresh one per test: each cache alias has its own breaker).
    alias: str
    #: ``replicas.cache_down`` before the test pointed ``CACHE_ALIAS`` at it.
    down_before: int
    #: The silent server behind it, if it hangs.
    server: SilentServer | None = None

    def outages(self) -> int:
        """Return how many outages of the cache the monitors counted since the test began."""
        return counter("replicas.cache_down") - self.down_before


@contextmanager
def health_cache_at(
    port: int, server: SilentServer | None = None, *, monitors: bool = True
) -> Iterator[HealthCache]:
    """Add a django-redis cache at 127.0.0.1:*port* to ``CACHES``, as ``CACHE_ALIAS`` if *monitors*.

    A call on a hung server blocks until ``SOCKET_TIMEOUT``: django-redis sets none by default,
    and redis-py then blocks for good (before 8.0) or gives up after 5 s (8.0 on). The hour
    here stands for "for good", on every redis-py.
    """
    alias = f"replica-health-{port}"
    health = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{port}/0",
        "OPTIONS": {"SOCKET_TIMEOUT": 3600},
    }
    handle = HealthCache(alias, counter("replicas.cache_down"), server)
    scale = {"CACHE_ALIAS": alias} if monitors else {}
    with (
        override_settings(CACHES={**settings.CACHES, alias: health}),
        override_scale_settings(CACHE_RETRY_AFTER=60, **scale),
    ):
        try:
            yield handle
        finally:
            if server is not None and monitors:
                # Let whatever waits on the silent server fail now, before the cache goes away.
                server.close()
                probes = monitor("replica").probes
                wait_until(lambda: monitor("replica").probes >= probes + 2, "the monitor probing on")
            # Every thread shares django-redis's pool for the location: close its sockets
            # (the garbage collector would warn about them).
            from django_redis import get_redis_connection

            get_redis_connection(alias).connection_pool.disconnect()


@pytest.fixture
def hung_cache() -> Iterator[HealthCache]:
    """A Redis that accepts connections and never answers, as ``CACHE_ALIAS``."""
    server = SilentServer()
    try:
        with health_cache_at(server.port, server) as handle:
            yield handle
    finally:
        server.close()


@pytest.fixture
def refused_cache() -> Iterator[HealthCache]:
    """A Redis address that refuses connections, as ``CACHE_ALIAS``."""
    with health_cache_at(_free_port()) as handle:
        yield handle


@pytest.fixture
def readmit(replica: Any) -> Iterator[Any]:
    """The replica, caught up and in rotation; put back in rotation after the test."""
    target = parse_lsn(replica.primary_lsn())
    wait_until(lambda: monitor("replica").is_available(None, target), "the monitor seeing the replay")
    yield replica
    connections["replica"].close()
    monitor("replica").forget_ejection()
    wait_until(lambda: monitor("replica").is_available(), "the replica back in rotation")


def reads_over_probes(pk: int, probes: int = 20, bound: float = 30.0) -> list[dict[str, int]]:
    """Request an author page until the monitor has probed *probes* more times; return each page's reads.

    A read that did not go to the replica fails at once. *bound* only keeps a broken monitor
    (one that stopped probing) from looping for ever.
    """
    item = monitor("replica")
    until = item.probes + probes
    deadline = time.monotonic() + bound
    client = Client()
    seen = []
    while item.probes < until:
        assert time.monotonic() < deadline, f"the monitor probed {item.probes - until + probes} times"
        with capture_reads() as captured, CaptureQueriesContext(connections["replica"]) as on_replica:
            response = client.get(f"/authors/{pk}/")
        assert response.status_code == 200
        body = response.json()
        assert body["found"] is True
        assert body["reads"] == {"replica": 1}, f"read on {body['reads']} after {len(seen)} pages"
        assert captured == {"replica": 1} and len(on_replica) == 1
        seen.append(body["reads"])
        time.sleep(0.01)  # pace the pages between the monitor's probes (the loop waits on the probes)
    return seen


# -- From the attacker's side: the cache hangs or refuses --------------------------------------


@REPLICA
def test_reads_stay_on_the_replica_while_the_shared_cache_hangs(readmit, hung_cache):
    pk = Author.objects.create(name="Barbara").pk
    wait_until(
        lambda: monitor("replica").replay_lsn >= parse_lsn(readmit.primary_lsn()),
        "the monitor seeing the primary's writes",
    )
    cut_before = watchdog.cut_off

    assert reads_over_probes(pk)

    item = monitor("replica")
    assert not item.is_unresponsive() and item.is_available()
    assert watchdog.cut_off == cut_before
    # The monitors did ask the silent server, once: a stuck call is never joined by another.
    assert hung_cache.server is not None and len(hung_cache.server.accepted) == 1
    # Counted (and logged) once per outage, however many probes went by.
    assert hung_cache.outages() == 1


@REPLICA
def test_reads_stay_on_the_replica_while_the_shared_cache_refuses_connections(readmit, refused_cache):
    pk = Author.objects.create(name="Radia").pk
    wait_until(
        lambda: monitor("replica").replay_lsn >= parse_lsn(readmit.primary_lsn()),
        "the monitor seeing the primary's writes",
    )
    cut_before = watchdog.cut_off

    assert reads_over_probes(pk)

    assert monitor("replica").is_available()
    assert watchdog.cut_off == cut_before
    assert refused_cache.outages() == 1


@REPLICA
def test_a_replica_failure_while_the_cache_hangs_holds_no_request(readmit, hung_cache):
    names = sorted(Author.objects.create(name=name).name for name in ("Ken", "Dennis"))
    wait_until(
        lambda: monitor("replica").replay_lsn >= parse_lsn(readmit.primary_lsn()),
        "the monitor seeing the primary's writes",
    )
    outcome: dict[str, Any] = {}

    def request() -> None:
        # Work of its own thread, with connections of its own: its replica connection breaks
        # under it, and the guard reports the failure, which must not wait on the cache.
        try:
            replica = connections["replica"]
            with routing_state():
                assert sorted(Author.objects.values_list("name", flat=True)) == names  # opens it
            break_replica_connection(replica)
            with routing_state() as state, capture_reads() as reads:
                try:
                    list(Author.objects.values_list("name", flat=True))
                except ReplicaReadError as exc:
                    outcome["raised"] = exc.alias
                # Out of rotation in this process: the next read goes to the primary.
                outcome["names"] = sorted(Author.objects.values_list("name", flat=True))
            outcome["reads"], outcome["state"] = dict(reads), dict(state.reads)
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=request, name="request")
    thread.start()
    thread.join(20)
    held = thread.is_alive()
    if held:
        assert hung_cache.server is not None
        hung_cache.server.close()  # let the stuck request go, so that the test can end
        thread.join(20)
    assert not held, "the request waited on the hung cache"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["raised"] == "replica"
    assert outcome["names"] == names
    assert outcome["reads"] == {"replica": 1, "default": 1} and outcome["state"] == outcome["reads"]
    # Ejected in this process, even though the cache could not be told.
    assert not monitor("replica").is_available()


@REPLICA
def test_the_watchdog_survives_a_connection_closed_under_it(replica):
    # The guard closes a broken connection while the watchdog may be about to cut it off:
    # psycopg2's fileno() then raises InterfaceError, which ended the watchdog's thread.
    wrapper = connections["replica"]
    wrapper.ensure_connection()
    wrapper.connection.close()
    try:
        Watchdog()._cut_off(wrapper)
    finally:
        wrapper.close()


def _flagged(connection: Any) -> bool:
    """Whether the watchdog sees a query running on registered *connection* (its flag)."""
    entry = watchdog._guarded.get(id(connection))
    return entry is not None and entry[1]() is connection and entry[2][0]


@REPLICA
def test_the_watchdog_sees_a_query_running_on_a_guarded_connection_from_its_own_thread(replica):
    # The guard adds no entry per query to a dict: the watchdog looks at each registered
    # connection object, which the guard flags while its query runs (from its own thread).
    opened = threading.Event()
    go = threading.Event()
    done = threading.Event()
    found: dict[str, Any] = {}

    def sleep_on_the_replica() -> None:
        try:
            wrapper = found["wrapper"] = connections["replica"]  # this thread's own
            wrapper.ensure_connection()
            found["guarded"] = guard_connection(wrapper)
            opened.set()
            go.wait(20)
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(1)")
        except Exception as exc:  # pragma: no cover - reported below
            found["error"] = exc
        finally:
            opened.set()
            done.set()
            connections.close_all()

    thread = threading.Thread(target=sleep_on_the_replica)
    thread.start()
    try:
        assert opened.wait(20) and "error" not in found, found
        wrapper = found["wrapper"]
        assert found["guarded"]
        assert any(reference() is wrapper for _, reference, _ in watchdog._guarded.values())
        assert not _flagged(wrapper)
        go.set()
        wait_until(lambda: _flagged(wrapper) or done.is_set(), "the query to run")
        assert not done.is_set(), f"the query ended before it was seen running: {found}"
    finally:
        go.set()
        thread.join(20)
    assert "error" not in found, found
    assert not _flagged(wrapper)


@REPLICA
def test_a_watched_query_on_a_guarded_connection_is_one_entry_for_the_watchdog(replica):
    # The health check's SELECT 1 is watched on a connection its guard registered: one entry,
    # the guard's flag, so that a frozen replica's check is cut off (and counted) once.
    wrapper = connections["replica"]
    wrapper.ensure_connection()
    assert guard_connection(wrapper)
    ticket = watchdog.watch("replica", wrapper)
    try:
        assert _flagged(wrapper)
        assert id(wrapper) not in watchdog._inflight
    finally:
        watchdog.unwatch(ticket)
    assert not _flagged(wrapper)


@REPLICA
def test_a_guard_made_without_a_connection_watches_each_query(replica):
    wrapper = connections["replica"]
    seen: list[bool] = []

    def inside(execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        # Watched: an entry of its own, or the flag of a connection a guard registered.
        seen.append(id(wrapper) in watchdog._inflight or _flagged(wrapper))
        return execute(sql, params, many, context)

    with (
        wrapper.execute_wrapper(ReplicaGuard("replica")),
        wrapper.execute_wrapper(inside),
        wrapper.cursor() as cursor,
    ):
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    assert seen == [True]
    assert id(wrapper) not in watchdog._inflight and not _flagged(wrapper)


def test_the_watchdog_stays_awake_between_queries_and_naps_once_idle():
    # Waking the watchdog is a system call in the query's thread: a process that queries a
    # replica now and then keeps it looking, so that its next query need not wake it.
    dog = Watchdog()
    dog.tick = 0.02
    dog.naps_after = 10**6
    dog.unwatch(dog.watch("replica", object()))  # a query: it wakes the thread
    assert dog._awake and dog._thread is not None and dog._thread.is_alive()
    time.sleep(10 * dog.tick)  # looks with no query in flight
    assert dog._awake, "the watchdog napped between two queries"
    dog.naps_after = 1
    wait_until(lambda: not dog._awake, "the idle watchdog to nap", timeout=10)
    dog.unwatch(dog.watch("replica", object()))  # the next query wakes it again
    assert dog._awake
    wait_until(lambda: not dog._awake, "the watchdog to nap again", timeout=10)


# -- The shared state, with a healthy Redis ------------------------------------------------------


@REPLICA
def test_a_replica_ejected_by_another_process_is_skipped_here(readmit, redis_cache):
    code = (
        "import django; django.setup()\n"
        "from django_scale.replicas import monitor, shared_health\n"
        "monitor('replica').report_failure('ejected by the other process')\n"
        "assert shared_health().flush(10), 'the ejection was not written'\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=subprocess_env(),
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    item = monitor("replica")
    wait_until(lambda: item.is_unresponsive(), "the other process's ejection seen here")
    assert not item.is_available()
    with capture_reads() as reads:
        list(Author.objects.all())
    assert reads == {"default": 1}


# -- SharedHealth on its own (both backends: the cache here is the test's socket server) ---------


def test_a_hung_cache_is_waited_for_briefly_once_then_skipped():
    from django_scale.replicas import SharedHealth

    server = SilentServer()
    try:
        # A SharedHealth of the test's own: the monitors keep sharing through the suite's cache.
        with health_cache_at(server.port, server, monitors=False) as health:
            sharing = SharedHealth(health.alias)
            ticket = sharing.request("replica")
            assert ticket is not None
            # Not answered in time. The first call may still be connecting: not an outage yet.
            assert sharing.wait(ticket, 0.2) is False
            assert health.outages() == 0
            # Past the first call's grace, the cache is skipped (tripped once).
            wait_until(
                lambda: sharing.request("replica") is None, "the first call's grace passing", timeout=10
            )
            for _ in range(50):
                # Skipped now: no wait, no new call, nothing known.
                assert sharing.request("replica") is None
            sharing.publish("replica", time.time() + 5)  # queued behind the stuck call, no wait
            assert sharing.down_until("replica") > time.time()
            wait_until(lambda: len(server.accepted) == 1, "the worker connecting")
            assert health.outages() == 1
            server.close()
            # The stuck call fails once the server is gone; the cache stays skipped until
            # CACHE_RETRY_AFTER, and nothing piled up meanwhile.
            wait_until(lambda: not sharing.in_flight(), "the stuck call ending")
            assert len(server.accepted) == 1
            assert sharing.request("replica") is None
    finally:
        server.close()


@pytest.mark.redis
def test_a_slow_first_answer_of_a_healthy_cache_is_no_outage():
    """The first call connects and loads the client: on a busy host it may miss ``timeout``."""
    from django_scale.replicas import SharedHealth

    relay = SlowFirstAnswer(harness.services().redis.port, delay=0.4)
    try:
        with health_cache_at(relay.port, monitors=False) as health:
            sharing = SharedHealth(health.alias)
            assert sharing.first_call_grace > 0.4 > sharing.timeout
            ticket = sharing.request("replica")
            assert ticket is not None
            assert sharing.wait(ticket, sharing.timeout) is False  # late, as the monitor sees it
            wait_until(lambda: not sharing.in_flight(), "the first answer")
            # Answered within the grace: no outage, and the next read is asked for and answered.
            ticket = sharing.request("replica")
            assert ticket is not None and sharing.wait(ticket, 10) is True
            assert health.outages() == 0
    finally:
        relay.close()


def test_shared_state_round_trips_through_a_healthy_cache():
    from django_scale.replicas import SharedHealth, shared_health

    sharing = shared_health()
    until = time.time() + 30
    sharing.publish("elsewhere", until)
    assert sharing.flush(10)
    # A fresh reader (as another process would be) sees the write, through the cache alone.
    other = SharedHealth(sharing.alias)
    ticket = other.request("elsewhere")
    assert ticket is not None and other.wait(ticket, 10)
    assert other.down_until("elsewhere") == pytest.approx(until)
    sharing.clear("elsewhere")
    assert sharing.flush(10)
    ticket = other.request("elsewhere")
    assert ticket is not None and other.wait(ticket, 10)
    assert other.down_until("elsewhere") == 0.0


# -- A failed replica read runs the request again, through Django's public hooks -------------


class _RecoveryConflict(Exception):
    """A driver error as psycopg reports a query cancelled by a recovery conflict."""

    sqlstate = "40001"


def _conflict_once(failed: list[str]) -> Callable[..., Any]:
    """Return an execute wrapper that fails the first query like a recovery conflict, into *failed*."""

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if not failed:
            failed.append(sql)
            raise OperationalError(
                "canceling statement due to conflict with recovery"
            ) from _RecoveryConflict()
        return execute(sql, params, many, context)

    return wrapper


@contextmanager
def conflict_once_on_the_replica(failed: list[str]) -> Iterator[None]:
    """Fail the next query on this thread's replica connection like a recovery conflict.

    The replica connection is opened and guarded first, so that the simulated failure comes
    from inside the guard, as the server's would.
    """
    replica = connections["replica"]
    replica.ensure_connection()
    assert guard_connection(replica)
    with replica.execute_wrapper(_conflict_once(failed)):
        yield


def _recording(seen: list[str]) -> Callable[..., Any]:
    def on_primary(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    return on_primary


@pytest.fixture
def caught_up_author(readmit: Any) -> int:
    """An author's pk, replayed on the replica and seen there by the monitor."""
    pk = Author.objects.create(name="Grace").pk
    target = parse_lsn(readmit.primary_lsn())
    wait_until(lambda: monitor("replica").replay_lsn >= target, "the monitor seeing the primary's writes")
    return pk


@REPLICA
def test_a_get_whose_replica_read_failed_runs_again_on_the_primary_in_its_capture_and_wrappers(
    caught_up_author,
):
    seen: list[str] = []
    failed: list[str] = []
    with (
        conflict_once_on_the_replica(failed),
        connections["default"].execute_wrapper(_recording(seen)),
        CaptureQueriesContext(connections["default"]) as captured,
        capture_reads() as reads,
    ):
        response = Client().get(f"/authors/{caught_up_author}/")
    assert response.status_code == 200
    body = response.json()
    assert body["found"] is True and body["reads"] == {"default": 1} and body["wrote"] is False
    assert len(failed) == 1 and '"testapp_author"' in failed[0]
    # The same SQL ran again on the primary, an ordinary query of its own: through the
    # primary's execute wrappers and into its query log.
    assert seen == failed
    assert len(captured) == 1
    assert captured[0]["sql"].startswith('SELECT 1 AS "a" FROM "testapp_author"')
    assert reads == {"replica": 1, "default": 1}
    # A recovery conflict is no failure of the replica: it stays in rotation.
    assert monitor("replica").is_available()


@REPLICA
def test_a_post_whose_replica_read_failed_is_never_run_again(caught_up_author):
    seen: list[str] = []
    failed: list[str] = []
    with (
        # Without PRIMARY_METHODS' pin, which keeps a POST's reads off the replicas.
        override_scale_settings(PRIMARY_METHODS=()),
        conflict_once_on_the_replica(failed),
        connections["default"].execute_wrapper(_recording(seen)),
        pytest.raises(ReplicaReadError) as raised,
    ):
        # The view only reads, but a POST is not safe to repeat: the error is the response.
        Client().post(f"/authors/{caught_up_author}/")
    assert raised.value.alias == "replica"
    # The view's query never ran on the primary. (Django 4.2's error report may run others
    # there: it shows the frames' local querysets, which repr() evaluates.)
    assert len(failed) == 1 and failed[0] not in seen


@REPLICA
def test_a_post_reads_on_the_primary_so_a_failing_replica_cannot_fail_it(caught_up_author):
    failed: list[str] = []
    with conflict_once_on_the_replica(failed), capture_reads() as reads:
        response = Client().post(f"/authors/{caught_up_author}/")
    assert response.status_code == 200
    assert response.json()["found"] is True
    assert reads == {"default": 1}
    assert failed == []  # the armed failure never fired: nothing ran on the replica


@REPLICA
def test_a_second_run_reads_on_the_primary_under_the_primarys_statement_timeout(caught_up_author):
    with (
        conflict_once_on_the_replica([]),
        statement_timeout(0.05, using="default"),
        pytest.raises(OperationalError) as raised,
    ):
        Client().get("/authors/sleepy/?sleep=1")
    assert is_statement_timeout(raised.value)
    assert not isinstance(raised.value, ReplicaReadError)


@REPLICA
def test_nothing_of_a_failed_run_is_cached(caught_up_author, redis_cache):
    Author.objects.create(name="Paged")
    target = parse_lsn(_primary_lsn())
    wait_until(lambda: monitor("replica").replay_lsn >= target, "the monitor seeing the primary's writes")
    client = Client()
    with conflict_once_on_the_replica([]):
        # The view swallows the failed read and renders a degraded page: the first run's
        # page, which must neither be served nor stored.
        first = client.get("/swr/replica/")
    assert first.status_code == 200
    assert first.json() == {"found": True, "reads": {"default": 1}}
    with capture_reads() as reads:
        second = client.get("/swr/replica/")
    assert second.json() == {"found": True, "reads": {"default": 1}}  # the second run's page
    assert reads == {}  # from the cache


def _primary_lsn() -> str:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()::text")
        return str(cursor.fetchone()[0])


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "custom_backend"])
def test_the_monitor_connects_through_the_backend_of_its_alias():
    from custom_backend.base import DatabaseWrapper

    opened = len(DatabaseWrapper.opened)
    item = ReplicaMonitor("custom_backend")
    try:
        item.probe()
        assert item.error == ""
        assert item.lag is not None
        # Its own connection, opened by the backend's get_new_connection() and set up by its
        # init_connection_state(), with the monitor's connect timeout.
        assert len(DatabaseWrapper.opened) == opened + 1
        assert DatabaseWrapper.opened[-1]["connect_timeout"] == 2
        assert isinstance(item._connection, DatabaseWrapper)
        assert item._connection is not connections["custom_backend"]
        with item._connection.connection.cursor() as cursor:
            cursor.execute("SHOW application_name")
            assert cursor.fetchone()[0] == "django-scale-custom-backend"
        # Another thread may close it (stop() does, from the caller's).
        closer = threading.Thread(target=item.stop)
        closer.start()
        closer.join(10)
        assert item._connection is None
    finally:
        item.stop()
