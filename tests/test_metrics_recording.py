"""MetricsMiddleware's accounting of each request: exact totals, events, concurrent async requests.

The middleware is called around plain views (no test client), each request with a
``ResolverMatch`` of its own: the route its figures go to.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from django.urls import ResolverMatch
from support import recording_metrics

from django_scale import metrics
from django_scale.metrics.store import SlotStore

DB = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SlotStore]:
    with recording_metrics(str(tmp_path)) as recording:
        # Connected before the requests: a request that connects also counts the queries
        # that set the new connection up.
        connections["default"].ensure_connection()
        yield recording


def request_of(route: str, method: str = "get") -> HttpRequest:
    request = getattr(RequestFactory(), method)(f"/{route}/")
    request.resolver_match = ResolverMatch(lambda request: None, (), {}, url_name=route, route=f"{route}/")
    return request


def run_queries(count: int) -> None:
    with connections["default"].cursor() as cursor:
        for _ in range(count):
            cursor.execute("SELECT 1")


@DB
def test_totals_queries_and_events_are_exact(store: SlotStore) -> None:
    def view(request: HttpRequest) -> HttpResponse:
        run_queries(3)
        metrics.increment("swr.hit")
        metrics.increment("swr.hit", 2)
        return HttpResponse(status=201)

    middleware = metrics.MetricsMiddleware(view)
    for _ in range(7):
        assert middleware(request_of("exact")).status_code == 201
    metrics.increment("swr.hit")  # outside a request: host-wide only
    snapshot = store.snapshot()
    assert snapshot.totals["request\x1fexact\x1fGET"][0] == 7
    assert snapshot.totals["db\x1fexact\x1fGET\x1fdefault"][0] == 7  # one DB time per request
    assert snapshot.counters["requests\x1fexact\x1fGET\x1f2xx"] == 7
    assert snapshot.counters["queries\x1fexact\x1fGET\x1fdefault"] == 21
    assert snapshot.counters["event\x1fexact\x1fGET\x1fswr.hit"] == 21
    assert snapshot.counters["counter\x1fswr.hit"] == 22
    # Every request's latency in the window, and its DB time no more than it.
    assert snapshot.windows["request\x1fexact\x1fGET"][5].count == 7
    assert (
        0
        < snapshot.totals["db\x1fexact\x1fGET\x1fdefault"][1]
        <= snapshot.totals["request\x1fexact\x1fGET"][1]
    )


@DB
def test_a_failing_view_is_recorded_as_a_500_with_its_queries(store: SlotStore) -> None:
    def view(request: HttpRequest) -> HttpResponse:
        run_queries(2)
        metrics.increment("swr.miss")
        raise RuntimeError("boom")

    middleware = metrics.MetricsMiddleware(view)
    with pytest.raises(RuntimeError):
        middleware(request_of("failing", "post"))
    counters = store.snapshot().counters
    assert counters["requests\x1ffailing\x1fPOST\x1f5xx"] == 1
    assert counters["queries\x1ffailing\x1fPOST\x1fdefault"] == 2
    assert counters["event\x1ffailing\x1fPOST\x1fswr.miss"] == 1
    assert counters["counter\x1fswr.miss"] == 1


@DB
def test_an_increment_after_its_request_was_recorded_goes_to_the_host_counters(store: SlotStore) -> None:
    # Something the request started (a thread with a copy of its context) that outlives it.
    contexts: list[contextvars.Context] = []

    def view(request: HttpRequest) -> HttpResponse:
        contexts.append(contextvars.copy_context())
        metrics.increment("swr.refill.succeeded")
        return HttpResponse("")

    metrics.MetricsMiddleware(view)(request_of("late"))
    contexts[0].run(metrics.increment, "swr.refill.succeeded")
    counters = store.snapshot().counters
    assert counters["counter\x1fswr.refill.succeeded"] == 2
    assert counters["event\x1flate\x1fGET\x1fswr.refill.succeeded"] == 1


@DB
def test_queries_on_an_alias_given_its_place_during_a_request_count_in_it(store: SlotStore) -> None:
    # A request's figures have a place for each alias known when it began; a connection made
    # meanwhile to another alias (DATABASES changed) gives that alias a place past them.
    from django_scale.metrics.recording import query_timer

    def execute(sql: str, params: object, many: bool, context: dict[str, object]) -> str:
        return "done"

    def view(request: HttpRequest) -> HttpResponse:
        run_queries(1)
        timed = query_timer("added-meanwhile")
        assert timed(execute, "SELECT 1", None, False, {}) == "done"
        assert timed(execute, "SELECT 2", None, False, {}) == "done"
        return HttpResponse("")

    metrics.MetricsMiddleware(view)(request_of("placed"))
    snapshot = store.snapshot()
    assert snapshot.counters["queries\x1fplaced\x1fGET\x1fdefault"] == 1
    assert snapshot.counters["queries\x1fplaced\x1fGET\x1fadded-meanwhile"] == 2
    assert snapshot.totals["db\x1fplaced\x1fGET\x1fadded-meanwhile"][0] == 1


@DB
def test_concurrent_async_requests_keep_their_own_figures(store: SlotStore) -> None:
    # Five requests at once, interleaved at every step: request k runs k queries and k
    # increments, on a route of its own. A figure of one request counted in another's would
    # show as a wrong count on some route.
    async def view(request: HttpRequest) -> HttpResponse:
        k = int(request.resolver_match.url_name[1:])  # type: ignore[union-attr]
        for _ in range(k):
            await asyncio.sleep(0)
            await sync_to_async(run_queries)(1)
            metrics.increment("counts.exact")
            await asyncio.sleep(0)
        return HttpResponse("")

    middleware = metrics.MetricsMiddleware(view)

    async def scenario() -> list[int]:
        responses = await asyncio.gather(
            *(middleware(request_of(f"r{k}")) for k in (1, 2, 3, 4, 5) for _ in range(2))
        )
        return [response.status_code for response in responses]

    # async_to_sync runs the ORM's thread-sensitive calls in this thread, on the test's connection.
    assert async_to_sync(scenario)() == [200] * 10
    counters = store.snapshot().counters
    totals = store.snapshot().totals
    for k in (1, 2, 3, 4, 5):
        assert totals[f"request\x1fr{k}\x1fGET"][0] == 2
        assert counters[f"queries\x1fr{k}\x1fGET\x1fdefault"] == 2 * k
        assert counters[f"event\x1fr{k}\x1fGET\x1fcounts.exact"] == 2 * k
    assert counters["counter\x1fcounts.exact"] == 30


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_an_export_maps_the_pages_it_reads_not_the_holes_around_them(tmp_path: Path) -> None:
    # A fresh file is sparse: 16 slots of about 17 MiB, two of them used here. Without
    # MADV_RANDOM a read fault on a hole reads ahead (and zero-fills) the pages around it.
    writer = SlotStore(tmp_path, 16, 1024, 16)
    for index in range(50):
        writer.record([(f"request\x1fr{index}\x1fGET", 40 + index, 0.01)], [(f"requests\x1fr{index}", 1)])
    reader = SlotStore(tmp_path, 16, 1024, 16)
    assert reader.snapshot().totals["request\x1fr0\x1fGET"][0] == 1
    assert mapped_kib(reader) < 512, mapped_kib(reader)  # 144 KiB here; 1,344 without


def mapped_kib(store: SlotStore) -> int:
    """The resident KiB of *store*'s mapping of its file in this process (/proc/self/smaps)."""
    start = f"{ctypes.addressof(ctypes.c_char.from_buffer(store._map)):x}-"
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        if block.startswith(start):
            found = re.search(r"^Rss:\s+(\d+) kB", block, re.MULTILINE)
            assert found is not None, block
            return int(found.group(1))
    raise AssertionError(f"no mapping at {start}")
