"""``bench site``'s floor: a no-op application, WSGI and ASGI, that answers every request alike.

Served alone by the app server the deployment uses (:func:`~benchmarks.site.deploy.floor`),
no Django, no database: the generator's service time against it is what the app server, the
socket and the generator itself cost per request, the part of the generator's figure that no
middleware inside Django can see. Standalone on purpose (the server imports it as ``floor``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["BODY", "asgi", "wsgi"]

#: The answer: a small page, about the size of a cached fragment.
BODY = b"<!doctype html><title>floor</title><p>" + b"x" * 2000 + b"</p>\n"


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer 200 with :data:`BODY`."""
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(BODY)))])
    return [BODY]


async def asgi(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Answer every HTTP request 200 with :data:`BODY`."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/html"), (b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})
