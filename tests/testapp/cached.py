"""Functions and views cached with stale-while-revalidate, for tests/test_cache.py.

They live at module level so the Celery worker finds them by their dotted path, as it would
in a project. :data:`probe` lets a test count calls, change the "data" a function reads and
hold a refill in the middle of its computation.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.db import router
from django.http import HttpRequest, HttpResponse, JsonResponse

from django_scale.cache import stale_while_revalidate, swr_cache_page

from testapp.models import Author


class Probe:
    """What the cached functions record and read; reset by each test."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []
        self.data = "v1"
        self.fail = False
        self.delay = 0.0
        #: Set by a computation that reached its hold point; cleared by reset.
        self.holding = threading.Event()
        #: A computation waits for this when hold is true.
        self.release = threading.Event()
        self.hold = False
        self.read_aliases: list[str] = []

    def record(self, name: str, argument: Any) -> str:
        with self.lock:
            self.calls.append((name, argument))
            data = self.data
        if self.hold:
            self.holding.set()
            assert self.release.wait(30), "the test never released the held computation"
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the cached function failed")
        return data

    def count(self, name: str) -> int:
        with self.lock:
            return sum(1 for call, _ in self.calls if call == name)


probe = Probe()


@stale_while_revalidate(fresh=60, stale=3600)
def headline(section: str, page: int = 1) -> dict[str, Any]:
    """A cached function of two arguments, one with a default."""
    data = probe.record("headline", (section, page))
    return {"section": section, "page": page, "data": data}


@stale_while_revalidate
def bare(n: int) -> int:
    """Decorated without parentheses: SWR_FRESH / SWR_STALE apply."""
    probe.record("bare", n)
    return n * 2


@stale_while_revalidate(fresh=60, stale=3600, stale_if_error=600)
def forgiving(n: int) -> str:
    """A function whose failures are covered by stale_if_error."""
    return f"{probe.record('forgiving', n)}:{n}"


@stale_while_revalidate(fresh=60, stale=3600, on_broker_error="serve_stale")
def patient(n: int) -> str:
    """Serves stale instead of recomputing inline when the broker is down."""
    return f"{probe.record('patient', n)}:{n}"


@stale_while_revalidate(fresh=60, stale=3600)
async def async_headline(section: str) -> str:
    """An async cached function."""
    return f"{probe.record('async_headline', section)}:{section}"


@stale_while_revalidate(fresh=60, stale=3600)
def author_names() -> list[str]:
    """Read from the database, recording which alias the read was routed to."""
    probe.record("author_names", None)
    probe.read_aliases.append(router.db_for_read(Author) or "default")
    return sorted(Author.objects.values_list("name", flat=True))


@stale_while_revalidate(fresh=60, stale=3600, wait=2)
def on_private_redis(n: int) -> str:
    """Cached on the test's own Redis server (the test sets CACHE_ALIAS), which it stops and starts."""
    return f"{probe.record('on_private_redis', n)}:{n}"


@stale_while_revalidate(fresh=60, stale=3600, refill="inline")
def outage(n: int) -> str:
    """Cached in the CACHE_ALIAS a test sets, which it makes unreachable (tests/test_invalidations.py)."""
    return f"{probe.record('outage', n)}:{n}"


@stale_while_revalidate(fresh=60, stale=3600, refill="inline")
def on_locmem(n: int) -> str:
    """Cached in the local-memory cache (the test sets CACHE_ALIAS): the portable store, inline refill."""
    return f"{probe.record('on_locmem', n)}:{n}"


# -- views --------------------------------------------------------------------------------------


@swr_cache_page(60, 3600, stale_if_error=30)
def page(request: HttpRequest) -> HttpResponse:
    data = probe.record("page", request.GET.get("q"))
    return HttpResponse(f"page {data} q={request.GET.get('q')}")


@swr_cache_page(60, 3600)
def page_with_cookie(request: HttpRequest) -> HttpResponse:
    probe.record("page_with_cookie", None)
    response = HttpResponse("hello")
    response.set_cookie("seen", "1")
    return response


@swr_cache_page(60, 3600)
def page_for_user(request: HttpRequest) -> HttpResponse:
    """Reads the user without saying so: must not be cached for everyone."""
    probe.record("page_for_user", None)
    return HttpResponse(f"hello {request.user.get_username() or 'anonymous'}")


@swr_cache_page(60, 3600, vary_on=["user"])
def page_per_user(request: HttpRequest) -> HttpResponse:
    probe.record("page_per_user", None)
    return HttpResponse(f"hello {request.user.get_username() or 'anonymous'}")


@swr_cache_page(60, 3600, vary_on=["Accept-Language"])
def page_by_language(request: HttpRequest) -> JsonResponse:
    probe.record("page_by_language", request.headers.get("Accept-Language"))
    return JsonResponse({"language": request.headers.get("Accept-Language"), "data": probe.data})


@swr_cache_page(60, 3600)
async def async_page(request: HttpRequest) -> HttpResponse:
    data = probe.record("async_page", None)
    return HttpResponse(f"async page {data}")


@swr_cache_page(60, 3600, refill="inline")
def replica_page(request: HttpRequest) -> HttpResponse:
    """Read on a replica; a view that swallows a failed replica read renders a degraded page."""
    from django_scale.exceptions import ReplicaReadError
    from django_scale.replicas import current_state

    try:
        found = Author.objects.filter(name="Paged").exists()
    except ReplicaReadError:
        return JsonResponse({"degraded": True})
    state = current_state()
    return JsonResponse({"found": found, "reads": dict(state.reads) if state else None})
