"""``bench site``'s floor: a no-op application, WSGI and ASGI, that answers every request alike.

Served alone by the app server the deployment uses (:func:`~benchmarks.site.deploy.floor`),
no Django, no database: the generator's service time against it is what the app server, the
socket and the generator itself cost per request, the part of the generator's figure that no
middleware inside Django can see. Standalone on purpose (the server imports it as ``floor``).

With ``BENCH_SITE_FLOOR_LOG`` set, each request appends a line to that file: its
``X-Request-Start`` and the time it reached the application (``time.time()``, the generator's
clock: same machine). Sent by one client, one after another, the lines pair with the
generator's records in order: the service time splits into before the application (what
``MetricsMiddleware`` records as queue time) and after it (the answer's way back).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["BODY", "LOG", "asgi", "wsgi"]

#: The environment variable naming the file each request's arrival is written to.
LOG = "BENCH_SITE_FLOOR_LOG"


def _log(stamp: str | None) -> None:
    arrived = time.time()
    path = os.environ.get(LOG)
    if path:
        with open(path, "a") as log:
            log.write(f"{stamp or '-'} {arrived!r}\n")


#: The answer: a small page, about the size of a cached fragment.
BODY = b"<!doctype html><title>floor</title><p>" + b"x" * 2000 + b"</p>\n"


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer 200 with :data:`BODY`."""
    _log(environ.get("HTTP_X_REQUEST_START"))
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
    _log(next((value.decode() for name, value in scope["headers"] if name == b"x-request-start"), None))
    headers = [(b"content-type", b"text/html"), (b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})
