"""The logic behind ``{% swrcache %}``: fragment keys, the engine and the per-visitor guard.

``django_scale.templatetags.scale`` registers and parses the tag; the node it makes,
:class:`SWRCacheNode`, and what it needs live here.

Two things keep one visitor's fragment from another:

* **Keys**: a vary value must have a stable key (see :func:`key_value`); the active language
  and time zone are part of every key.
* **Per-visitor reads**: the fragment is rendered with the visitor's context variables
  (``csrf_token``, ``messages``, ``user``, ``perms``, ``request``, ``csp_nonce``) and
  ``context.request`` watched. A render that read one its key does not cover is served to
  its visitor and never stored. The user is covered when a vary value is ``user``,
  ``user.pk``, ``user.id``, ``request.user``, ``request.user.pk`` or ``request.user.id``;
  the CSRF token, messages, the session, cookies and headers never are.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from copy import copy
from typing import Any

from django import template
from django.conf import settings
from django.http import HttpRequest
from django.template.base import FilterExpression, NodeList
from django.template.context import Context
from django.utils import timezone, translation
from django.utils.functional import SimpleLazyObject

from django_scale import metrics
from django_scale.cache.engine import Engine, validate_options
from django_scale.cache.keys import UnstableValue, build_key, encode_key_parts, key_value
from django_scale.exceptions import CacheArgumentError, FragmentKeyError, PerUserFragmentError

__all__ = ["KEY_VERSION", "SWRCacheNode", "fragment_engine", "reset_state"]

logger = logging.getLogger("django_scale.cache")

#: Part of every fragment key; 2 since keys bind the model's app label, the language and the
#: time zone (entries written under version 1 are never read).
KEY_VERSION = 2


def _variant() -> list[Any]:
    """Return what every fragment varies on: the active language and time zone."""
    return [
        translation.get_language() if settings.USE_I18N else None,
        timezone.get_current_timezone_name() if settings.USE_TZ else None,
    ]


# -- Per-visitor reads -----------------------------------------------------------------------------

#: Context variables of one visitor (or one response) that no vary value can cover.
_VISITOR_VARIABLES = {
    "csrf_token": "the CSRF token",
    "messages": "flash messages",
    "csp_nonce": "the CSP nonce",
}
#: Request attributes that describe the URL, not the visitor: reading them is not per-user.
#: ({% url %} reads current_app and resolver_match, {% querystring %} reads GET.)
_URL_ATTRIBUTES = frozenset(
    {
        "GET",
        "LANGUAGE_CODE",
        "build_absolute_uri",
        "content_type",
        "current_app",
        "get_full_path",
        "get_full_path_info",
        "get_host",
        "get_port",
        "is_secure",
        "method",
        "path",
        "path_info",
        "resolver_match",
        "scheme",
        "urlconf",
    }
)
_REQUEST_CHANNELS = {
    "session": "the session",
    "COOKIES": "cookies",
    "META": "request headers (request.META)",
    "headers": "request headers",
    "_messages": "flash messages",
    "_csp_nonce": "the CSP nonce",
}
_USER = "the user"
_REQUEST_USER = "request.user"
#: The vary expressions that cover the user: the context variable ``user`` or ``request.user``,
#: the object itself (None) or its primary key.
_USER_EXPRESSIONS = {
    "user": ("user", None),
    "user.pk": ("user", "pk"),
    "user.id": ("user", "id"),
    "request.user": ("request.user", None),
    "request.user.pk": ("request.user", "pk"),
    "request.user.id": ("request.user", "id"),
}


class _Reads:
    """What one render read of its visitor, and which channel each user object is."""

    __slots__ = ("channels", "users")

    def __init__(self) -> None:
        self.channels: set[str] = set()
        #: "user" / "request.user" -> (the user object, its channel)
        self.users: dict[str, tuple[Any, str]] = {}

    def watch(self, value: Any, channel: str) -> Any:
        """Return *value* behind a lazy object that records *channel* when it is used."""

        def read() -> Any:
            self.channels.add(channel)
            return value

        return SimpleLazyObject(read)


class _WatchedRequest:
    """The request as a fragment sees it: reading what belongs to the visitor is recorded.

    Attributes that describe the URL pass through; ``user`` is the watched user; anything
    else (the session, cookies, headers, private attributes that tags read) is recorded.
    """

    __slots__ = ("_django_scale_reads", "_django_scale_request", "_django_scale_user")

    def __init__(self, request: Any, reads: _Reads, user: Any) -> None:
        object.__setattr__(self, "_django_scale_request", request)
        object.__setattr__(self, "_django_scale_reads", reads)
        object.__setattr__(self, "_django_scale_user", user)

    def __getattr__(self, name: str) -> Any:
        if name == "user" and self._django_scale_user is not None:
            return self._django_scale_user
        if name not in _URL_ATTRIBUTES:
            self._django_scale_reads.channels.add(_REQUEST_CHANNELS.get(name, f"request.{name}"))
        return getattr(self._django_scale_request, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._django_scale_request, name, value)

    def __repr__(self) -> str:
        return repr(self._django_scale_request)


def _watched_context(context: Context, reads: _Reads) -> Context:
    """Return a copy of *context* whose per-visitor variables and request record their use.

    ``Context`` implements ``__copy__`` (a shallow copy of its stack): the copy gets the
    watched values on a pushed layer and the watched ``request`` attribute; the caller's
    context is not changed.
    """
    overrides: dict[str, Any] = {}
    for name, channel in _VISITOR_VARIABLES.items():
        if name in context:
            overrides[name] = reads.watch(context[name], channel)
    # The request: the context's (RequestContext) or, in a plain Context, a variable.
    request = getattr(context, "request", None)
    variable = context.get("request")
    if request is None and isinstance(variable, HttpRequest):
        request = variable
    user = context.get("user")
    request_user = getattr(request, "user", None) if request is not None else None
    watched_user = watched_request_user = None
    if user is not None:
        reads.users["user"] = (user, _USER)
        overrides["user"] = watched_user = reads.watch(user, _USER)
    if request_user is not None and request_user is user:
        reads.users["request.user"] = (user, _USER)
        watched_request_user = watched_user
    elif request_user is not None:
        reads.users["request.user"] = (request_user, _REQUEST_USER)
        watched_request_user = reads.watch(request_user, _REQUEST_USER)
    if "perms" in context:
        perms = context["perms"]
        owner = getattr(perms, "user", None)
        channel = next((c for obj, c in reads.users.values() if owner is not None and obj is owner), "perms")
        overrides["perms"] = reads.watch(perms, channel)
    watched = copy(context)
    watched_request = None if request is None else _WatchedRequest(request, reads, watched_request_user)
    if getattr(context, "request", None) is not None:
        watched.request = watched_request  # type: ignore[attr-defined]
    if variable is not None:
        overrides["request"] = (
            watched_request if variable is request else reads.watch(variable, "the request")
        )
    watched.update(overrides)
    return watched


_CHANNEL_HINTS = {
    "the CSRF token": "a token belongs to one response: move {% csrf_token %} out of the fragment",
    "flash messages": "move the messages out of the fragment",
    "the CSP nonce": "a nonce belongs to one response: move it out of the fragment",
    _USER: "add user (or user.pk) to its vary values, or move what reads the user out of the fragment",
    _REQUEST_USER: "add request.user (or request.user.pk) to its vary values",
}
_DEFAULT_HINT = "move what reads it out of the fragment"

# (template, fragment, what) already logged; bounded so that dynamic names cannot grow it.
_logged: set[tuple[str, str, str]] = set()
_logged_lock = threading.Lock()
LOGGED_MAX = 4096


def _log_once(where: tuple[str, str, str], message: str) -> None:
    with _logged_lock:
        if where in _logged:
            return
        if len(_logged) >= LOGGED_MAX:
            _logged.clear()
        _logged.add(where)
    logger.warning("%s", message)


#: Seconds (at most ``fresh``) a process renders a fragment key uncached after a render of it
#: read a visitor's data, instead of claiming it in the cache again.
PER_USER_MEMORY = 300.0
_per_user_keys: dict[str, float] = {}


def _recently_per_user(key: str) -> bool:
    until = _per_user_keys.get(key)
    return until is not None and time.monotonic() < until


def _remember_per_user(key: str, seconds: float) -> None:
    if len(_per_user_keys) >= LOGGED_MAX:
        _per_user_keys.clear()
    _per_user_keys[key] = time.monotonic() + seconds


def reset_state() -> None:
    """Forget what was logged and which fragments were per-user (for tests)."""
    with _logged_lock:
        _logged.clear()
    _per_user_keys.clear()


class _PerUserRender(Exception):
    """A render that read something of its visitor (internal: served, never stored)."""

    def __init__(self, text: str) -> None:
        super().__init__("per-user render")
        self.text = text


class SWRCacheNode(template.Node):
    """The node of one ``{% swrcache %}`` block."""

    def __init__(
        self,
        nodelist: NodeList,
        fresh: FilterExpression,
        stale: FilterExpression,
        name: FilterExpression,
        vary_on: list[FilterExpression],
        using: FilterExpression | None,
        vary_texts: list[str] | None = None,
    ) -> None:
        self.nodelist = nodelist
        self.fresh, self.stale, self.name = fresh, stale, name
        self.vary_on = vary_on
        self.using = using
        #: For each vary value that is the user or its primary key: its index, which user
        #: ("user" or "request.user") and which attribute (None for the object itself).
        self.user_vary = [
            (index, *_USER_EXPRESSIONS[text])
            for index, text in enumerate(vary_texts or ())
            if text in _USER_EXPRESSIONS
        ]

    def _seconds(self, expression: FilterExpression, context: Context, what: str) -> float:
        value = expression.resolve(context)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise CacheArgumentError(
                f"{{% swrcache %}} {what} must be a number of seconds, not {value!r}."
            ) from None

    def _template_name(self) -> str:
        origin = getattr(self, "origin", None)
        return str(getattr(origin, "template_name", None) or getattr(origin, "name", None) or "?")

    def render(self, context: Context) -> str:
        fresh = self._seconds(self.fresh, context, "fresh (first argument)")
        stale = self._seconds(self.stale, context, "stale (second argument)")
        using = self.using.resolve(context) if self.using is not None else None
        engine = fragment_engine(fresh, stale, using)
        name = str(self.name.resolve(context))
        values = [expression.resolve(context) for expression in self.vary_on]
        try:
            parts = [name, [key_value(value) for value in values], *_variant()]
        except UnstableValue as unstable:
            return self._render_unkeyed(context, name, str(unstable))
        key = build_key(engine.path, KEY_VERSION, encode_key_parts(parts))
        if _recently_per_user(key):
            # Its last render read a visitor's data: render it for this visitor, without the
            # cache's claim, so that concurrent visitors do not queue behind each other.
            metrics.increment("swr.fragment.per_user")
            return self.nodelist.render(context)
        try:
            return str(engine.fetch(key, lambda: self._render_watched(context, name, values), None).value)
        except _PerUserRender as per_user:
            _remember_per_user(key, min(fresh, PER_USER_MEMORY))
            return per_user.text

    def _render_unkeyed(self, context: Context, name: str, unstable: str) -> str:
        template_name = self._template_name()
        message = (
            f"{{% swrcache %}} fragment {name!r} in template {template_name!r} cannot be cached: a "
            f"vary value is {unstable}. Vary on str, int, float, bool, None, Decimal, date, "
            "datetime, UUID, saved model instances or lists of these."
        )
        if settings.DEBUG:
            raise FragmentKeyError(message)
        metrics.increment("swr.fragment.unstable_key")
        _log_once((template_name, name, "key"), message + " It is rendered uncached.")
        return self.nodelist.render(context)

    def _render_watched(self, context: Context, name: str, values: list[Any]) -> str:
        """Render the fragment; raise :class:`_PerUserRender` if it read an uncovered channel."""
        reads = _Reads()
        text = self.nodelist.render(_watched_context(context, reads))
        uncovered = reads.channels - self._covered(reads, values)
        if not uncovered:
            return text
        template_name = self._template_name()
        channels = sorted(uncovered)
        hints = "; ".join(sorted({_CHANNEL_HINTS.get(c, _DEFAULT_HINT) for c in channels}))
        message = (
            f"{{% swrcache %}} fragment {name!r} in template {template_name!r} read "
            f"{', '.join(channels)}, which its vary values do not cover ({hints})."
        )
        if settings.DEBUG:
            raise PerUserFragmentError(message)
        metrics.increment("swr.fragment.per_user")
        _log_once(
            (template_name, name, ",".join(channels)),
            message + " Such a render is served to its visitor and never stored.",
        )
        raise _PerUserRender(text)

    def _covered(self, reads: _Reads, values: list[Any]) -> set[str]:
        """Return the user channels that a vary value of this render covers."""
        covered: set[str] = set()
        for index, which, attribute in self.user_vary:
            found = reads.users.get(which)
            if found is None:
                continue
            user, channel = found
            value = values[index]
            # The expression was resolved from this very object; still check, so that
            # user.id covers only where id is the primary key.
            if value is user if attribute is None else value == user.pk:
                covered.add(channel)
        return covered


def fragment_engine(fresh: float, stale: float, cache: str | None) -> Engine:
    """Return the engine of ``{% swrcache %}`` fragments: refilled inline by the claim holder."""
    return _fragment_engine(float(fresh), float(stale), cache)


@functools.lru_cache(maxsize=64)
def _fragment_engine(fresh: float, stale: float, cache: str | None) -> Engine:
    validate_options(fresh, stale, 0, "inline", "recompute", 5.0, 0.1, 60.0)
    return Engine(
        path="django_scale.templatetags.swrcache", fresh=fresh, stale=stale, cache=cache, refill="inline"
    )
