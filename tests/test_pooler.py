"""Transaction pooling: nothing session-scoped leaks through a real PgBouncer, and the checks.

The ``pgbouncer`` tests run in the env whose harness puts PgBouncer (transaction pooling) in
front of the primary (``DJANGO_SCALE_TEST_POOLER=pgbouncer``). PgBouncer hands an idle server
connection to the next client that needs one, most recently used first: a client that starts
a transaction right after our statement gets the server connection that statement ran on.
That is how these tests put "another client" between two statements of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core import checks
from django.db import OperationalError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import override_settings

from django_scale.checks import check_ops, check_settings
from django_scale.sniper import LOCK_KEY, Rule, Sniper
from django_scale.testing import override_scale_settings
from django_scale.timeouts import is_statement_timeout, statement_timeout

import harness

POOLED = override_scale_settings(POOLER={"default": "transaction"})
pgbouncer = pytest.mark.pgbouncer


def _scalar(connection: BaseDatabaseWrapper, sql: str, params: list[Any] | None = None) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


@pytest.fixture
def other_client() -> Iterator[BaseDatabaseWrapper]:
    """Another client of the primary's PgBouncer (a connection of its own, as another worker's)."""
    connection = connections.create_connection("default")
    yield connection
    connection.close()


def _pin(connection: BaseDatabaseWrapper) -> None:
    """Start a transaction on *connection*: PgBouncer gives it a server connection until it ends."""
    connection.set_autocommit(False)
    _scalar(connection, "SELECT 1")


def _unpin(connection: BaseDatabaseWrapper) -> None:
    connection.rollback()
    connection.set_autocommit(True)


def _before_statement(number: int, action: Callable[[], None]) -> Callable[..., Any]:
    """An execute wrapper that runs *action* once, before the *number*-th statement it sees (from 0).

    Installed inside a ``statement_timeout()`` block, it runs after what the block's own
    wrapper sent before the statement.
    """
    calls: list[str] = []

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if len(calls) == number:
            action()
        calls.append(sql)
        return execute(sql, params, many, context)

    return wrapper


def _server_timeouts() -> set[str]:
    """The statement_timeout of every server connection PgBouncer keeps to the test database.

    As many clients as the pool has server connections each hold one in a transaction at once,
    so together they see them all.
    """
    pool = harness.services().pooler
    assert pool is not None
    name = connections["default"].settings_dict["NAME"]
    config = {row[0]: row[1] for row in pool.admin(pool.primary_port, "SHOW CONFIG")}
    size = config["default_pool_size"]
    clients = [connections.create_connection("default") for _ in range(int(size))]
    try:
        seen = set()
        for client in clients:
            _pin(client)
            assert _scalar(client, "SELECT current_database()") == name
            seen.add(str(_scalar(client, "SHOW statement_timeout")))
        return seen
    finally:
        for client in clients:
            _unpin(client)
            client.close()


@pgbouncer
@pytest.mark.django_db(transaction=True)
def test_a_limit_applies_to_its_statement_and_never_reaches_another_client(other_client):
    """Another client starts a transaction between the block's first statement and the next.

    With a session limit (today's form without POOLER) the limit went to the server connection
    that client then got, and the block's query ran elsewhere with no limit.
    """
    default = _scalar(other_client, "SHOW statement_timeout")
    assert default == "0"
    seen_by_other = []

    def another_client_comes() -> None:
        _pin(other_client)
        seen_by_other.append(_scalar(other_client, "SHOW statement_timeout"))

    connection = connections["default"]
    try:
        with POOLED, statement_timeout(0.2, using="default"):
            assert _scalar(connection, "SHOW statement_timeout") == "200ms"
            with (
                connection.execute_wrapper(_before_statement(0, another_client_comes)),
                pytest.raises(OperationalError) as caught,
            ):
                _scalar(connection, "SELECT 1 FROM pg_sleep(1)")
        assert is_statement_timeout(caught.value)
        # The next statement, outside the block, has no limit wherever it runs.
        assert _scalar(connection, "SHOW statement_timeout") == default
    finally:
        _unpin(other_client)
    assert seen_by_other == [default]
    assert _server_timeouts() == {default}


@pgbouncer
@pytest.mark.django_db(transaction=True)
def test_a_limit_set_through_the_pooler_is_gone_from_every_server_connection_after_the_block():
    with POOLED:
        for _ in range(5):
            with statement_timeout(0.2, using="default"):
                assert _scalar(connections["default"], "SHOW statement_timeout") == "200ms"
                _scalar(connections["default"], "SELECT count(*) FROM pg_class")
    assert _server_timeouts() == {"0"}


@pgbouncer
@pytest.mark.django_db(transaction=True)
def test_a_block_in_a_transaction_through_the_pooler_keeps_its_savepoint_form():
    from django.db import transaction

    with POOLED, transaction.atomic():
        with pytest.raises(OperationalError), statement_timeout(0.05, using="default"):
            _scalar(connections["default"], "SELECT 1 FROM pg_sleep(1)")
        # Rolled back to the savepoint: the transaction goes on, without the limit.
        assert _scalar(connections["default"], "SHOW statement_timeout") == "0"
    assert _server_timeouts() == {"0"}


@pgbouncer
@pytest.mark.django_db(transaction=True)
def test_an_atomic_block_opened_inside_a_pooled_block_gets_the_limit_and_keeps_its_writes():
    from django.db import transaction

    from testapp.models import Author

    with POOLED, statement_timeout(0.2, using="default"):
        with transaction.atomic():
            Author.objects.create(name="kept")
            assert _scalar(connections["default"], "SHOW statement_timeout") == "200ms"
            with pytest.raises(OperationalError):
                _scalar(connections["default"], "SELECT 1 FROM pg_sleep(1)")
            transaction.set_rollback(True)
        Author.objects.create(name="committed")  # autocommit again: its own transaction
    assert list(Author.objects.values_list("name", flat=True)) == ["committed"]
    assert _server_timeouts() == {"0"}


@pgbouncer
@pytest.mark.django_db(transaction=True)
def test_the_sniper_lock_is_free_after_a_run_whatever_client_came_between(other_client):
    """Another client starts a transaction between the sniper's lock and its next statement.

    With a session lock, the unlock then ran on another server connection: the lock stayed on
    the one the other client had, for good, and every later run on another server connection
    reported "lock busy".
    """
    direct = harness.services().pooler
    assert direct is not None

    def another_client_comes() -> None:
        _pin(other_client)

    connection = connections["default"]
    try:
        with connection.execute_wrapper(_before_statement(1, another_client_comes)):
            report = Sniper(using="default", rules=[Rule(name="none", max_duration=3600)]).run()
        assert not report.lock_busy
    finally:
        _unpin(other_client)
    # Seen from a session of its own, straight on the primary: nobody holds the lock.
    checker = connections.create_connection("default")
    checker.settings_dict = {**checker.settings_dict, "PORT": str(direct.direct_primary.port)}
    try:
        assert _scalar(checker, "SELECT pg_try_advisory_lock(%s)", [LOCK_KEY]) is True
        assert _scalar(checker, "SELECT pg_advisory_unlock(%s)", [LOCK_KEY]) is True
    finally:
        checker.close()
    # And the next runs take it, through whichever server connection.
    for _ in range(3):
        assert not Sniper(using="default", rules=[Rule(name="none", max_duration=3600)]).run().lock_busy


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_transaction_form_commits_each_statement_and_leaves_the_session_alone(other_client):
    """The POOLER form on any connection (both drivers): a transaction per statement, nothing kept."""
    from testapp.models import Author

    connection = connections["default"]
    with POOLED, statement_timeout(0.2, using="default"):
        assert _scalar(connection, "SHOW statement_timeout") == "200ms"
        Author.objects.create(name="committed at once")
        # Another client sees the row while the block is still open: it was committed.
        assert _scalar(other_client, "SELECT count(*) FROM testapp_author") == 1
        with pytest.raises(OperationalError) as caught:
            _scalar(connection, "SELECT 1 FROM pg_sleep(1)")
        assert is_statement_timeout(caught.value)
        # The failed statement's transaction was rolled back: the connection goes on.
        assert _scalar(connection, "SHOW statement_timeout") == "200ms"
        assert connection.get_autocommit() and not connection.in_atomic_block
    assert _scalar(connection, "SHOW statement_timeout") == "0"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_sniper_run_holds_the_lock_for_its_run_only():
    """Another sniper finds the lock busy while a run holds it, and free once it is over."""
    seen = []

    def another_sniper_tries() -> None:
        other = connections.create_connection("default")
        try:
            seen.append(_scalar(other, "SELECT pg_try_advisory_xact_lock(%s)", [LOCK_KEY]))
        finally:
            other.close()

    connection = connections["default"]
    with connection.execute_wrapper(_before_statement(1, another_sniper_tries)):
        assert not Sniper(using="default", rules=[Rule(name="none", max_duration=3600)]).run().lock_busy
    assert seen == [False]
    another_sniper_tries()
    assert seen == [False, True]


def _pooled_database(**extra: Any) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "app",
        "HOST": "127.0.0.1",
        "PORT": "6432",
        **extra,
    }


@pytest.fixture
def databases_override() -> Iterator[None]:
    """Let tests override DATABASES: the checks only read it, no connection is made with it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Overriding setting DATABASES", UserWarning)
        yield


def _ids(messages: list[checks.CheckMessage]) -> list[str]:
    return sorted(message.id or "" for message in messages)


def test_a_pooled_alias_with_server_side_cursors_is_reported(databases_override):
    databases = {"default": _pooled_database()}
    with override_settings(DATABASES=databases, DJANGO_SCALE={"POOLER": {"default": "transaction"}}):
        [message] = check_ops()
    assert message.id == "django_scale.W504"
    assert message.obj == "DATABASES['default']"
    assert "DISABLE_SERVER_SIDE_CURSORS" in message.hint


def test_a_clean_pooled_alias_passes_and_session_mode_is_not_checked(databases_override):
    clean = _pooled_database(DISABLE_SERVER_SIDE_CURSORS=True)
    risky = _pooled_database(OPTIONS={"assume_role": "app", "options": "-c search_path=app"})
    databases = {"default": clean, "other": risky}
    with override_settings(
        DATABASES=databases, DJANGO_SCALE={"POOLER": {"default": "transaction", "other": "session"}}
    ):
        assert check_ops() == []


def test_each_session_scoped_option_of_a_pooled_alias_is_reported(databases_override):
    options = {"prepare_threshold": 5, "options": "-c statement_timeout=5s", "assume_role": "app"}
    databases = {"default": _pooled_database(DISABLE_SERVER_SIDE_CURSORS=True, OPTIONS=options)}
    with override_settings(DATABASES=databases, DJANGO_SCALE={"POOLER": {"default": "transaction"}}):
        messages = check_ops()
    assert _ids(messages) == ["django_scale.W505", "django_scale.W506", "django_scale.W507"]
    texts = " ".join(message.msg for message in messages)
    assert "prepare_threshold'] = 5" in texts and "statement_timeout=5s" in texts and "'app'" in texts


def test_the_pooler_setting_is_validated(databases_override):
    databases = {"default": _pooled_database()}
    with override_settings(DATABASES=databases, DJANGO_SCALE={"POOLER": {"default": "statement"}}):
        assert _ids(check_settings()) == ["django_scale.E003"]
    with override_settings(DATABASES=databases, DJANGO_SCALE={"POOLER": ["default"]}):
        assert _ids(check_settings()) == ["django_scale.E002"]
    with override_settings(DATABASES=databases, DJANGO_SCALE={"POOLER": {"nowhere": "transaction"}}):
        [message] = check_settings()
    assert message.id == "django_scale.E004" and "'nowhere'" in message.msg


@pgbouncer
def test_the_harness_reaches_postgres_through_pgbouncer_in_transaction_mode():
    pool = harness.services().pooler
    assert pool is not None
    assert pool.version.startswith("PgBouncer ")
    assert harness.services().primary.port == pool.primary_port != pool.direct_primary.port
    assert harness.services().replica.port == pool.replica_port != pool.direct_replica.port
    modes = {row[0]: row for row in pool.admin(pool.primary_port, "SHOW CONFIG")}
    assert modes["pool_mode"][1] == "transaction"
