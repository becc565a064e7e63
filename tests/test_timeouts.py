"""statement_timeout(): per alias, lazily set, restored on every exit path, savepoints in transactions."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connections, transaction
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext

from django_scale.exceptions import ArgumentError, UsageError
from django_scale.timeouts import current_statement_timeout, is_statement_timeout, statement_timeout

from testapp.models import Author

postgres = pytest.mark.postgres


def _show(alias: str = "default") -> str:
    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        return str(cursor.fetchone()[0])


def _sleep(seconds: float, alias: str = "default") -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [seconds])


@pytest.fixture
def baseline(db):
    """Give the primary's session a statement_timeout of its own, as a project's OPTIONS would."""
    if connections["default"].vendor != "postgresql":
        yield None
        return
    with connections["default"].cursor() as cursor:
        cursor.execute("SET statement_timeout = '7s'")
    yield "7s"
    with connections["default"].cursor() as cursor:
        cursor.execute("RESET statement_timeout")


@postgres
def test_a_statement_past_the_limit_is_cancelled_and_the_session_gets_its_value_back(baseline):
    with pytest.raises(OperationalError) as caught, statement_timeout(0.05, using="default"):
        assert _show() == "50ms"
        _sleep(2)
    assert is_statement_timeout(caught.value)
    assert _show() == baseline


@postgres
def test_an_alias_the_block_does_not_use_is_not_even_connected(baseline):
    replica = connections["replica"]
    replica.close()
    with statement_timeout(1) as block:  # every alias
        assert block.aliases == list(connections.settings)
        Author.objects.using("default").count()
        assert current_statement_timeout("replica") == 1.0
    assert replica.connection is None
    assert current_statement_timeout("replica") is None


@postgres
def test_nested_blocks_on_one_alias_restore_the_enclosing_limit(baseline):
    with statement_timeout(5, using="default"):
        assert _show() == "5s"
        with statement_timeout(1, using="default"):
            assert _show() == "1s"
        assert _show() == "5s"
        assert current_statement_timeout("default") == 5.0
    assert _show() == baseline


@postgres
@pytest.mark.django_db(transaction=True, databases=["default", "mirror"])
def test_nesting_across_aliases_leaves_each_alias_its_own_limit():
    # The primary reached through a second alias: a second connection, a second session.
    with statement_timeout(5, using="default"):
        with statement_timeout(1, using="mirror"):
            assert (_show("default"), _show("mirror")) == ("5s", "1s")
        assert (_show("default"), _show("mirror")) == ("5s", "0")
    assert (_show("default"), _show("mirror")) == ("0", "0")


@postgres
def test_inside_a_transaction_a_timeout_rolls_back_to_a_savepoint_and_the_transaction_goes_on(baseline):
    with transaction.atomic():
        kept = Author.objects.create(name="written before")
        with CaptureQueriesContext(connections["default"]) as queries:
            try:
                with statement_timeout(0.05, using="default"):
                    Author.objects.create(name="written in the block")
                    _sleep(2)
            except OperationalError as error:
                assert is_statement_timeout(error)
        assert any(q["sql"].startswith("SAVEPOINT") for q in queries.captured_queries)
        # The transaction is not aborted: it reads, writes and keeps what came before.
        assert _show() == baseline
        Author.objects.create(name="written after")
    names = set(Author.objects.values_list("name", flat=True))
    assert names == {kept.name, "written after"}


@postgres
@pytest.mark.django_db(transaction=True, databases=["default", "mirror"])
def test_in_transactions_a_block_opens_a_savepoint_only_on_the_aliases_it_uses():
    # An admin page under ATOMIC_REQUESTS: every alias is in a transaction, the page reads one.
    with transaction.atomic(using="default"), transaction.atomic(using="mirror"):
        Author.objects.using("mirror").count()  # the mirror's transaction has begun
        with (
            CaptureQueriesContext(connections["default"]) as on_default,
            CaptureQueriesContext(connections["mirror"]) as on_mirror,
            statement_timeout(5),  # every alias
        ):
            assert current_statement_timeout("mirror") == 5.0
            assert Author.objects.using("default").count() == 0
        assert on_mirror.captured_queries == []
        default_sql = [q["sql"] for q in on_default.captured_queries]
        assert default_sql[0].startswith("SAVEPOINT") and default_sql[-1].startswith("RELEASE SAVEPOINT")
        # A block that runs no statement at all opens no savepoint either.
        with CaptureQueriesContext(connections["default"]) as idle, statement_timeout(5):
            pass
        assert idle.captured_queries == []


@postgres
def test_an_error_caught_in_a_block_in_a_transaction_rolls_back_the_block_only(baseline):
    from django.db import IntegrityError

    with transaction.atomic():
        kept = Author.objects.create(name="kept")
        with statement_timeout(5, using="default"):
            Author.objects.create(name="undone")
            # Model.save() marks the transaction for rollback on an error (Django's
            # mark_for_rollback_on_error): the block's savepoint undoes the block only.
            with contextlib.suppress(IntegrityError):
                Author.objects.create(pk=kept.pk, name="duplicate")
        assert not transaction.get_rollback()
        assert _show() == baseline
        Author.objects.create(name="after")
    assert set(Author.objects.values_list("name", flat=True)) == {"kept", "after"}


@postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_first_statement_through_a_server_side_cursor_gets_the_limit(in_transaction):
    # QuerySet.iterator() runs its one statement through a named cursor, which cannot run
    # another: the limit is set through a cursor of its own.
    Author.objects.bulk_create([Author(name="a"), Author(name="b")])
    block = transaction.atomic() if in_transaction else contextlib.nullcontext()
    with block, statement_timeout(3, using="default"):
        assert sorted(author.name for author in Author.objects.iterator(chunk_size=1)) == ["a", "b"]
        assert _show() == "3s"
    assert _show() == "0"


@postgres
def test_a_block_that_succeeds_in_a_transaction_does_not_keep_set_local(baseline):
    with transaction.atomic():
        with statement_timeout(0.5, using="default"):
            assert _show() == "500ms"
        assert _show() == baseline
    assert _show() == baseline


@postgres
def test_errors_in_the_block_restore_the_limit(baseline):
    @statement_timeout(2, using="default")
    def view() -> None:
        Author.objects.count()
        raise KeyError("the view failed")

    with pytest.raises(KeyError):
        view()
    assert _show() == baseline


@postgres
def test_a_connection_closed_in_the_block_is_not_touched_on_exit(transactional_db):
    with statement_timeout(2, using="default"):
        assert _show() == "2s"
        connections["default"].close()
    assert connections["default"].connection is None
    assert _show() == "0"  # a fresh session has the server's default


@postgres
def test_fifty_concurrent_async_views_each_see_their_own_limit_and_leave_none(transactional_db):
    async def request(n: int) -> dict[str, str]:
        client = AsyncClient()
        response = await client.get("/async/statement-timeout/", {"ms": 100 + n})
        return dict(response.json())

    async def main() -> list[dict[str, str]]:
        try:
            return list(await asyncio.gather(*(request(n) for n in range(50))))
        finally:
            await sync_to_async(connections.close_all)()

    results = asyncio.run(main())
    assert [r["inside"] for r in results] == [f"{100 + n}ms" for n in range(50)]
    assert {r["after"] for r in results} == {"0"}


@postgres
def test_async_with_on_the_thread_that_runs_the_orm(transactional_db):
    async def main() -> tuple[str, str]:
        try:
            async with statement_timeout(3, using="default"):
                inside = await sync_to_async(_show)()
            return inside, await sync_to_async(_show)()
        finally:
            await sync_to_async(connections.close_all)()

    assert asyncio.run(main()) == ("3s", "0")


def _slow_statement() -> str:
    if connections["default"].vendor == "postgresql":
        return "SELECT pg_sleep(2)"
    # SQLite has no sleep: a recursive count that takes seconds.
    return (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000000) "
        "SELECT count(*) FROM n"
    )


def test_a_slow_statement_is_interrupted_on_either_database_and_the_next_one_is_not(db):
    with (
        pytest.raises(OperationalError) as caught,
        statement_timeout(0.05, using="default"),
        connections["default"].cursor() as cursor,
    ):
        cursor.execute(_slow_statement())
    assert is_statement_timeout(caught.value)
    # Outside the block the same connection runs statements with no limit again.
    assert Author.objects.count() == 0
    assert not is_statement_timeout(OperationalError("no such table: nope"))


@pytest.mark.parametrize("seconds", [0, -1, True, "5"])
def test_bad_limits_are_refused(seconds):
    with pytest.raises(ArgumentError, match="statement_timeout") as caught:
        statement_timeout(seconds)
    assert isinstance(caught.value, ValueError)
    # A limit of the wrong type is a TypeError too, as it always was.
    assert isinstance(caught.value, TypeError) == isinstance(seconds, (bool, str))


def test_unknown_aliases_are_refused():
    with pytest.raises(ArgumentError, match="'nope'") as caught:
        statement_timeout(1, using="nope")
    assert isinstance(caught.value, ValueError)


def test_none_sets_no_limit(db):
    with statement_timeout(None):
        assert current_statement_timeout("default") is None
        assert Author.objects.count() == 0


def test_a_block_cannot_be_entered_twice():
    block = statement_timeout(1, using="default")
    with block, pytest.raises(UsageError, match="already open") as caught, block:
        pass
    assert isinstance(caught.value, RuntimeError)


@postgres
@pytest.mark.django_db(transaction=True)
def test_a_connection_marked_to_close_is_closed_at_request_end():
    # A session whose statement_timeout could not be restored inside a transaction is marked
    # with close_at = 0 (no public API asks for a close after the transaction): pin that
    # close_if_unusable_or_obsolete(), which request_started and request_finished call, closes it.
    connection = connections.create_connection("default")
    try:
        connection.ensure_connection()
        connection.close_at = None  # as CONN_MAX_AGE=None (persistent) sets it
        connection.close_if_unusable_or_obsolete()
        assert connection.connection is not None
        connection.close_at = 0
        connection.close_if_unusable_or_obsolete()
        assert connection.connection is None
    finally:
        connection.close()


@postgres
@pytest.mark.django_db(transaction=True)
def test_blocks_use_the_public_execute_wrapper_and_leave_none_behind():
    connection = connections["default"]
    before = list(connection.execute_wrappers)
    with statement_timeout(1), statement_timeout(2, using="default"):
        assert len(connection.execute_wrappers) == len(before) + 2
        _sleep(0)
    assert connection.execute_wrappers == before
