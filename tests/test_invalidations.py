"""Tests of django_scale.invalidations: an invalidation made while the cache is down outlives
the process that made it, stays bounded, and is replayed before anything is served.

These run on both backends, on a cache that processes share and that a test can make
unreachable: Django's file-based cache, whose directory is swapped for a plain file (every
read and write then raises, as against a dead server, and the old entries come back with the
directory). The journal is on the suite's database: PostgreSQL, or SQLite on the embedded
default. "A process exits" is ``reset_state()``, which forgets everything a process keeps in
memory; tests/test_cache.py makes the same attack on the real Redis with a real process that
exits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import caches
from django.db import connection, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test.utils import CaptureQueriesContext, override_settings
from support import counter

from django_scale import metrics
from django_scale.cache import invalidations, reset_state, wait_for_refills
from django_scale.cache.degrade import breakers
from django_scale.cache.invalidations import Pending, group_of, pending_in_memory
from django_scale.cache.keys import build_key
from django_scale.cache.publisher import publisher
from django_scale.models import PendingInvalidation
from django_scale.testing import override_scale_settings

from testapp import cached
from testapp.cached import probe
from testapp.models import Author

ALIAS = "swr-files"
JOURNAL_TABLE = "django_scale_pending_invalidation"


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    probe.reset()
    metrics.reset()
    reset_state()
    yield
    reset_state()


@pytest.fixture
def shared_cache(tmp_path: Path) -> Iterator[Callable[[bool], None]]:
    """A file-based cache as ``CACHE_ALIAS``; yields ``set_running(bool)`` to take it down and back.

    Down, its directory is moved aside and a plain file takes its place; back, the directory
    returns with the entries it had, as a restarted Redis returns with its append-only file.
    """
    directory = tmp_path / "cache"
    aside = tmp_path / "cache-while-down"
    directory.mkdir()

    def set_running(running: bool) -> None:
        if running:
            directory.unlink()
            aside.rename(directory)
        else:
            directory.rename(aside)
            directory.write_text("the cache is down")

    files = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(directory)}
    with (
        override_settings(CACHES={**settings.CACHES, ALIAS: files}),
        override_scale_settings(CACHE_ALIAS=ALIAS),
    ):
        yield set_running


def journal_queries(queries: CaptureQueriesContext) -> list[str]:
    return [query["sql"] for query in queries.captured_queries if JOURNAL_TABLE in query["sql"]]


def journal() -> list[tuple[str, str]]:
    """The journal's rows as ``(group, key)``."""
    return list(PendingInvalidation.objects.order_by("pk").values_list("group", "key"))


def close_the_publishers_connection() -> None:
    """Close the connection the refill publisher's thread opened, so that none outlives the test.

    The journal check closes a connection it opened, but SQLite's ``close()`` keeps an
    in-memory database open; a later test that may not use the database would then find it on
    that thread. ``BaseDatabaseWrapper.close`` closes the thread's own connection; the test
    database lives on in the test thread's.
    """
    publisher.submit(lambda: BaseDatabaseWrapper.close(connections["default"]))
    assert wait_for_refills()


def refuse_writes() -> Callable[[], None]:
    """Make the current transaction (PostgreSQL) or connection (SQLite) refuse writes; return an undo."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA query_only = ON")
        else:
            cursor.execute("SET TRANSACTION READ ONLY")

    def undo() -> None:
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA query_only = OFF")

    return undo


# -- the attack: a process invalidates while the cache is down, then exits ---------------------------


@pytest.mark.django_db(transaction=True)
def test_an_invalidation_made_while_the_cache_is_down_outlives_the_process(
    shared_cache: Callable[[bool], None],
) -> None:
    assert cached.outage(1) == "v1:1"
    shared_cache(False)
    probe.data = "v2"  # the data changes, and the code that changed it invalidates
    cached.outage.invalidate(1)
    shared_cache(True)
    # The cache is back with the old entry in it.
    assert caches[ALIAS].get(cached.outage.key(1)) is not None
    reset_state()  # the process that invalidated exits; its successor starts with nothing
    assert [cached.outage(1) for _ in range(3)] == ["v2:1"] * 3
    assert probe.count("outage") == 2
    assert journal() == []
    assert counter("swr.invalidation.replayed") == 1


@pytest.mark.django_db(transaction=True)
def test_a_running_process_checks_the_journal_again_after_the_interval(
    shared_cache: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process that never saw the outage: it checked the journal on its first read, before.
    monkeypatch.setattr(invalidations, "CHECK_INTERVAL", 0.0)  # the interval has passed
    assert cached.outage(1) == "v1:1"
    key = cached.outage.key(1)
    # Meanwhile another process, with the cache down, journaled an invalidation and exited.
    PendingInvalidation.objects.create(alias=ALIAS, group=group_of(key), key=key, keep_for=86400)
    probe.data = "v2"
    with CaptureQueriesContext(connections["default"]) as request_thread:
        cached.outage(1)  # the check runs off the request, on the refill publisher's thread
    assert wait_for_refills()
    assert journal_queries(request_thread) == []
    assert journal() == []
    assert cached.outage(1) == "v2:1"
    close_the_publishers_connection()  # after the last read, which schedules a check too


# -- the healthy path -----------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_process_reads_the_journal_once_then_only_every_interval(
    shared_cache: Callable[[bool], None],
) -> None:
    with CaptureQueriesContext(connections["default"]) as first:
        assert cached.outage(1) == "v1:1"
    assert len(journal_queries(first)) == 1
    with CaptureQueriesContext(connections["default"]) as later:
        assert [cached.outage(n) for n in (1, 1, 2, 2)] == ["v1:1", "v1:1", "v1:2", "v1:2"]
        cached.outage.invalidate(1)  # the cache answers: nothing is journaled
    assert later.captured_queries == []
    assert journal() == []


@pytest.mark.django_db(transaction=True)
def test_a_process_local_cache_never_touches_the_journal() -> None:
    locmem = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "journal-tests"}
    with (
        override_settings(CACHES={**settings.CACHES, "locmem": locmem}),
        override_scale_settings(CACHE_ALIAS="locmem"),
        CaptureQueriesContext(connections["default"]) as queries,
    ):
        assert cached.outage(1) == "v1:1"
        probe.data = "v2"
        cached.outage.invalidate(1)
        assert cached.outage(1) == "v2:1"
    # Its entries die with the process: there is nothing a successor could replay.
    assert queries.captured_queries == []


# -- transactions and a database that fails too -----------------------------------------------------------


class Rollback(Exception):
    pass


@pytest.mark.django_db(transaction=True)
def test_the_journal_commits_and_rolls_back_with_the_callers_transaction(
    shared_cache: Callable[[bool], None],
) -> None:
    assert [cached.outage(1), cached.outage(2)] == ["v1:1", "v1:2"]
    shared_cache(False)
    with transaction.atomic():
        Author.objects.create(name="kept")
        cached.outage.invalidate(1)
    with pytest.raises(Rollback), transaction.atomic():
        Author.objects.create(name="rolled back")
        cached.outage.invalidate(2)
        raise Rollback
    # The change to 2 never happened, so neither did its invalidation.
    assert journal() == [(group_of(cached.outage.key(1)), cached.outage.key(1))]
    probe.data = "v2"
    shared_cache(True)
    reset_state()
    assert [cached.outage(1), cached.outage(2)] == ["v2:1", "v1:2"]


@pytest.mark.django_db(transaction=True)
def test_with_the_database_refusing_too_the_process_keeps_them_bounded_in_memory(
    shared_cache: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(invalidations, "KEYS_PER_GROUP", 5)
    assert [cached.outage(n) for n in range(12)] == [f"v1:{n}" for n in range(12)]
    shared_cache(False)
    with transaction.atomic():
        undo = refuse_writes()
        try:
            for n in range(12):
                cached.outage.invalidate(n)
            # The journal's failure rolled back only its savepoint: the transaction goes on.
            assert Author.objects.count() == 0
        finally:
            undo()
    # Twelve keys of one function collapsed into the function.
    assert pending_in_memory(ALIAS) == 1
    assert journal() == []
    assert counter("swr.invalidation.kept_in_memory") == 12
    probe.data = "v2"
    shared_cache(True)
    breakers.reset()  # CACHE_RETRY_AFTER passes: this process tries the cache again
    assert [cached.outage(n) for n in range(12)] == [f"v2:{n}" for n in range(12)]
    assert pending_in_memory(ALIAS) == 0


@pytest.mark.django_db(transaction=True)
def test_what_memory_kept_goes_to_the_journal_once_the_database_takes_writes(
    shared_cache: Callable[[bool], None],
) -> None:
    assert [cached.outage(1), cached.outage(2)] == ["v1:1", "v1:2"]
    shared_cache(False)
    with transaction.atomic():
        undo = refuse_writes()
        try:
            cached.outage.invalidate(1)
        finally:
            undo()
    assert pending_in_memory(ALIAS) == 1
    cached.outage.invalidate(2)  # the database is back: both are journaled
    assert pending_in_memory(ALIAS) == 0
    assert sorted(key for _, key in journal()) == sorted([cached.outage.key(1), cached.outage.key(2)])
    probe.data = "v2"
    shared_cache(True)
    reset_state()
    assert [cached.outage(1), cached.outage(2)] == ["v2:1", "v2:2"]


# -- bounded -------------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_many_invalidations_collapse_into_their_function_in_the_journal(
    shared_cache: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(invalidations, "KEYS_PER_GROUP", 5)
    assert [cached.outage(n) for n in range(12)] == [f"v1:{n}" for n in range(12)]
    shared_cache(False)
    for n in range(12):
        cached.outage.invalidate(n)
    assert journal() == [(group_of(cached.outage.key(0)), "")]
    probe.data = "v2"
    shared_cache(True)
    reset_state()
    # The file-based cache cannot list its keys, so the whole function means the whole cache.
    assert [cached.outage(n) for n in range(12)] == [f"v2:{n}" for n in range(12)]
    assert journal() == []


def test_memory_collapses_the_largest_groups_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invalidations, "KEYS_PER_GROUP", 100)
    monkeypatch.setattr(invalidations, "KEYS_IN_MEMORY", 10)
    few = [build_key("app.few", 1, str(n)) for n in range(2)]
    many = [build_key("app.many", 1, str(n)) for n in range(12)]
    pending = Pending()
    for key in [*few, *many]:
        pending.add(group_of(key), key, 86400)
    assert len(pending) <= 10
    assert set(pending.groups) == {group_of(many[0])}  # the largest group collapsed
    assert set(pending.keys) == set(few)


def test_the_group_of_a_key_is_its_function_and_version() -> None:
    key = build_key("app.views.front", "v2", '{"n":1}')
    assert group_of(key) == "swr:{app.views.front:v2"
    assert group_of(build_key("app.views.front", "v2", '{"n":2}')) == group_of(key)
    assert group_of(build_key("app.views.front", 3, '{"n":1}')) != group_of(key)
    assert group_of("not a key of ours") == ""
