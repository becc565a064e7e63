"""Page refills: render a stale page again through the project's whole WSGI stack.

A Celery refill of a page cached with :func:`~django_scale.cache.swr_cache_page` sends a GET
with the key's host, path, query, language and headers (never cookies or credentials)
through the project's WSGI application, every middleware included; the cached view hands
what it rendered to the :class:`RefillHolder` in the environ, once ScaleMiddleware judged
the final response.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.utils import translation

from django_scale.exceptions import PageRefillError

__all__ = ["CREDENTIAL_HEADERS", "REFILL_ENVIRON_KEY", "RefillHolder", "render_through_stack"]

#: The WSGI environ key under which a refill hands its holder to the view it renders. It is not
#: an ``HTTP_*`` key, so no request header can forge it.
REFILL_ENVIRON_KEY = "django_scale.refill"
#: Request headers that carry a visitor's credentials: never put in a refill's request.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


class RefillHolder:
    """Carries a refill's result out of the WSGI request that rendered it."""

    __slots__ = ("key", "reason", "value")

    def __init__(self, key: str) -> None:
        #: The key being refilled: the rendered request must map to it.
        self.key = key
        self.value: Any = None
        self.reason: str | None = None


def render_through_stack(path: str, key_of: Callable[[Any], str], arguments: dict[str, Any]) -> Any:
    """Render a stale page for a refill through every middleware; return its storable form.

    *path* names the view, *key_of* makes its key of *arguments* (the request must map to it).
    Raise :class:`~django_scale.exceptions.PageRefillError` (a failed refill, retried with
    backoff) when the final response may not be stored or the request does not map to the
    key being refilled.
    """
    holder = RefillHolder(key_of(arguments))
    environ = _refill_environ(arguments, holder)
    language = arguments.get("language")
    override: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if isinstance(language, str) and translation.check_for_language(language):
        # Without LocaleMiddleware the page renders in the active language, as it did when keyed.
        override = translation.override(language)
    with override:
        response = _wsgi_application()(environ, _start_response)
        status = getattr(response, "status_code", None)
        close = getattr(response, "close", None)
        if close is not None:
            close()  # request_finished: Django closes the connections as after any request
    if holder.value is None:
        reason = holder.reason or f"the view was not reached (status {status})"
        raise PageRefillError(f"The refill of {path} for {arguments.get('path')!r} stored nothing: {reason}.")
    return holder.value


def _wsgi_str(text: str) -> str:
    """Return *text* as a WSGI environ string (UTF-8 bytes read as Latin-1, PEP 3333)."""
    return text.encode("utf-8").decode("iso-8859-1")


def _refill_environ(arguments: dict[str, Any], holder: RefillHolder) -> dict[str, Any]:
    """Return the WSGI environ of a refill's GET: the key's parts, no cookies, no credentials."""
    secure = bool(arguments["secure"])
    host = str(arguments["host"])
    path, path_info = str(arguments["path"]), str(arguments["path_info"])
    script = path[: len(path) - len(path_info)] if path_info and path.endswith(path_info) else ""
    name, colon, port = host.rpartition(":")
    if not colon or "]" in port:
        name, port = host, "443" if secure else "80"
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": _wsgi_str(script),
        "PATH_INFO": _wsgi_str(path_info),
        "QUERY_STRING": str(arguments["query"]),
        "HTTP_HOST": host,
        "SERVER_NAME": name,
        "SERVER_PORT": port,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "https" if secure else "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        REFILL_ENVIRON_KEY: holder,
    }
    for header, value in dict(arguments["headers"]).items():
        if value is not None and str(header).lower() not in CREDENTIAL_HEADERS:
            meta = str(header).upper().replace("-", "_")
            environ[meta if meta in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{meta}"] = str(value)
    language = arguments.get("language")
    if isinstance(language, str) and "HTTP_ACCEPT_LANGUAGE" not in environ:
        environ["HTTP_ACCEPT_LANGUAGE"] = language
    proxy_header = settings.SECURE_PROXY_SSL_HEADER
    if secure and proxy_header:
        environ[proxy_header[0]] = proxy_header[1]
    return environ


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda data: None


# The project's WSGI application per MIDDLEWARE list (override_settings in tests changes it).
_applications: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _wsgi_application() -> Callable[..., Any]:
    from django.core.wsgi import get_wsgi_application

    middleware = tuple(settings.MIDDLEWARE or ())
    application = _applications.get(middleware)
    if application is None:
        application = _applications[middleware] = get_wsgi_application()
    return application
