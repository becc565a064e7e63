"""``swr_cache_page``: cache a view's pages, judged on the final response."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, TypeVar, cast

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils import translation
from django.utils.cache import patch_cache_control, patch_vary_headers

from django_scale.cache.degrade import (
    UNSTORABLE_MEMORY,
    is_unstorable,
    log_page_once,
    remember_unstorable,
    unstorable,
)
from django_scale.cache.engine import (
    Deferred,
    Engine,
    LazyRefill,
    Refill,
    RefillMode,
    awaited,
    register,
    validate_options,
)
from django_scale.cache.keys import build_key, encode_key_parts, json_roundtrips
from django_scale.cache.page_refill import (
    CREDENTIAL_HEADERS,
    REFILL_ENVIRON_KEY,
    RefillHolder,
    render_through_stack,
)

logger = logging.getLogger("django_scale.cache")
P = ParamSpec("P")
R = TypeVar("R")


#
# The decorator renders the view and freezes the *view's* response (so on a hit every outer
# middleware runs again for that request), but whether the page may be stored is decided on
# the *final* response and request, after every middleware ran: ScaleMiddleware, the first
# entry of MIDDLEWARE, calls finish_page() with them. On a miss the decorator leaves a
# Deferred (the engine bound it to the claim) in the request's PageSlot; finish_page() judges
# and commits or abandons it. Refills render through the project's whole WSGI stack.

#: Response headers never stored with a cached page: they belong to one user or one response.
_PRIVATE_HEADERS = frozenset({"set-cookie", "date", "expires", "cache-control", "age"})
#: The request attribute ScaleMiddleware opens for the cached page of the request.
_SLOT_ATTRIBUTE = "_django_scale_page"
#: Paths of the views cached with swr_cache_page (for the system checks).
page_paths: set[str] = set()


class _Reason(NamedTuple):
    """Why a page may not be stored."""

    text: str
    #: Whether it holds for every visitor (the page uses the CSRF token, varies on an unlisted
    #: header, ...), not only for this one (their flash messages, their session being saved).
    every_visitor: bool = False


class UncacheableResponse(Exception):
    """A response that must not be cached (internal: the view's own response is served)."""

    def __init__(self, response: HttpResponseBase, reason: str) -> None:
        super().__init__(reason)
        self.response = response


@dataclass
class _Page:
    """What the final pass needs to know about the cached page a request served or rendered."""

    view: _PageView
    key: str
    #: The view's response in storable form (``None`` for a page served from the cache).
    frozen: Any = None
    #: This request won the claim: store the page through it, or give it up.
    deferred: Deferred | None = None
    #: This request is a refill's: hand the page to the holder.
    holder: RefillHolder | None = None
    #: Until when the served copy is fresh (a page served from the cache).
    fresh_until: float = 0.0


class PageSlot:
    """Room for the cached page of one request, opened by ScaleMiddleware as the request comes in.

    The view decorator puts a :class:`_Page` in it; ScaleMiddleware hands it to
    :func:`finish_page` with the final response.
    """

    # Class-level defaults and no __init__: one slot is opened per request, and creating it
    # then runs no Python code. Assignments shadow them on the instance.
    page: _Page | None = None
    #: A cached view already ran for this request: another one nested in it renders live.
    entered: bool = False

    @property
    def needs_io(self) -> bool:
        """Whether finishing reads the session or writes the cache (not just sets headers)."""
        return self.page is not None and self.page.frozen is not None


def open_page_slot(request: HttpRequest) -> PageSlot | None:
    """Give *request* a page slot; return it, or ``None`` when an outer ScaleMiddleware gave one."""
    if isinstance(getattr(request, _SLOT_ATTRIBUTE, None), PageSlot):
        return None
    slot = PageSlot()
    setattr(request, _SLOT_ATTRIBUTE, slot)
    return slot


def finish_page(slot: PageSlot, request: HttpRequest, response: HttpResponseBase) -> None:
    """Judge the final *response* to *request*, store or give up the page, set its caching headers.

    ScaleMiddleware calls it once every other middleware has run. A page served from the cache
    only gets its headers; one this request rendered is stored (under the claim it won) only
    if :meth:`_PageView.verdict` finds nothing of the visitor's in the final response.
    """
    page, slot.page = slot.page, None
    if page is None:
        return
    view = page.view
    if page.frozen is None:
        if response.status_code in (200, 304) and not response.streaming:
            view.patch_headers(request, response, page.fresh_until)
        return
    reason = view.verdict(request, response, page.frozen)
    if page.holder is not None:
        if reason is None and page.key != page.holder.key:
            reason = _Reason(
                "its request did not reproduce the variant being refilled (it maps to another key)"
            )
        if reason is None:
            page.holder.value = page.frozen
        else:
            page.holder.reason = reason.text
        return
    if page.deferred is None:
        return
    if reason is not None:
        page.deferred.abandon()
        if reason.every_visitor:
            # Every visitor's rendering would be refused alike: render it live for a while
            # instead of claiming, so concurrent requests do not queue behind each other's
            # claims (each renders, is refused and hands the claim on to the next).
            remember_unstorable(page.key, min(view.engine.lifetimes()[0], UNSTORABLE_MEMORY))
        log_page_once(view.path, reason.text, logging.WARNING)
        return
    view.patch_headers(request, response, page.deferred.commit(page.frozen))


def abandon_page(slot: PageSlot) -> None:
    """Give up the page of a request whose middleware raised: nothing is stored, the claim goes."""
    page, slot.page = slot.page, None
    if page is None:
        return
    if page.deferred is not None:
        page.deferred.abandon()
    if page.holder is not None:
        page.holder.reason = "a middleware raised after the view"


def reopen_page_slot(slot: PageSlot) -> None:
    """Empty *slot* for a second run of its request: nothing of the first run is stored.

    ScaleMiddleware runs a request again on the primary when a read failed on a replica. The
    first run's claim on the cache is given up, and the cached view may enter the slot again.
    """
    page, slot.page = slot.page, None
    slot.entered = False
    if page is not None and page.deferred is not None:
        page.deferred.abandon()


def _vary_names(headers: Any) -> set[str]:
    return {name.strip().lower() for name in headers.get("Vary", "").split(",") if name.strip()}


def _csrf_token_used(request: HttpRequest) -> bool:
    # get_token() (what {% csrf_token %} calls) flags the request for CsrfViewMiddleware to
    # send the cookie; the middleware resets the flag to False but leaves the key. Nothing
    # public says the token was used, and with CSRF_USE_SESSIONS a token read back from the
    # session sets no cookie. See django/middleware/csrf.py, get_token() and process_response()
    # (4.2 to 6.1); pinned by tests/test_isolation_pages.py.
    return "CSRF_COOKIE_NEEDS_UPDATE" in request.META


def _csp_nonce_used(request: HttpRequest) -> bool:
    """Whether the page used the Content-Security-Policy nonce of the request (Django 6.0+)."""
    try:
        from django.middleware.csp import get_nonce  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    # LazyNonce is true once generated (django/utils/csp.py), which build_policy() never does.
    return bool(get_nonce(request))


def _has_messages(request: HttpRequest) -> bool:
    """Whether the request has flash messages, read or not (``{% if messages %}`` reads no flag)."""
    from django.contrib.messages import get_messages

    return len(get_messages(request)) > 0


def _user_pk(request: HttpRequest) -> Any:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    return user.pk


def _freeze_response(response: HttpResponseBase) -> Any:
    """Return the storable form of the view's *response*, or raise :class:`UncacheableResponse`."""
    render = getattr(response, "render", None)
    if render is not None and not getattr(response, "is_rendered", True):
        render()
    if response.streaming or not isinstance(response, HttpResponse):
        raise UncacheableResponse(response, "it is streaming")
    if response.status_code != 200:
        raise UncacheableResponse(response, f"its status is {response.status_code}")
    headers = [(k, v) for k, v in response.items() if k.lower() not in _PRIVATE_HEADERS]
    return (response.status_code, headers, response.content)


def _thaw_response(frozen: Any) -> HttpResponse:
    status, headers, content = frozen
    response = HttpResponse(content, status=status)
    for name, value in headers:
        response[name] = value
    return response


class _PageView:
    """A view cached with :func:`swr_cache_page`: its key, its verdict and its headers."""

    def __init__(
        self,
        view: Callable[..., Any],
        path: str,
        version: int | str,
        vary_on: Sequence[str],
        shared: bool,
        stale_if_error: float,
    ) -> None:
        self.view = view
        self.path = path
        self.version = version
        self.is_async = inspect.iscoroutinefunction(view)
        self.headers = [name for name in vary_on if name != "user"]
        self.per_user = "user" in vary_on
        self.shared = shared
        self.stale_if_error = stale_if_error
        #: What the served response varies on (Cookie: the user comes from the session cookie).
        self.vary = [*self.headers, *(["Cookie"] if self.per_user else [])]
        #: Vary names the key covers whatever the response.
        self.covered = frozenset(name.lower() for name in self.vary)
        self.keyed_authorization = "authorization" in self.covered
        #: Credentials in the key: never sent through the broker, so refilled inline.
        self.credentials = bool(self.covered & CREDENTIAL_HEADERS) or self.per_user
        self.engine: Engine

    # -- the key: one implementation, for requests and for refill messages --------------------

    def parts(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Return what the key of *request* is made of; also a refill's JSON-able arguments."""
        parts: dict[str, Any] = {
            "host": request.get_host(),
            "path": request.path,
            "path_info": request.path_info,
            "query": request.META.get("QUERY_STRING", ""),
            "secure": request.is_secure(),
            "args": list(args),
            "kwargs": kwargs,
            "headers": {name: request.headers.get(name) for name in self.headers},
        }
        if settings.USE_I18N:
            # The language LocaleMiddleware activated, from the URL, the cookie or the header.
            parts["language"] = translation.get_language()
        if self.per_user:
            parts["user"] = _user_pk(request)
        return parts

    def key_of(self, parts: Any) -> str:
        """Return the cache key of *parts* (a request's, or a refill message's arguments)."""
        return build_key(self.path, self.version, encode_key_parts(parts))

    def key(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """Return the cache key of *request* (the active language included)."""
        return self.key_of(self.parts(request, args, kwargs))

    # -- rendering ---------------------------------------------------------------------------------

    def call(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> HttpResponseBase:
        response = self.view(request, *args, **kwargs)
        if self.is_async:
            response = async_to_sync(awaited)(response)
        return cast(HttpResponseBase, response)

    def render(self, request: HttpRequest, args: Sequence[Any], kwargs: dict[str, Any]) -> Deferred:
        """Render the view for a caller that won the claim; the final pass stores it, or not."""
        response = self.call(request, args, kwargs)
        return Deferred((response, _freeze_response(response)))

    # -- the final test ------------------------------------------------------------------------------

    def verdict(self, request: HttpRequest, response: HttpResponseBase, frozen: Any) -> _Reason | None:
        """Return why the final *response* to *request* must not be stored, or ``None`` if it may be.

        Every middleware has run: the cookies it sets, its ``Vary``, the session and the
        messages it touched are all visible. One list of reasons, in docs/caching.md.
        """
        if response.streaming or response.status_code not in (200, 304):
            return _Reason(f"the final response's status is {response.status_code}")
        if _csrf_token_used(request):
            return _Reason("it used the CSRF token ({% csrf_token %} or get_token())", every_visitor=True)
        if response.cookies:
            return _Reason(f"the final response sets cookies ({', '.join(sorted(response.cookies))})")
        if _csp_nonce_used(request):
            return _Reason("it used the Content-Security-Policy nonce", every_visitor=True)
        control = response.get("Cache-Control", "").lower()
        if "private" in control or "no-store" in control:
            return _Reason("its Cache-Control is private or no-store", every_visitor=True)
        if "HTTP_AUTHORIZATION" in request.META and not self.keyed_authorization:
            return _Reason("the request carries an Authorization header (add it to vary_on)")
        if not self.shared:
            session = getattr(request, "session", None)
            # SessionBase.accessed is what SessionMiddleware adds "Vary: Cookie" from.
            if not self.per_user and session is not None and getattr(session, "accessed", False):
                return _Reason(
                    "it read the session, which includes request.user (vary_on 'user', or shared=True)",
                    every_visitor=True,
                )
            covered = set(self.covered)
            if settings.USE_I18N:
                covered.add("accept-language")  # the active language is part of the key
            stored_vary = {"Vary": ", ".join(value for name, value in frozen[1] if name.lower() == "vary")}
            if "accept-encoding" not in _vary_names(stored_vary):
                # The stored body is the view's: GZipMiddleware compresses each hit anew.
                covered.add("accept-encoding")
            uncovered = _vary_names(response) - covered
            if uncovered:
                return _Reason(
                    f"it varies on {', '.join(sorted(uncovered))}, which vary_on does not list",
                    every_visitor=True,
                )
        if _has_messages(request):
            return _Reason("the request has flash messages")
        return None

    def patch_headers(self, request: HttpRequest, response: HttpResponseBase, fresh_until: float) -> None:
        """Set the caching headers of a page that is (or could have been) stored."""
        control = response.get("Cache-Control", "").lower()
        if "no-store" in control:
            return
        fresh, stale = self.engine.lifetimes()
        max_age = max(0, int(fresh_until - time.time())) if fresh_until else 0
        options: dict[str, Any] = {"max_age": max_age, "stale_while_revalidate": int(stale - fresh)}
        if self.stale_if_error:
            options["stale_if_error"] = int(self.stale_if_error)
        # Never public with a Set-Cookie (a middleware may set one on a hit).
        if self.per_user or response.cookies or "private" in control:
            options["private"] = True
        else:
            options["public"] = True
        patch_cache_control(response, **options)
        vary = self.vary
        if settings.USE_I18N and settings.LANGUAGE_COOKIE_NAME in request.COOKIES:
            # The language may come from the cookie, which LocaleMiddleware's Vary does not say.
            vary = [*vary, "Cookie"]
        if vary:
            patch_vary_headers(response, vary)

    # -- the request path ------------------------------------------------------------------------------

    def respond(
        self, request: HttpRequest, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> HttpResponseBase:
        if request.method not in ("GET", "HEAD"):
            return self.call(request, args, kwargs)
        slot = getattr(request, _SLOT_ATTRIBUTE, None)
        holder = request.META.get(REFILL_ENVIRON_KEY)
        if not isinstance(slot, PageSlot):
            # Imported here: the middleware imports this module.
            from django_scale.middleware import _is_first_middleware

            if _is_first_middleware():
                # The request came in before this view was imported (its first request in the
                # process imported the URLconf): ScaleMiddleware opens no slot while no view
                # is cached. The next requests get one.
                return self.call(request, args, kwargs)
            reason = (
                "django_scale.middleware.ScaleMiddleware is not the first entry of MIDDLEWARE (or "
                "the second, after MetricsMiddleware), so the final response cannot be judged; "
                "the page is served uncached"
            )
            if isinstance(holder, RefillHolder):
                holder.reason = reason
            log_page_once(self.path, reason, logging.WARNING)
            return self.call(request, args, kwargs)
        if slot.entered:
            return self.call(request, args, kwargs)  # a cached view called by another one
        slot.entered = True
        if isinstance(holder, RefillHolder):
            return self.render_for_refill(slot, holder, request, args, kwargs)
        if "HTTP_AUTHORIZATION" in request.META and not self.keyed_authorization:
            # Credentials: never served a shared page, never stored as one.
            return self.call(request, args, kwargs)
        parts = self.parts(request, args, kwargs)
        if self.per_user and parts["user"] is None and settings.SESSION_COOKIE_NAME in request.COOKIES:
            # An anonymous session may hold the visitor's data: not the anonymous entry's.
            return self.call(request, args, kwargs)
        key = self.key_of(parts)
        if unstorable and is_unstorable(key):
            # Refused for every visitor moments ago: no claim, no cache, no caching headers.
            return self.call(request, args, kwargs)
        # Worked out only when a stale page needs a refill, never on a hit.
        spec = LazyRefill(self.refill_spec, parts, None, None) if self.celery else None
        try:
            result = self.engine.fetch(key, functools.partial(self.render, request, args, kwargs), spec)
        except UncacheableResponse as uncacheable:
            logger.debug("not caching %s: %s", request.path, uncacheable)
            return uncacheable.response
        if isinstance(result.value, Deferred):
            response, frozen = result.value.payload
            slot.page = _Page(self, key, frozen=frozen, deferred=result.value)
            return cast(HttpResponseBase, response)
        slot.page = _Page(self, key, fresh_until=result.fresh_until)
        return _thaw_response(result.value)

    def render_for_refill(
        self,
        slot: PageSlot,
        holder: RefillHolder,
        request: HttpRequest,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> HttpResponseBase:
        """Render live, without reading the cache, for a refill that dispatched this request."""
        key = self.key(request, args, kwargs)
        response = self.call(request, args, kwargs)
        try:
            frozen = _freeze_response(response)
        except UncacheableResponse as uncacheable:
            holder.reason = str(uncacheable)
            return response
        slot.page = _Page(self, key, frozen=frozen, holder=holder)
        return response

    def refill_spec(self, parts: dict[str, Any], *_: Any) -> Refill | None:
        """Return the Celery refill of *parts*, or ``None`` when JSON cannot carry them (inline)."""
        return Refill(self.path, parts) if json_roundtrips(parts) else None

    @property
    def celery(self) -> bool:
        """Whether stale entries refill through Celery (else the claim holder renders inline)."""
        return self.engine.refill == "celery" and not self.credentials and "<locals>" not in self.path

    # -- the refill: a GET through the project's own WSGI application ---------------------------------

    def rebuild(self, arguments: Any) -> Callable[[], Any]:
        return functools.partial(render_through_stack, self.path, self.key_of, arguments)


def swr_cache_page(
    fresh: float | None = None,
    stale: float | None = None,
    *,
    vary_on: Sequence[str] = (),
    stale_if_error: float = 0,
    cache: str | None = None,
    shared: bool = False,
    version: int | str = 1,
    refill: RefillMode = "celery",
    wait: float = 5.0,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Cache a view's GET responses with stale-while-revalidate, like ``cache_page``.

    Needs ``django_scale.middleware.ScaleMiddleware`` as the first entry of ``MIDDLEWARE``:
    the page is stored only if the *final* response, after every middleware, carries nothing
    of the visitor's (no cookie set, no CSRF token, no session read, no flash message, no
    ``Vary`` the key does not cover, no ``Authorization``; see docs/caching.md). Without it,
    pages are served uncached (check W210).

    The key is the view, the host, the path, the query string, the active language (with
    ``USE_I18N``) and the request headers named in *vary_on* (``"user"`` means the user's
    primary key; the response is then marked ``private``, and an anonymous visitor with a
    session is never served the anonymous entry). A request with an ``Authorization`` header
    is served uncached unless *vary_on* names it. *shared* says one response fits every user
    even though it read the session or varies on an unlisted header (never: cookies, CSRF
    token, messages). Stored pages go out with ``Cache-Control: max-age, stale-while-revalidate,
    stale-if-error`` (``public``, or ``private`` when the final response sets a cookie or the
    page varies on the user) and ``Vary`` on *vary_on*.

    Celery refills send a GET through the project's own WSGI application, every middleware
    included, with the key's host, path, query, language and *vary_on* headers and no cookies;
    the result is stored only if it passes the same test and maps to the same key. Pages whose
    key holds credentials (*vary_on* with ``"user"``, ``"Authorization"`` or ``"Cookie"``) and
    ``refill="inline"`` ones are refilled by the request that wins the claim, which renders
    the page live through its own middleware.
    """
    validate_options(fresh, stale, stale_if_error, refill, "recompute", wait, 0.1, 60.0)

    def decorate(view: Callable[P, R]) -> Callable[P, R]:
        path = f"{view.__module__}.{view.__qualname__}"
        page = _PageView(view, path, version, vary_on, shared, stale_if_error)
        page.engine = register(
            Engine(
                path=path,
                fresh=fresh,
                stale=stale,
                stale_if_error=stale_if_error,
                cache=cache,
                refill=refill,
                wait=wait,
                # A page keyed by credentials is never refilled by Celery: a message is refused.
                rebuild=None if page.credentials else page.rebuild,
                key_of=page.key_of,
            )
        )
        page_paths.add(path)

        wrapper: Any
        if page.is_async:

            @functools.wraps(view)
            async def async_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
                return await sync_to_async(page.respond, thread_sensitive=True)(request, args, kwargs)

            wrapper = async_view
        else:

            @functools.wraps(view)
            def sync_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
                return page.respond(request, args, kwargs)

            wrapper = sync_view
        wrapper._django_scale_engine = page.engine
        wrapper._django_scale_page = page
        return cast("Callable[P, R]", wrapper)

    return decorate
