"""The routing state of one request or task, kept in :mod:`contextvars`, and ``use_primary()``."""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar, overload

from django_scale.conf import HotSettings, conf
from django_scale.replicas.monitors import wait_for_replicas

__all__ = [
    "RoutingState",
    "await_replica",
    "current_state",
    "forced_route",
    "mark_write",
    "routing_state",
    "use_primary",
    "use_replica",
]

P = ParamSpec("P")
R = TypeVar("R")


#: An empty Counter without running Counter.__init__ (super().__init__() and update(), in
#: Python), by a call of C functions only: a request opens a state, and so a Counter, on every
#: request. Counter adds no state of its own to dict's (Lib/collections/__init__.py, 3.10 to 3.13).
_NEW_COUNTER: Callable[[], Counter[str]] = functools.partial(Counter.__new__, Counter)


@dataclass
class RoutingState:
    """What routing needs to know about one request or task. Open it with :func:`routing_state`.

    Not a slotted class: the fields' defaults stay class attributes, so that
    ``ScaleMiddleware`` makes the state of a request without a recent write with two
    assignments (``reads`` and ``_hot``) instead of running the thirteen of ``__init__``.
    """

    #: The WAL position the user's last write reached; reads must see at least this much.
    required_lsn: int | None = None
    #: Whether the user's last write must be read from the primary because the primary
    #: cannot tell a WAL position (a database other than PostgreSQL).
    sticky_primary: bool = False
    #: Whether this request has written; its later reads stay on the primary.
    wrote: bool = False
    #: Why reads of this request go to the primary, or ``""`` while they may use a replica.
    pinned: str = ""
    #: The replica this request reads from, chosen once so that its reads agree.
    replica: str | None = None
    #: How many read decisions went to each alias (for tests, metrics and benchmarks).
    reads: Counter[str] = field(default_factory=_NEW_COUNTER)
    #: The replica a read of this request failed on (its connection broke, or the standby
    #: cancelled it), or ``None``. :class:`~django_scale.middleware.ScaleMiddleware` runs a safe
    #: request that has not written once more, on the primary, when it is set.
    replica_failed: str | None = None
    #: Whether this is that second run: every read goes to the primary, inside
    #: :func:`use_replica` too.
    rerun: bool = False
    #: Reads that went to the primary only because no replica could serve them: none was
    #: available (lag, ejection, an open breaker), none had replayed the user's write, or a
    #: read on one failed. Counted when such a read happens, never on other reads.
    fallbacks: int = 0

    def pin(self, reason: str, *, fallback: bool = False) -> None:
        """Send the rest of this request's reads to the primary, for *reason*.

        *fallback*: the reason is that no replica can serve them, so the reads the pin sends
        to the primary count as :attr:`fallbacks`, until a pin of another kind (the request
        wrote: its reads would be on the primary anyway).
        """
        if not self.pinned:
            self.pinned = reason
            self._falls_back = fallback
        elif not fallback:
            self._falls_back = False

    #: Until when (``time.monotonic()``) the chosen replica's availability holds unless its
    #: monitor learns something new (its version changes).
    _valid_until: float = field(default=0.0, repr=False)
    _version: int = field(default=-1, repr=False)
    #: ``conf.hot()`` as the request's middleware read it, so the router need not read it again.
    _hot: HotSettings | None = field(default=None, repr=False)
    #: Whether the pin's reads count as :attr:`fallbacks` (see :meth:`pin`).
    _falls_back: bool = field(default=False, repr=False)


_state: contextvars.ContextVar[RoutingState | None] = contextvars.ContextVar(
    "django_scale_routing_state", default=None
)
_forced: contextvars.ContextVar[Literal["primary", "replica"] | None] = contextvars.ContextVar(
    "django_scale_forced_route", default=None
)

#: Counters that :func:`django_scale.testing.capture_reads` hands to tests.
_capture: contextvars.ContextVar[Counter[str] | None] = contextvars.ContextVar(
    "django_scale_capture_reads", default=None
)


def current_state() -> RoutingState | None:
    """Return the routing state of the current request or task, or ``None`` outside one."""
    return _state.get()


class routing_state:  # noqa: N801 - a context manager used like a function
    """Open a :class:`RoutingState` for the code inside the block, and close it after.

    :class:`~django_scale.middleware.ScaleMiddleware` opens one per request and the Celery
    integration one per task; open one yourself around any other unit of work that should
    read its own writes. ``with routing_state() as state:`` binds the state.
    """

    __slots__ = ("state", "_token")

    def __init__(self, required_lsn: int | None = None, *, sticky_primary: bool = False) -> None:
        # A class, not a generator-based context manager: one is opened per request.
        # (Positional: calling a class with keyword arguments builds a dict of them.)
        self.state = RoutingState(required_lsn, sticky_primary)
        # The settings the router compares with its thread's last decision: without them every
        # read of a task or other unit of work took the router's long path (as a request's
        # state has them from ScaleMiddleware).
        self.state._hot = conf.hot()
        if sticky_primary:
            self.state.pin(STICKY)

    def __enter__(self) -> RoutingState:
        self._token = _state.set(self.state)
        return self.state

    def __exit__(self, *exc_info: object) -> None:
        _state.reset(self._token)


#: Why a request reads from the primary after its user wrote to a database without WAL positions.
STICKY = "the user wrote recently and the primary has no WAL position to wait for"


def mark_write(alias: str | None = None) -> None:
    """Record that the current request wrote, so its later reads and the user's next ones see it.

    :class:`~django_scale.routers.ReplicaRouter` calls this for every ORM write. Call it
    yourself after writing with raw SQL through ``connection.cursor()``.
    """
    state = _state.get()
    if state is not None and (alias is None or alias == conf.hot().primary):
        state.wrote = True
        state.pin("this request wrote")


def await_replica(state: RoutingState, reason: str) -> None:
    """Find a replica that has replayed *state*'s required position within ``REPLICA_WAIT``, or pin.

    Called once when a request or task opens its state, so that its reads need no I/O later.
    """
    if state.required_lsn is None:
        return
    replicas = list(conf.REPLICAS)
    alias = wait_for_replicas(replicas, state.required_lsn, conf.REPLICA_WAIT) if replicas else None
    if alias is None:
        state.pin(reason, fallback=True)
    else:
        state.replica = alias


# -- use_primary() / use_replica() ---------------------------------------------------------


class _Route:
    """A context manager and decorator that forces where reads go while it is active."""

    def __init__(self, target: Literal["primary", "replica"]) -> None:
        self.target = target
        self._tokens: list[contextvars.Token[Literal["primary", "replica"] | None]] = []

    def __enter__(self) -> None:
        self._tokens.append(_forced.set(self.target))

    def __exit__(self, *exc_info: object) -> None:
        _forced.reset(self._tokens.pop())

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...

    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        target = self.target
        # Each call enters a fresh instance: the decorated function may run in many threads
        # and tasks at once, and each must restore its own context.
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with _Route(target):
                    return await func(*args, **kwargs)

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            with _Route(target):
                return func(*args, **kwargs)

        return wrapper


def use_primary() -> _Route:
    """Send every read inside the block (or decorated function) to the primary.

    Use it for reads that must be exact, such as a check before a write. It nests with
    :func:`use_replica`: the innermost block wins, and each restores the outer one on exit.
    """
    return _Route("primary")


def use_replica() -> _Route:
    """Send reads inside the block to a replica even if this request wrote.

    For reads that may be a little stale, such as reports. Reads still go to the primary
    inside ``atomic()`` and when no replica is available.
    """
    return _Route("replica")


def forced_route() -> Literal["primary", "replica"] | None:
    """Return the target of the innermost active :func:`use_primary` / :func:`use_replica`."""
    return _forced.get()
