"""``ScaleMiddleware``: a routing state per request, and read-your-writes across requests.

Put it first in ``MIDDLEWARE`` so that every write of the request, including the session's,
happens inside it::

    MIDDLEWARE = ["django_scale.middleware.ScaleMiddleware", *MIDDLEWARE]

After a request that wrote, it reads the primary's WAL position once and stores it in a
signed cookie. On the user's next requests, reads go to a replica only once that replica
has replayed past the position; otherwise, after waiting at most ``REPLICA_WAIT``, to the
primary. The cookie expires after ``READ_YOUR_WRITES_MAX_AGE`` seconds.

It is also the final pass of pages cached with :func:`~django_scale.cache.swr_cache_page`: as
the first entry of ``MIDDLEWARE`` (or the second, after ``MetricsMiddleware``, which changes no
response) it sees the final response, after every other middleware,
and decides there whether the page the view rendered may be stored and which caching headers
the response gets (:func:`~django_scale.cache.pages.finish_page`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core.signing import BadSignature
from django.db import connections
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.module_loading import import_string

from django_scale.cache.pages import abandon_page, finish_page, open_page_slot, page_paths, reopen_page_slot
from django_scale.conf import conf
from django_scale.exceptions import ReplicaReadError
from django_scale.metrics.counters import add_routing_state as _add_routing_state
from django_scale.metrics.counters import recorded_request as _recorded_request
from django_scale.replicas import (
    STICKY_PRIMARY,
    RoutingState,
    await_replica,
    current_state,
    decode_position,
    install_guards,
    monitor,
    routing_state,
)
from django_scale.replicas.state import _NEW_COUNTER, STICKY, _state

__all__ = ["ScaleMiddleware"]

logger = logging.getLogger("django_scale.middleware")

#: The salt of the read-your-writes cookie's signature, so no other signed value can pass as it.
COOKIE_SALT = "django_scale.read_your_writes"


def read_cookie(request: HttpRequest, name: str | None = None) -> tuple[int | None, bool]:
    """Return the WAL position the user's last write reached, and whether to stick to the primary.

    A missing, expired or forged cookie counts as no recent write. *name* is the cookie's
    (``READ_YOUR_WRITES_COOKIE``), when the caller has it.
    """
    if name is None:
        name = conf.hot().cookie
    if name not in request.COOKIES:
        # Most requests: no recent write, and no exception raised and caught to find out.
        return None, False
    try:
        value = request.get_signed_cookie(
            name,
            salt=COOKIE_SALT,
            max_age=timedelta(seconds=conf.READ_YOUR_WRITES_MAX_AGE),
        )
    except (KeyError, BadSignature):
        return None, False
    return decode_position(value)


def current_wal_position(alias: str) -> str | None:
    """Return the primary's current WAL insert position, or ``None`` where it has none."""
    connection = connections[alias]
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_insert_lsn()::text")
            row = cursor.fetchone()
    except Exception:
        # Without a position the user sticks to the primary: slower, never stale.
        logger.warning("could not read the WAL position of %r", alias, exc_info=True)
        return None
    return str(row[0]) if row else None


_new_object = object.__new__

#: Why a request reads from the primary when no replica caught up in time.
NOT_CAUGHT_UP = "no replica replayed the user's last write within REPLICA_WAIT"


#: Why every read of a request goes to the primary because of its method (``PRIMARY_METHODS``).
PRIMARY_METHOD = "the request's method is in PRIMARY_METHODS"


def _request_state(request: HttpRequest) -> RoutingState:
    """The routing state of *request*, from its method and read-your-writes cookie (not yet current).

    What :func:`~django_scale.replicas.routing_state` does, less its context manager: this runs
    on every request. The state carries the settings it read, so the router need not read them.
    A request whose method is in ``PRIMARY_METHODS`` is pinned to the primary: it may write
    what it read, and a replica's read would make that a lost update.
    """
    hot = conf.hot()
    if hot.cookie not in request.COOKIES:
        # Most requests: no recent write (read_cookie()'s first test, without the call). The
        # state is RoutingState(), made without its __init__: every field but reads (a new
        # Counter per state) reads its default from the class (tests/test_routing.py pins it).
        state = _new_object(RoutingState)
        state.reads = _NEW_COUNTER()
    else:
        required, sticky = read_cookie(request, hot.cookie)
        state = RoutingState(required, sticky)
        if sticky:
            state.pin(STICKY)
    state._hot = hot
    if request.method in hot.primary_methods:
        state.pin(PRIMARY_METHOD)
    return state


def _needs_wait(state: RoutingState) -> bool:
    required = state.required_lsn
    return required is not None and not any(monitor(alias).replay_lsn >= required for alias in conf.REPLICAS)


def _close(
    request: HttpRequest, response: HttpResponseBase, state: RoutingState, position: str | None
) -> None:
    """After the view: leave the user's write position in the cookie, or clear a spent one."""
    if state.wrote:
        response.set_signed_cookie(
            conf.READ_YOUR_WRITES_COOKIE,
            position or STICKY_PRIMARY,
            salt=COOKIE_SALT,
            max_age=int(conf.READ_YOUR_WRITES_MAX_AGE),
            domain=settings.SESSION_COOKIE_DOMAIN,
            secure=request.is_secure(),
            httponly=True,
            samesite="Lax",
        )
    elif state.required_lsn is not None and all(
        monitor(alias).replay_lsn >= state.required_lsn for alias in conf.REPLICAS
    ):
        # Every replica has the write now: the cookie has done its job.
        response.delete_cookie(
            conf.READ_YOUR_WRITES_COOKIE, domain=settings.SESSION_COOKIE_DOMAIN, samesite="Lax"
        )


#: The one middleware that may come before ScaleMiddleware and leave it the outermost: it
#: changes no response (it records the request's latency, including ScaleMiddleware's work).
METRICS_MIDDLEWARE = "django_scale.metrics.MetricsMiddleware"


def _is_first_middleware() -> bool:
    """Whether ScaleMiddleware (or a subclass) is the first entry of ``MIDDLEWARE``, or the
    second after ``MetricsMiddleware``: then it sees every response as the client gets it."""
    entries = list(getattr(settings, "MIDDLEWARE", None) or ())
    if entries and entries[0] == METRICS_MIDDLEWARE:
        entries = entries[1:]
    if not entries:
        return False
    try:
        first = import_string(entries[0]) if isinstance(entries[0], str) else entries[0]
    except ImportError:
        return False
    return isinstance(first, type) and issubclass(first, ScaleMiddleware)


#: The check ids :func:`_warn_under_asgi` logged in this process (each once).
_warned: set[str | None] = set()


def _warn_under_asgi() -> None:
    """Log the run-time checks of a process that serves ASGI (``django_scale.W111``), once each."""
    # (Imported here: the checks module imports the querysets and the prefetch package.)
    from django_scale.checks import persistent_connections_under_asgi

    for message in persistent_connections_under_asgi():
        if message.id not in _warned:
            _warned.add(message.id)
            logger.warning("%s", message)


#: Why the second run of a request whose read failed on a replica reads from the primary.
RERUN = "the first run of this request failed on a replica"
#: The methods of requests run again after a failed read: safe ones, as HTTP defines them
#: (RFC 9110, 9.2.1), which a proxy such as nginx also retries.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _may_run_again(request: HttpRequest, state: RoutingState | None) -> bool:
    """Whether *request* may run once more with every read on the primary.

    Only when a read of it failed on a replica, it has not written (its session included:
    saving one is a write), its method is safe, and it is not that second run already.
    """
    return (
        state is not None
        and state.replica_failed is not None
        and not state.wrote
        and not state.rerun
        and request.method in SAFE_METHODS
    )


class _FailedRun(HttpResponse):
    """What the view of a request to be run again responds (internal, never served).

    ScaleMiddleware's ``process_exception`` returns it for a view that raised
    :exc:`~django_scale.exceptions.ReplicaReadError`, so that Django does not log the first
    run as a server error. Should the request not be run again after all (an inner
    middleware wrote on the way out), the middleware raises the view's exception instead.
    """

    status_code = 503

    def __init__(self, exception: Exception) -> None:
        super().__init__()
        self.exception = exception


def _runs_again(request: HttpRequest, state: RoutingState, response: HttpResponseBase) -> bool:
    """Whether to discard *response* and run *request* once more, every read on the primary.

    Decided on the state, not on an exception: the view may have caught the error, and Django
    turns an exception of the view into a response before it gets here.
    """
    if not _may_run_again(request, state) or response.streaming:
        # A streaming response may be sent already, or be produced by a generator: serve it.
        if isinstance(response, _FailedRun):
            raise response.exception
        return False
    logger.warning(
        "a read on replica %r failed; running %s %s again on the primary",
        state.replica_failed,
        request.method,
        request.path,
    )
    return True


class ScaleMiddleware:
    """Open a :class:`~django_scale.replicas.RoutingState` per request (sync and async).

    As the first entry of ``MIDDLEWARE`` it also judges the final response of cached pages.
    A ``GET``, ``HEAD`` or ``OPTIONS`` request that has not written and whose read failed on
    a replica runs once more, with every read on the primary (see :doc:`/routing`).
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        #: Whether it is the first entry of MIDDLEWARE, so it sees the final response of pages
        #: cached with swr_cache_page (which are served uncached otherwise).
        self.outermost = _is_first_middleware()
        # Once per process: every replica connection gets its guard when it opens, so that no
        # request installs or removes one.
        install_guards()
        if self.async_mode:
            markcoroutinefunction(self)
            _warn_under_asgi()

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        # No page slot while no view of the process is cached with swr_cache_page (a set filled
        # as such views are decorated): most projects' requests then open none.
        slot = open_page_slot(request) if page_paths and self.outermost else None
        try:
            state = _request_state(request)
            token = _state.set(state)
            if _recorded_request.get() is not None:
                # (add_routing_state()'s own test first: most requests are not recorded.)
                _add_routing_state(state)
            try:
                if state.required_lsn is not None and not state.pinned:
                    # (A pinned request reads the primary: no replica to wait for.)
                    await_replica(state, NOT_CAUGHT_UP)
                response: HttpResponseBase = self.get_response(request)  # type: ignore[assignment]
            finally:
                _state.reset(token)
            if state.replica_failed is not None and _runs_again(request, state, response):
                if slot is not None:
                    reopen_page_slot(slot)
                with routing_state(state.required_lsn, sticky_primary=state.sticky_primary) as state:
                    state.rerun = True
                    state.pin(RERUN, fallback=True)
                    _add_routing_state(state)
                    response = self.get_response(request)  # type: ignore[assignment]
            if state.wrote or state.required_lsn is not None:
                position = current_wal_position(conf.PRIMARY) if state.wrote else None
                _close(request, response, state, position)
            if slot is not None and slot.page is not None:
                # Last: the read-your-writes cookie counts as a cookie set.
                finish_page(slot, request, response)
        except BaseException:
            if slot is not None:
                abandon_page(slot)
            raise
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponseBase | None:
        """Keep a view's failed replica read from becoming a logged 500 when the request runs again."""
        if isinstance(exception, ReplicaReadError) and _may_run_again(request, current_state()):
            return _FailedRun(exception)
        return None

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        slot = open_page_slot(request) if page_paths and self.outermost else None
        try:
            # No thread hop here unless the request needs one: the replica connections of the
            # thread that runs the ORM calls were guarded when they opened.
            state = _request_state(request)
            token = _state.set(state)
            if _recorded_request.get() is not None:
                _add_routing_state(state)
            try:
                if state.required_lsn is None or state.pinned:
                    pass
                elif _needs_wait(state):
                    # Waiting blocks a thread for at most REPLICA_WAIT; keep it off the event loop.
                    await sync_to_async(await_replica, thread_sensitive=False)(state, NOT_CAUGHT_UP)
                else:
                    await_replica(state, NOT_CAUGHT_UP)
                response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
            finally:
                _state.reset(token)
            if state.replica_failed is not None and _runs_again(request, state, response):
                if slot is not None:
                    if slot.page is not None:
                        # Gives up the failed run's claim on the cache.
                        await sync_to_async(reopen_page_slot)(slot)
                    else:
                        reopen_page_slot(slot)
                with routing_state(state.required_lsn, sticky_primary=state.sticky_primary) as state:
                    state.rerun = True
                    state.pin(RERUN, fallback=True)
                    _add_routing_state(state)
                    response = await self.get_response(request)  # type: ignore[misc]
            if state.wrote:
                # On the thread that ran the ORM calls, whose connection saw the write.
                position = await sync_to_async(current_wal_position)(conf.PRIMARY)
                _close(request, response, state, position)
            elif state.required_lsn is not None:
                _close(request, response, state, None)
            if slot is not None and slot.page is not None:
                # Last: the read-your-writes cookie counts as a cookie set.
                if slot.needs_io:
                    # The verdict may read the session; the write goes to the cache.
                    await sync_to_async(finish_page)(slot, request, response)
                else:
                    finish_page(slot, request, response)  # a page from the cache: headers only
            return response
        except BaseException:
            if slot is not None and slot.page is not None:
                await sync_to_async(abandon_page)(slot)
            raise
