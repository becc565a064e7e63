"""``statement_timeout()``: how long any one SQL statement may run, per database alias.

A web request that times out does not cancel its query: the database goes on running it
for nobody. :func:`statement_timeout` asks the database itself to cancel every statement that
runs longer than the limit, on the aliases you name, for the duration of a block::

    with statement_timeout(2.5, using="replica1"):
        rows = list(Report.objects.using("replica1").filter(...))

    @statement_timeout(5)          # every alias, sync or async view
    def dashboard(request): ...

How it is applied, on PostgreSQL:

* **Outside a transaction** the limit is set lazily, with one ``set_config()`` just before
  the first statement the block runs on that alias (an alias the block never uses costs
  nothing, not even a connection), and the previous value is put back on exit, on every exit
  path, so a persistent connection never keeps it.
* **Inside a transaction** (``atomic()``, ``ATOMIC_REQUESTS``) the block runs in a savepoint
  with ``SET LOCAL``, opened just before its first statement on the alias (an alias the
  block never uses gets no savepoint): a statement cancelled by the limit rolls back to the savepoint only, so
  the caller can catch the error and go on with the rest of its transaction (a plain
  ``SET statement_timeout`` would leave the whole transaction aborted). The previous value is
  restored before the savepoint is released.

* **Through a transaction pooler** (an alias that ``DJANGO_SCALE["POOLER"]`` marks
  ``"transaction"``, such as PgBouncer in transaction mode), a session setting would stay on
  whichever server connection got it, for the next client there, and the statements of the
  block could run on another one with no limit. Outside a transaction each statement of the
  block therefore runs in a transaction of its own that starts with ``SET LOCAL``; the limit
  ends with that transaction, on every path, and nothing is left to restore. (In a
  transaction, the savepoint form above is already transaction-scoped.)

Blocks nest, on one alias or on several, and each restores what the enclosing block (or the
connection) had: the limits live in a :mod:`contextvars` variable, so threads and concurrent
async tasks never see each other's. On SQLite the limit interrupts a statement that runs
past it before returning its first rows; on other databases the block changes nothing.

A statement stopped by the limit raises Django's ``OperationalError``;
:func:`is_statement_timeout` tells it from other errors.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple, ParamSpec, TypeVar, overload

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from django_scale.conf import conf, seconds_problem
from django_scale.exceptions import ArgumentError, ArgumentTypeError, UsageError
from django_scale.replicas import error_sqlstate

__all__ = ["current_statement_timeout", "is_statement_timeout", "statement_timeout"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("django_scale.timeouts")

#: SQLSTATE of a statement cancelled by ``statement_timeout`` (or ``pg_cancel_backend``).
QUERY_CANCELED = "57014"


class _Limit(NamedTuple):
    """The limit a block put on one alias, and whether it is a ``SET LOCAL`` in a savepoint."""

    milliseconds: int
    local: bool
    #: Whether the alias is transaction pooled: each statement gets a ``SET LOCAL`` of its own.
    pooled: bool = False


#: The innermost block's limit on each alias, in the current context.
_limits: contextvars.ContextVar[Mapping[str, _Limit]] = contextvars.ContextVar(
    "django_scale_statement_timeouts", default=MappingProxyType({})
)
# Set the new value and return the old one in one round trip. The CTE is materialised
# before set_config() runs, so `previous` is the value from before this statement.
_SWAP = (
    "WITH previous AS MATERIALIZED (SELECT current_setting('statement_timeout') AS value) "
    "SELECT value, set_config('statement_timeout', %s, {local}) FROM previous"
)
_SET = "SELECT set_config('statement_timeout', %s, {local})"

#: How many SQLite virtual machine instructions run between two looks at the clock.
SQLITE_CHECK_EVERY = 10_000


def current_statement_timeout(using: str) -> float | None:
    """Return the limit, in seconds, that blocks in this context put on *using*, or ``None``."""
    limit = _limits.get().get(using)
    return None if limit is None else limit.milliseconds / 1000


def is_statement_timeout(error: BaseException) -> bool:
    """Return whether *error* is a statement cancelled by a time limit (or by a DBA)."""
    if error_sqlstate(error) == QUERY_CANCELED:
        return True
    cause = error.__cause__ or error
    return isinstance(cause, sqlite3.OperationalError) and str(cause) == "interrupted"


class _ConnectionState:
    """What django-scale set on one database connection, so it can be put back exactly."""

    __slots__ = ("applied", "baseline", "blocks", "internal", "pooled_statement", "raw")

    def __init__(self) -> None:
        #: How many lazy blocks, in any context, are open on the connection.
        self.blocks = 0
        #: The DB-API connection that ``baseline`` and ``applied`` describe.
        self.raw: Any = None
        #: The value the session had before django-scale first set it, if it did.
        self.baseline: str | None = None
        #: The value django-scale last set in the session (PostgreSQL), or the limit of the
        #: statement running now (SQLite).
        self.applied: str | None = None
        #: Whether django-scale runs a statement of its own (a savepoint) on the connection.
        self.internal = False
        #: Whether a pooled block's wrapper has already limited the statement running now.
        self.pooled_statement = False

    def session(self, raw: Any) -> _ConnectionState:
        """Forget what was set on a connection that has since been closed or replaced."""
        if raw is not self.raw:
            self.raw, self.baseline, self.applied = raw, None, None
        return self


def _state(connection: BaseDatabaseWrapper) -> _ConnectionState:
    state: _ConnectionState | None = getattr(connection, "_django_scale_timeout", None)
    if state is None:
        state = _ConnectionState()
        connection._django_scale_timeout = state  # type: ignore[attr-defined]
    return state.session(connection.connection)


def _value(milliseconds: int) -> str:
    return f"{milliseconds}ms"


@contextmanager
def _raw_cursor(connection: BaseDatabaseWrapper) -> Iterator[Any]:
    """A DB-API cursor of *connection*'s open connection: no wrappers, no recursion.

    Not the cursor of the statement being wrapped: that one may be a named (server-side)
    cursor of ``QuerySet.iterator()``, which runs a single statement.
    """
    cursor = connection.connection.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


def _postgresql_wrapper(alias: str) -> Callable[..., Any]:
    """An execute wrapper that makes the session's limit match this context's before a statement."""

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        connection = context["connection"]
        state = _state(connection)
        limit = _limits.get().get(alias)
        if limit is None or not limit.local:
            # No limit in this context (another task's block left one in the session), or a
            # session limit; a SET LOCAL block has set its own.
            wanted = state.baseline if limit is None else _value(limit.milliseconds)
            if wanted is not None and state.applied != wanted:
                with _raw_cursor(connection) as cursor:
                    if state.baseline is None:
                        cursor.execute(_SWAP.format(local="false"), [wanted])
                        state.baseline = cursor.fetchone()[0]
                    else:
                        cursor.execute(_SET.format(local="false"), [wanted])
                state.applied = wanted
        return execute(sql, params, many, context)

    return wrapper


def _pooled_wrapper(alias: str) -> Callable[..., Any]:
    """An execute wrapper that gives each statement a ``SET LOCAL`` in its own transaction.

    For transaction-pooled aliases: the limit lives and dies with the transaction that runs the
    statement, on the server connection that runs it. In autocommit the statement runs between
    ``BEGIN; SET LOCAL ...`` (one round trip: no parameters, so both drivers send it as one
    simple query) and ``COMMIT`` (``ROLLBACK`` if it fails), so its effects commit as they
    would have alone; in a transaction opened inside the block (or with autocommit off)
    ``SET LOCAL`` goes before the statement.
    """

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        connection = context["connection"]
        state = _state(connection)
        limit = _limits.get().get(alias)
        if limit is None or limit.local or state.pooled_statement:
            # No limit in this context, a SET LOCAL block's savepoint has set it, or an
            # enclosing block's wrapper already did.
            return execute(sql, params, many, context)
        # An int from _Limit, so the value can be part of the statement's text.
        set_local = f"SET LOCAL statement_timeout = {int(limit.milliseconds)}"
        if not connection.get_autocommit():
            with _raw_cursor(connection) as cursor:
                cursor.execute(set_local)
            return execute(sql, params, many, context)
        state.pooled_statement = True
        try:
            with connection.wrap_database_errors, _raw_cursor(connection) as cursor:
                cursor.execute(f"BEGIN; {set_local}")
            try:
                result = execute(sql, params, many, context)
            except BaseException:
                _end_transaction(connection, "ROLLBACK")
                raise
            # A COMMIT can fail too (a deferred constraint): Django's error, as for the statement.
            with connection.wrap_database_errors, _raw_cursor(connection) as cursor:
                cursor.execute("COMMIT")
            return result
        finally:
            state.pooled_statement = False

    return wrapper


def _end_transaction(connection: BaseDatabaseWrapper, command: str) -> None:
    """End the statement's transaction after it failed, unless the connection itself is gone.

    The statement's error is what the caller must see; a connection that cannot even roll
    back is broken, and Django closes it (``errors_occurred``) at the end of the request.
    """
    if connection.connection is None:
        return
    try:
        with _raw_cursor(connection) as cursor:
            cursor.execute(command)
    except Exception:
        connection.errors_occurred = True


def _sqlite_wrapper(alias: str) -> Callable[..., Any]:
    """An execute wrapper that interrupts a statement past this context's limit (SQLite)."""

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        connection = context["connection"]
        state = _state(connection)
        limit = _limits.get().get(alias)
        if limit is None or state.applied is not None:
            return execute(sql, params, many, context)  # no limit here, or an outer wrapper set it
        deadline = time.monotonic() + limit.milliseconds / 1000
        raw = connection.connection
        raw.set_progress_handler(lambda: int(time.monotonic() > deadline), SQLITE_CHECK_EVERY)
        state.applied = _value(limit.milliseconds)
        try:
            return execute(sql, params, many, context)
        finally:
            state.applied = None
            raw.set_progress_handler(None, SQLITE_CHECK_EVERY)

    return wrapper


def _restore(connection: BaseDatabaseWrapper, alias: str, limit: _Limit | None) -> None:
    """Put the session's limit back to *limit*, the enclosing block's (or the connection's)."""
    state = _state(connection)
    state.blocks -= 1
    if state.baseline is None or connection.connection is None:
        return  # nothing was set, or the connection that had it is gone
    # Other tasks' blocks still open on this connection set their own limit again before
    # their next statement; this context's statements get the enclosing limit or none.
    wanted = state.baseline if limit is None or limit.local else _value(limit.milliseconds)
    if state.applied != wanted:
        try:
            with connection.cursor() as cursor:
                cursor.cursor.execute(_SET.format(local="false"), [wanted])
        except DatabaseError:
            # The session can no longer say what it runs with: make sure it is not reused.
            logger.warning("Could not restore statement_timeout on %r; closing the connection.", alias)
            if connection.in_atomic_block:
                # Closed at the end of the request, after its transaction: Django has no public
                # way to ask for that, but close_if_unusable_or_obsolete(), which runs on
                # request_started and request_finished, closes a connection whose close_at has
                # passed (django/db/backends/base/base.py, unchanged from Django 4.2 to 6.1;
                # pinned by test_timeouts.py::test_a_connection_marked_to_close_is_closed_at_request_end).
                connection.close_at = 0
            else:
                connection.close()
            return
        state.applied = wanted
    if state.blocks == 0:
        state.baseline = state.applied = None


#: Django 6.1 renamed ``transaction.savepoint()`` to ``savepoint_create()`` (the old name warns).
_savepoint_create: Callable[..., Any] = (
    getattr(transaction, "savepoint_create", None) or transaction.savepoint
)


@contextmanager
def _in_savepoint(connection: BaseDatabaseWrapper, alias: str, milliseconds: int) -> Iterator[None]:
    """Run the block in a savepoint with ``SET LOCAL`` (PostgreSQL, inside a transaction).

    The savepoint is opened just before the block's first statement on *alias*: a block
    that never uses the alias (an admin page and a database it does not read) costs it
    nothing. On exit it is released, or rolled back to after an error, as ``atomic()``
    does with its own savepoints.
    """
    state = _state(connection)
    opened: dict[str, Any] = {}

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if not opened and not state.internal and _limits.get().get(alias) is not None:
            state.internal = True  # our own statements pass every block's wrapper untouched
            try:
                marked = transaction.get_rollback(using=alias)
                sid = _savepoint_create(using=alias)
                with _raw_cursor(connection) as cursor:
                    cursor.execute(_SWAP.format(local="true"), [_value(milliseconds)])
                    opened.update(sid=sid, previous=cursor.fetchone()[0], marked=marked)
            finally:
                state.internal = False
        return execute(sql, params, many, context)

    try:
        with connection.execute_wrapper(wrapper):
            yield
    except BaseException:
        if opened:
            _roll_back_to(connection, alias, opened["sid"], opened["marked"])
        raise
    if not opened:
        return
    if transaction.get_rollback(using=alias) and not opened["marked"]:
        # Marked for rollback inside the block (an error caught in it): undo the block
        # only, as atomic() does with a savepoint.
        _roll_back_to(connection, alias, opened["sid"], opened["marked"])
        return
    # Released, the savepoint would keep SET LOCAL to the end of the transaction. (Rolled
    # back, it undoes SET LOCAL by itself.)
    with connection.cursor() as cursor:
        cursor.cursor.execute(_SET.format(local="true"), [opened["previous"]])
    transaction.savepoint_commit(opened["sid"], using=alias)


def _roll_back_to(connection: BaseDatabaseWrapper, alias: str, sid: str, marked: bool) -> None:
    """Roll back to the block's savepoint; the transaction then goes on, unless it was marked."""
    if connection.connection is None:
        return  # closed in the block: nothing to roll back
    # As atomic() does: clear the mark first, or Django refuses to run the rollback itself.
    transaction.set_rollback(False, using=alias)
    try:
        transaction.savepoint_rollback(sid, using=alias)
    except DatabaseError:
        transaction.set_rollback(True, using=alias)
        raise
    transaction.set_rollback(marked, using=alias)


@contextmanager
def _per_statement(connection: BaseDatabaseWrapper, alias: str) -> Iterator[None]:
    """Limit each statement of the block in its own transaction (transaction-pooled aliases)."""
    with connection.execute_wrapper(_pooled_wrapper(alias)):
        yield


@contextmanager
def _lazily(connection: BaseDatabaseWrapper, alias: str, outer: _Limit | None) -> Iterator[None]:
    """Set the limit just before the block's first statement on *alias*; restore *outer* on exit."""
    wrapper = (_sqlite_wrapper if connection.vendor == "sqlite" else _postgresql_wrapper)(alias)
    _state(connection).blocks += 1
    try:
        with connection.execute_wrapper(wrapper):
            yield
    finally:
        _restore(connection, alias, outer)


class StatementTimeout:
    """A context manager and decorator that limits each statement's run time on some aliases.

    Create it with :func:`statement_timeout`. One instance may be entered once at a time;
    as a decorator it enters a fresh one on every call.
    """

    def __init__(self, seconds: float | None, using: str | Iterable[str] | None) -> None:
        problem = None if seconds is None else seconds_problem(seconds)
        if problem is not None:
            # A limit of the wrong type is a TypeError too, as Python would raise.
            wrong_type = isinstance(seconds, bool) or not isinstance(seconds, (int, float))
            raise (ArgumentTypeError if wrong_type else ArgumentError)(
                f"statement_timeout({seconds!r}): the limit {problem.removeprefix('it ')} "
                "(pass None for no limit)."
            )
        if isinstance(using, str):
            using = [using]
        aliases = list(settings.DATABASES) if using is None else list(using)
        unknown = [alias for alias in aliases if alias not in settings.DATABASES]
        if unknown:
            raise ArgumentError(
                f"statement_timeout(using=...) names {', '.join(map(repr, unknown))}, which "
                f"DATABASES does not have (it has {', '.join(map(repr, settings.DATABASES))})."
            )
        self.seconds = seconds
        self.aliases = aliases
        self._stack: ExitStack | None = None
        self._previous: Mapping[str, _Limit] | None = None

    @property
    def milliseconds(self) -> int | None:
        # PostgreSQL's 0 means "no limit": a limit below a millisecond is one millisecond.
        return None if self.seconds is None else max(round(self.seconds * 1000), 1)

    def __enter__(self) -> StatementTimeout:
        if self._stack is not None:
            raise UsageError("This statement_timeout() block is already open; create another one.")
        milliseconds = self.milliseconds
        stack = ExitStack()
        self._stack = stack
        if milliseconds is None:
            return self
        self._previous = previous = _limits.get()
        limits = dict(previous)
        try:
            for alias in self.aliases:
                connection = connections[alias]
                postgresql = connection.vendor == "postgresql"
                local = postgresql and connection.in_atomic_block
                pooled = postgresql and not local and conf.transaction_pooled(alias)
                limits[alias] = _Limit(milliseconds, local, pooled)
                _limits.set(limits.copy())
                if local:
                    stack.enter_context(_in_savepoint(connection, alias, milliseconds))
                elif pooled:
                    stack.enter_context(_per_statement(connection, alias))
                elif connection.vendor in ("postgresql", "sqlite"):
                    stack.enter_context(_lazily(connection, alias, previous.get(alias)))
        except BaseException:
            self._exit(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._exit(*exc_info)

    def _exit(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is None or self._previous is None:
            return
        try:
            stack.__exit__(*exc_info)
        finally:
            _limits.set(self._previous)
            self._previous = None

    async def __aenter__(self) -> StatementTimeout:
        # Django runs the ORM of async code in a worker thread: set things up on its connection.
        return await sync_to_async(self.__enter__, thread_sensitive=True)()

    async def __aexit__(self, *exc_info: Any) -> None:
        await sync_to_async(self._exit, thread_sensitive=True)(*exc_info)

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...

    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        seconds, aliases = self.seconds, self.aliases
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                async with StatementTimeout(seconds, aliases):
                    return await func(*args, **kwargs)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            with StatementTimeout(seconds, aliases):
                return func(*args, **kwargs)

        return wrapper


def statement_timeout(seconds: float | None, using: str | Iterable[str] | None = None) -> StatementTimeout:
    """Cancel any statement that runs longer than *seconds* inside the block, on *using*.

    *using* is an alias or a list of aliases; ``None`` means every alias in ``DATABASES``
    (lazily: only those the block uses are touched). ``seconds=None`` sets no limit, so a
    configurable limit can be switched off. Use it as ``with``, ``async with`` or a decorator
    of sync and async functions.
    """
    return StatementTimeout(seconds, using)
