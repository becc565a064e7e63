"""Timing statements: an execute wrapper per connection, and the route that ran them.

The wrapper is installed with Django's public :meth:`connection.execute_wrapper()
<django.db.backends.base.base.BaseDatabaseWrapper.execute_wrapper>` when a connection of a
configured alias opens (the ``connection_created`` signal). Its fast path is one pair of
``time.perf_counter()`` calls and one comparison; only a statement over the threshold is
fingerprinted and counted.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.http import HttpRequest, HttpResponseBase

from django_scale.conf import conf
from django_scale.slowlog import store
from django_scale.slowlog.fingerprint import digest, fingerprint
from django_scale.slowlog.records import jsonable

__all__ = ["SlowQueryMiddleware", "SlowQueryWrapper", "current_route", "install", "recording", "uninstall"]

#: Route of statements run outside a request (commands, Celery tasks, shells).
NO_ROUTE = "-"
#: How many rows of an ``executemany()`` an example keeps.
EXAMPLE_ROWS = 3


class _Route:
    """The route of the request being served; filled in once the URL is resolved."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = NO_ROUTE


# A mutable holder, so that process_view (which Django may run in another context, through
# sync_to_async) names the route for the context that set the holder.
_route: contextvars.ContextVar[_Route | None] = contextvars.ContextVar(
    "django_scale_slowlog_route", default=None
)


def current_route() -> str:
    """Return the route name of the request being served, or ``"-"`` outside a request."""
    holder = _route.get()
    return holder.name if holder is not None else NO_ROUTE


class SlowQueryWrapper:
    """An execute wrapper that counts statements slower than *threshold_ms* in the slow-query log."""

    def __init__(self, alias: str, threshold_ms: float) -> None:
        #: The database alias whose statements it times.
        self.alias = alias
        #: The threshold in seconds (what the fast path compares).
        self.threshold = threshold_ms / 1000

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
    ) -> Any:
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed = time.perf_counter() - start
            if elapsed >= self.threshold:
                self.record(sql, params, many, elapsed)

    def record(self, sql: str, params: Any, many: bool, elapsed: float) -> None:
        """Count one run of *sql* that took *elapsed* seconds."""
        text = fingerprint(sql)
        if conf.SLOW_QUERY_REDACT or params is None:
            example = None
        elif many:
            example = [jsonable(row) for row in list(params)[:EXAMPLE_ROWS]]
        else:
            example = jsonable(params)
        store.add(digest(text), text, self.alias, elapsed * 1000, current_route(), sql, example)


def _aliases() -> tuple[str, ...]:
    return conf.SLOW_QUERY_DATABASES or tuple(connections)


def _attach(connection: BaseDatabaseWrapper) -> None:
    wrapper: SlowQueryWrapper | None = getattr(connection, "_django_scale_slowlog", None)
    if wrapper is not None:
        wrapper.threshold = conf.SLOW_QUERY_MS / 1000  # a new connection reads the setting again
        return
    wrapper = SlowQueryWrapper(connection.alias, conf.SLOW_QUERY_MS)
    # execute_wrapper() is a context manager that removes the wrapper on exit: entered for the
    # life of the connection object, and kept referenced there so that it is never exited.
    manager = connection.execute_wrapper(wrapper)
    manager.__enter__()
    connection._django_scale_slowlog = wrapper  # type: ignore[attr-defined]
    connection._django_scale_slowlog_manager = manager  # type: ignore[attr-defined]


def _on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    if connection.alias in _aliases():
        _attach(connection)


def install() -> None:
    """Time every statement of the aliases in ``SLOW_QUERY_DATABASES`` (default: all) from now on.

    Connections opened later get the wrapper as they open; those this thread has open get it
    now. Idempotent. :class:`SlowQueryMiddleware` calls it; call it yourself in processes that
    serve no requests (Celery workers), e.g. in your ``AppConfig.ready()``.
    """
    connection_created.connect(_on_connection_created, dispatch_uid="django_scale.slowlog")
    for alias in _aliases():
        connection = connections[alias]
        if connection.connection is not None:
            _attach(connection)


def uninstall() -> None:
    """Stop timing new connections and remove the wrapper from this thread's connections."""
    connection_created.disconnect(dispatch_uid="django_scale.slowlog")
    for alias in connections:
        connection = connections[alias]
        manager = getattr(connection, "_django_scale_slowlog_manager", None)
        if manager is not None:
            manager.__exit__(None, None, None)
            del connection._django_scale_slowlog  # type: ignore[attr-defined]
            del connection._django_scale_slowlog_manager  # type: ignore[attr-defined]


@contextmanager
def recording(using: str = "default", *, threshold_ms: float | None = None) -> Iterator[SlowQueryWrapper]:
    """Time *using*'s statements in this block only (tests, scripts, ``manage.py shell``)."""
    wrapper = SlowQueryWrapper(using, conf.SLOW_QUERY_MS if threshold_ms is None else threshold_ms)
    with connections[using].execute_wrapper(wrapper):
        yield wrapper


class SlowQueryMiddleware:
    """Name each request's route for the slow-query log, and install its wrapper (sync and async).

    Put it anywhere in ``MIDDLEWARE``. The route is ``request.resolver_match.view_name``
    (``"news:article-detail"``), never the path, so that a 404 flood makes no new entries.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        install()

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        token = _route.set(_Route())
        try:
            return self.get_response(request)
        finally:
            _route.reset(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        token = _route.set(_Route())
        try:
            response: HttpResponseBase = await self.get_response(request)
            return response
        finally:
            _route.reset(token)

    def process_view(self, request: HttpRequest, view: Any, args: Any, kwargs: Any) -> None:
        holder = _route.get()
        match = request.resolver_match
        if holder is not None and match is not None:
            holder.name = match.view_name or match.route or NO_ROUTE
