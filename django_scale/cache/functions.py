"""``@stale_while_revalidate``: cache a function's results."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from asgiref.sync import async_to_sync, sync_to_async

from django_scale.cache.engine import (
    BrokerFallback,
    Engine,
    LazyRefill,
    Refill,
    RefillMode,
    awaited,
    register,
    validate_options,
)
from django_scale.cache.keys import build_key, encode_key_parts, json_roundtrips
from django_scale.exceptions import CacheKeyError

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


# -- @stale_while_revalidate ---------------------------------------------------------------------


class SWRFunction(Protocol[P, R_co]):
    """A function wrapped by :func:`stale_while_revalidate`, with its cache controls.

    For an async function, calling it and :meth:`refresh` return awaitables.
    """

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Return the cache key of these arguments (without the cache's ``KEY_PREFIX``)."""

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the entry of these arguments; a refill already running cannot write it back."""

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Recompute the entry of these arguments now, store and return it."""


#: Argument types whose keys are memoized: immutable, hashable, and compared with their type.
_PLAIN = frozenset({str, int, float, bool, type(None)})
#: How many keys a function memoizes before it starts over.
KEY_MEMO_SIZE = 4096


class _Binder:
    """Binds call arguments to a signature, so ``f(1)`` and ``f(a=1)`` are one key."""

    def __init__(self, func: Callable[..., Any], path: str, version: object, key: Callable[..., str] | None):
        self.signature = inspect.signature(func)
        self.path = path
        self.version = version
        self.custom_key = key
        self.memo: dict[tuple[tuple[type, Any], ...], str] = {}
        parameters = list(self.signature.parameters.values())
        self.names = tuple(p.name for p in parameters)
        # Plain positional parameters only: a full positional call binds without inspect.
        self.simple = all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters
        ) and not any(p.name.startswith("\x00") for p in parameters)

    def bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, inspect.BoundArguments | None]:
        if self.custom_key is not None:
            text = self.custom_key(*args, **kwargs)
            if not isinstance(text, str):
                raise CacheKeyError(
                    f"The key= function of {self.path} returned {type(text).__name__}, not str."
                )
            return build_key(self.path, self.version, text), None
        if self.simple and not kwargs and len(args) == len(self.names):
            # Memoized for plain values, by value and exact type (1, 1.0 and True differ).
            memo_key = tuple((type(arg), arg) for arg in args)
            if all(type(arg) in _PLAIN for arg in args):
                key = self.memo.get(memo_key)
                if key is None:
                    if len(self.memo) >= KEY_MEMO_SIZE:
                        self.memo.clear()
                    key = self.memo[memo_key] = build_key(
                        self.path, self.version, encode_key_parts(dict(zip(self.names, args, strict=True)))
                    )
                return key, None
            return build_key(
                self.path, self.version, encode_key_parts(dict(zip(self.names, args, strict=True)))
            ), None
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{self.path}(): {error}") from None
        bound.apply_defaults()
        return build_key(self.path, self.version, encode_key_parts(bound.arguments)), bound

    def key_of(self, arguments: Any) -> str:
        """Return the key of a refill's JSON arguments: :meth:`bind`'s, as on the read path.

        Raise :class:`~django_scale.exceptions.CacheKeyError` or ``TypeError`` for arguments
        that are not ``{"args": [...], "kwargs": {...}}`` or do not bind to the signature.
        """
        if (
            not isinstance(arguments, dict)
            or set(arguments) != {"args", "kwargs"}
            or not isinstance(arguments["args"], list)
            or not isinstance(arguments["kwargs"], dict)
            or not all(isinstance(name, str) for name in arguments["kwargs"])
        ):
            raise CacheKeyError(f"{self.path}: refill arguments are not {{'args': [...], 'kwargs': {{...}}}}")
        return self.bind(tuple(arguments["args"]), dict(arguments["kwargs"]))[0]

    def refill_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], bound: inspect.BoundArguments | None
    ) -> Any:
        """Return the JSON-able arguments a Celery refill calls the function with, or ``None``."""
        if bound is not None:
            args, kwargs = tuple(bound.args), dict(bound.kwargs)
        arguments = {"args": list(args), "kwargs": kwargs}
        if not json_roundtrips(arguments):
            return None
        return arguments


@overload
def stale_while_revalidate(func: Callable[P, R], /) -> SWRFunction[P, R]: ...


@overload
def stale_while_revalidate(
    *,
    fresh: float | None = None,
    stale: float | None = None,
    stale_if_error: float = 0,
    cache: str | None = None,
    version: int | str = 1,
    key: Callable[..., str] | None = None,
    refill: RefillMode = "celery",
    on_broker_error: BrokerFallback = "recompute",
    wait: float = 5.0,
    jitter: float = 0.1,
    refill_timeout: float = 60.0,
) -> Callable[[Callable[P, R]], SWRFunction[P, R]]: ...


def stale_while_revalidate(
    func: Callable[P, R] | None = None,
    /,
    *,
    fresh: float | None = None,
    stale: float | None = None,
    stale_if_error: float = 0,
    cache: str | None = None,
    version: int | str = 1,
    key: Callable[..., str] | None = None,
    refill: RefillMode = "celery",
    on_broker_error: BrokerFallback = "recompute",
    wait: float = 5.0,
    jitter: float = 0.1,
    refill_timeout: float = 60.0,
) -> SWRFunction[P, R] | Callable[[Callable[P, R]], SWRFunction[P, R]]:
    """Cache a function's results: serve fresh values, serve stale ones while Celery refills them.

    :param fresh: seconds a value is served without a refill (default ``SWR_FRESH``).
    :param stale: the oldest age, in seconds, a value is served at all (default ``SWR_STALE``);
        between *fresh* and *stale* it is served while exactly one refill runs.
    :param stale_if_error: seconds past *stale* a value is still served when recomputing it
        raises (HTTP's ``stale-if-error``).
    :param cache: the cache alias (default ``CACHE_ALIAS``).
    :param version: part of every key; change it when the function's return value changes shape.
    :param key: a function of the same arguments returning a ``str`` to use instead of the
        arguments (the function's path and *version* are still part of the key).
    :param refill: ``"celery"`` (the task ``django_scale.refresh``) or ``"inline"`` (the caller
        that wins the claim recomputes before returning).
    :param on_broker_error: when the task cannot be sent, ``"recompute"`` inline (the claim
        holder only) or ``"serve_stale"`` and retry after a backoff.
    :param wait: seconds a caller waits on a cold miss for another caller's computation
        before computing itself.
    :param jitter: the fraction of *fresh* taken off at random, so keys written together do
        not go stale together.
    :param refill_timeout: seconds a claim lasts: longer than the function can take.
    """
    validate_options(fresh, stale, stale_if_error, refill, on_broker_error, wait, jitter, refill_timeout)

    def decorate(function: Callable[P, R]) -> SWRFunction[P, R]:
        path = f"{function.__module__}.{function.__qualname__}"
        binder = _Binder(function, path, version, key)
        is_async = inspect.iscoroutinefunction(function)
        call: Callable[..., Any] = function

        def run_sync(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
            """Call the function from sync code (an async one on the caller's event loop)."""
            if is_async:
                # The coroutine is created here, only when a computation is needed.
                return async_to_sync(awaited)(call(*args, **kwargs))
            return call(*args, **kwargs)

        def rebuild(arguments: Any) -> Callable[[], Any]:
            return functools.partial(run_sync, arguments["args"], arguments["kwargs"])

        engine = register(
            Engine(
                path=path,
                fresh=fresh,
                stale=stale,
                stale_if_error=stale_if_error,
                cache=cache,
                refill=refill,
                on_broker_error=on_broker_error,
                wait=wait,
                jitter=jitter,
                refill_timeout=refill_timeout,
                rebuild=rebuild,
                key_of=binder.key_of,
            )
        )

        def refill_spec(args: tuple[Any, ...], kwargs: dict[str, Any], bound: Any) -> Refill | None:
            if "<locals>" in path or refill != "celery":
                return None  # the task could not find it: refill inline
            arguments = binder.refill_arguments(args, kwargs, bound)
            return None if arguments is None else Refill(path, arguments)

        wrapper: Any
        if is_async:

            @functools.wraps(function)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, bound = binder.bind(args, kwargs)
                compute = functools.partial(run_sync, args, kwargs)
                fetch = sync_to_async(engine.fetch, thread_sensitive=False)
                result = await fetch(key_text, compute, LazyRefill(refill_spec, args, kwargs, bound))
                return result.value

            async def arefresh(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, _ = binder.bind(args, kwargs)
                compute = functools.partial(run_sync, args, kwargs)
                return await sync_to_async(engine.refresh, thread_sensitive=False)(key_text, compute)

            wrapper = async_wrapper
            wrapper.refresh = arefresh
        else:

            @functools.wraps(function)
            def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, bound = binder.bind(args, kwargs)
                return engine.fetch(
                    key_text,
                    functools.partial(function, *args, **kwargs),
                    LazyRefill(refill_spec, args, kwargs, bound),
                ).value

            def refresh(*args: P.args, **kwargs: P.kwargs) -> Any:
                key_text, _ = binder.bind(args, kwargs)
                return engine.refresh(key_text, functools.partial(function, *args, **kwargs))

            wrapper = sync_wrapper
            wrapper.refresh = refresh

        def key_of(*args: P.args, **kwargs: P.kwargs) -> str:
            return binder.bind(args, kwargs)[0]

        def invalidate(*args: P.args, **kwargs: P.kwargs) -> None:
            engine.invalidate(binder.bind(args, kwargs)[0])

        wrapper.key = key_of
        wrapper.invalidate = invalidate
        wrapper._django_scale_engine = engine
        return cast("SWRFunction[P, R]", wrapper)

    if func is not None:
        return decorate(func)
    return decorate
