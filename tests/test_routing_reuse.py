"""What the router keeps from one request to the next: a thread's connection objects and its last decision.

Each test attacks the reuse: the kept decision or connection object must never hand out a
replica that a fresh look would refuse, nor the wrong connection object.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import DatabaseError, connections, router, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from support import wait_until

from django_scale.conf import conf
from django_scale.replicas import monitor, parse_lsn, routing_state, stop_monitors, use_primary
from django_scale.replicas.monitors import route_generation
from django_scale.routers import ReplicaRouter
from django_scale.testing import (
    capture_reads,
    override_scale_settings,
    share_primary_connection,
    simulate_lag,
)

from testapp.models import Author

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


@pytest.fixture
def author(replica: Any) -> Iterator[int]:
    """An author's key, replayed on the replica and seen by the monitor; the replica in rotation after."""
    pk = Author.objects.create(name="Hamming").pk
    target = parse_lsn(replica.primary_lsn())
    replica.wait_for_replay()
    wait_until(lambda: monitor("replica").is_available(None, target), "the monitor seeing the replay")
    yield pk
    connections["replica"].close()
    monitor("replica").forget_ejection()
    wait_until(lambda: monitor("replica").is_available(), "the replica back in rotation")


def _reads(client: Client, pk: int) -> dict[str, int]:
    response = client.get(f"/authors/{pk}/")
    assert response.status_code == 200 and response.json()["found"]
    return response.json()["reads"]


@REPLICA
def test_an_ejection_between_two_requests_sends_the_next_one_to_the_primary(author: int) -> None:
    client = Client()
    assert _reads(client, author) == {"replica": 1}
    assert _reads(client, author) == {"replica": 1}  # the thread's decision, taken over
    monitor("replica").report_failure("ejected between two requests")
    assert _reads(client, author) == {"default": 1}
    monitor("replica").forget_ejection()
    wait_until(lambda: monitor("replica").is_available(), "the replica back in rotation")
    assert _reads(client, author) == {"replica": 1}


@REPLICA
def test_a_replica_that_lags_behind_since_the_last_request_gets_no_read(author: int) -> None:
    client = Client()
    with override_scale_settings(MAX_REPLICA_LAG=0.3):
        assert _reads(client, author) == {"replica": 1}
        assert _reads(client, author) == {"replica": 1}
        with simulate_lag("replica"):
            Author.objects.create(name="lag maker")
            wait_until(lambda: not monitor("replica").is_available(), "ejection for lag")
            # The monitor learnt it by a probe since the last request: no decision outlives that.
            assert _reads(client, author) == {"default": 1}
        wait_until(lambda: monitor("replica").is_available(), "re-admission after replay resumed")
        assert _reads(client, author) == {"replica": 1}


@REPLICA
def test_a_replica_connection_with_an_error_is_reopened_before_the_next_request_reads(author: int) -> None:
    client = Client()
    assert _reads(client, author) == {"replica": 1}
    replica = connections["replica"]
    broken = replica.connection
    # A query of the caller's failed on it: Django marks the connection (errors_occurred).
    with pytest.raises(DatabaseError), replica.cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table")
    assert replica.errors_occurred
    assert _reads(client, author) == {"replica": 1}
    # Closed and opened again by the router before the read, not reused as it was.
    assert replica.connection is not None and replica.connection is not broken
    assert not replica.errors_occurred


@REPLICA
def test_a_held_decision_yields_to_a_forced_route_a_transaction_a_foreign_hint_and_a_pin(author: int) -> None:
    # Each read below would take the router's fast path (the thread's last decision holds)
    # if it did not look at what the request's state, the context and the connections say.
    client = Client()
    assert _reads(client, author) == {"replica": 1}  # the thread's decision, now held
    replica_router = ReplicaRouter()
    stranger = Author(name="elsewhere")
    stranger._state.db = "legacy"
    with routing_state() as state:
        assert state._hot is conf.hot()  # as ScaleMiddleware's state carries it
        assert router.db_for_read(Author) == "replica"
        with use_primary():
            assert router.db_for_read(Author) == "default"
        with transaction.atomic(using="default"):
            assert router.db_for_read(Author) == "default"
        with transaction.atomic(using="replica"):
            assert router.db_for_read(Author) == "default"
        assert replica_router.db_for_read(Author, instance=stranger) is None
        assert router.db_for_read(Author) == "replica"
        state.pin("the test says so")
        assert router.db_for_read(Author) == "default"
        assert state.reads == {"replica": 2, "default": 4}


@REPLICA
def test_a_unit_of_work_outside_a_request_takes_the_threads_decision_over(
    author: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # routing_state() (a Celery task, a management command) carries the settings the router
    # compares with the thread's last decision, as a request's state does: its first read
    # takes the held decision over on the router's short path, which never asks _holds().
    import django_scale.routers as routers

    client = Client()
    assert _reads(client, author) == {"replica": 1}  # the thread's decision, now held
    asked: list[object] = []
    real = routers._holds
    monkeypatch.setattr(routers, "_holds", lambda *args: asked.append(args) or real(*args))
    with routing_state() as state:
        assert router.db_for_read(Author) == "replica"
        assert router.db_for_read(Author) == "replica"
    assert asked == []
    assert state.reads == {"replica": 2}


@REPLICA
def test_a_users_task_never_takes_over_a_decision_held_from_another_users_request(
    author: int, replica: Any
) -> None:
    # Two users. B's request leaves the thread holding a replica decision; A's task carries
    # A's write position, which the replica has not replayed (its replay paused). Now that a
    # task's state takes the router's short path, that path must still send A's read to the
    # primary, never to the replica that lacks A's write.
    client = Client()
    assert _reads(client, author) == {"replica": 1}  # user B: the thread's decision, held
    with simulate_lag("replica"):
        pk = Author.objects.create(name="user A's write").pk
        position = parse_lsn(replica.primary_lsn())
        assert monitor("replica").replay_lsn < position
        with routing_state(position) as state:
            assert state._hot is conf.hot()
            assert Author.objects.filter(pk=pk).exists()
            assert Author.objects.filter(pk=pk).exists()
    assert state.reads == {"default": 2}


@REPLICA
def test_a_closed_replica_connection_is_opened_by_the_router_and_guarded(author: int) -> None:
    client = Client()
    assert _reads(client, author) == {"replica": 1}
    replica = connections["replica"]
    replica.close()
    with routing_state() as state:
        assert router.db_for_read(Author) == "replica"
        # Opened by the decision itself, before any query: a refused connection would have
        # sent the read elsewhere instead of failing it.
        assert replica.connection is not None
    assert state.reads == {"replica": 1}
    assert [type(wrapper).__name__ for wrapper in replica.execute_wrappers] == ["ReplicaGuard"]


@REPLICA
def test_a_replaced_connection_object_is_used_once_share_primary_connection_is_entered(author: int) -> None:
    with routing_state(), CaptureQueriesContext(connections["replica"]) as on_replica:
        assert Author.objects.filter(pk=author).exists()
    assert len(on_replica) == 1
    replaced = connections["replica"]
    replaced.close()
    # The replica alias now names the primary's connection object: the router, which looked
    # the replica's object up in this thread already, must check the new one.
    with share_primary_connection():
        with (
            routing_state(),
            capture_reads() as reads,
            CaptureQueriesContext(connections["default"]) as shared,
        ):
            assert Author.objects.filter(pk=author).exists()
        assert reads == {"replica": 1}
        assert len(shared) == 1
        # Not the object it had looked up before, which stays closed.
        assert replaced.connection is None
    # And the replica's own object again once it is left.
    with routing_state(), CaptureQueriesContext(connections["replica"]) as on_replica:
        assert Author.objects.filter(pk=author).exists()
    assert len(on_replica) == 1 and connections["replica"] is not connections["default"]


@REPLICA
def test_under_a_running_event_loop_the_contexts_own_connection_object_is_checked(
    author: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Code that runs the ORM on an event loop (allowed by this setting): there asgiref keeps
    # connection objects per context, not per thread, so the thread's objects must not serve.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with routing_state():
        assert Author.objects.filter(pk=author).exists()
    outer = connections["replica"]
    assert outer.connection is not None

    async def route() -> tuple[str | None, bool, bool]:
        replica = connections["replica"]
        try:
            with routing_state():
                alias = router.db_for_read(Author)
            return alias, replica is not outer, replica.connection is not None
        finally:
            replica.close()

    alias, own_object, opened = asyncio.run(route())
    # The context's own replica connection was checked, and so opened, by the decision.
    assert (alias, own_object, opened) == ("replica", True, True)


@REPLICA
def test_monitors_replaced_since_the_last_request_are_the_ones_asked(author: int) -> None:
    """``stop_monitors()`` replaces the monitors: the thread's kept route and decision hold the
    stopped ones, whose state never changes again, and must not answer for the new ones."""
    client = Client()
    assert _reads(client, author) == {"replica": 1}
    assert _reads(client, author) == {"replica": 1}  # the thread's decision, taken over
    stop_monitors()
    fresh = monitor("replica")
    assert fresh.probes == 0
    assert _reads(client, author) == {"replica": 1}
    # The read asked the new monitor (which probed before answering), not the stopped one.
    assert fresh.probes >= 1


def test_a_forked_child_looks_its_routes_up_again() -> None:
    """A forked worker inherits the forking thread's kept route (a threading.local survives the
    fork), with the parent's monitors, whose threads the child does not have."""
    before = route_generation[0]
    reader, writer = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads (the suite's monitors) may
        # deadlock; the child only writes to a pipe and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report its generation, and leave without running pytest's exit
        os.write(writer, str(route_generation[0]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child = int(pipe.read())
    os.waitpid(pid, 0)
    assert child == before + 1
    assert route_generation[0] == before
