"""``ScaleMiddleware``: a routing state per request, and read-your-writes across requests.

Put it first in ``MIDDLEWARE`` so that every write of the request, including the session's,
happens inside it::

    MIDDLEWARE = ["django_scale.middleware.ScaleMiddleware", *MIDDLEWARE]

After a request that wrote, it reads the primary's WAL position once and stores it in a
signed cookie. On the user's next requests, reads go to a replica only once that replica
has replayed past the position; otherwise, after waiting at most ``REPLICA_WAIT``, to the
primary. The cookie expires after ``READ_YOUR_WRITES_MAX_AGE`` seconds.

It is also the final pass of pages cached with :func:`~django_scale.cache.swr_cache_page`: as
the first entry of ``MIDDLEWARE`` it sees the final response, after every other middleware,
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
from django.http import HttpRequest, HttpResponseBase
from django.utils.module_loading import import_string

from django_scale.cache.pages import PageSlot, abandon_page, finish_page, open_page_slot
from django_scale.conf import conf
from django_scale.replicas import (
    STICKY_PRIMARY,
    RoutingState,
    await_replica,
    decode_position,
    guard_replicas,
    monitor,
    routing_state,
)

__all__ = ["ScaleMiddleware"]

logger = logging.getLogger("django_scale.middleware")

#: The salt of the read-your-writes cookie's signature, so no other signed value can pass as it.
COOKIE_SALT = "django_scale.read_your_writes"


def read_cookie(request: HttpRequest) -> tuple[int | None, bool]:
    """Return the WAL position the user's last write reached, and whether to stick to the primary.

    A missing, expired or forged cookie counts as no recent write.
    """
    try:
        value = request.get_signed_cookie(
            conf.READ_YOUR_WRITES_COOKIE,
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


#: Why a request reads from the primary when no replica caught up in time.
NOT_CAUGHT_UP = "no replica replayed the user's last write within REPLICA_WAIT"


def _needs_wait(state: RoutingState) -> bool:
    required = state.required_lsn
    return required is not None and not any(monitor(alias).replay_lsn >= required for alias in conf.REPLICAS)


def _close(
    request: HttpRequest, response: HttpResponseBase, state: RoutingState, position: str | None
) -> None:
    """After the view: leave the user's write position in the cookie, or clear a spent one."""
    name = conf.READ_YOUR_WRITES_COOKIE
    if state.wrote:
        response.set_signed_cookie(
            name,
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
        response.delete_cookie(name, domain=settings.SESSION_COOKIE_DOMAIN, samesite="Lax")


def _is_first_middleware() -> bool:
    """Whether the first entry of ``MIDDLEWARE`` is ScaleMiddleware (or a subclass)."""
    entries = list(getattr(settings, "MIDDLEWARE", None) or ())
    if not entries:
        return False
    try:
        first = import_string(entries[0]) if isinstance(entries[0], str) else entries[0]
    except ImportError:
        return False
    return isinstance(first, type) and issubclass(first, ScaleMiddleware)


class ScaleMiddleware:
    """Open a :class:`~django_scale.replicas.RoutingState` per request (sync and async).

    As the first entry of ``MIDDLEWARE`` it also judges the final response of cached pages.
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
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        slot = open_page_slot(request) if self.outermost else None
        try:
            required, sticky = read_cookie(request)
            with routing_state(required, sticky_primary=sticky) as state, guard_replicas():
                await_replica(state, NOT_CAUGHT_UP)
                response: HttpResponseBase = self.get_response(request)  # type: ignore[assignment]
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

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        slot = open_page_slot(request) if self.outermost else None
        try:
            return await self._respond_in_state(request, slot)
        except BaseException:
            if slot is not None and slot.page is not None:
                await sync_to_async(abandon_page)(slot)
            raise

    async def _respond_in_state(self, request: HttpRequest, slot: PageSlot | None) -> HttpResponseBase:
        required, sticky = read_cookie(request)
        with routing_state(required, sticky_primary=sticky) as state:
            # Connections belong to threads: guard the replica connections of the thread
            # that runs this request's ORM calls (sync_to_async's), not the event loop's.
            guard = guard_replicas()
            await sync_to_async(guard.__enter__)()
            try:
                return await self._respond(request, state, slot)
            finally:
                # It only removes the wrappers: an exception of the view is not its business.
                await sync_to_async(guard.__exit__)(None, None, None)

    async def _respond(
        self, request: HttpRequest, state: RoutingState, slot: PageSlot | None
    ) -> HttpResponseBase:
        if _needs_wait(state):
            # Waiting blocks a thread for at most REPLICA_WAIT; keep it off the event loop.
            await sync_to_async(await_replica, thread_sensitive=False)(state, NOT_CAUGHT_UP)
        else:
            await_replica(state, NOT_CAUGHT_UP)
        response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        position = None
        if state.wrote:
            # On the thread that ran the ORM calls, whose connection saw the write.
            position = await sync_to_async(current_wal_position)(conf.PRIMARY)
        _close(request, response, state, position)
        if slot is not None and slot.page is not None:
            # Last: the read-your-writes cookie counts as a cookie set.
            if slot.needs_io:
                # The verdict may read the session; the write goes to the cache.
                await sync_to_async(finish_page)(slot, request, response)
            else:
                finish_page(slot, request, response)  # a page from the cache: headers only
        return response
