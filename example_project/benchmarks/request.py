"""``bench request``: what ScaleMiddleware and ReplicaRouter add to each request.

Five setups, side by side in one run, against the configured primary and streaming replica:

* stock Django: no router, no middleware of ours, every query on the primary;
* stock Django with a one-line router that sends every read to the replica: the floor of any
  replica routing (a query on the standby may cost more or less than one on the primary);
* ``ScaleMiddleware`` only (no router: every query on the primary);
* ``ReplicaRouter`` only (reads on the replica, no request state);
* both, as a project deploys them (reads on the replica);
* django-multidb-router (``multidb.PinningReplicaRouter`` + ``PinningRouterMiddleware``),
  the existing package that does the same job (reads on the replica).

The one-line router and django-multidb-router read the standby through a second alias of it
that django-scale does not manage, so their connection carries no django-scale guard.

Each runs a one-query and a ten-query view (``count()`` on a small table), sync and async,
through Django's test clients (``Client`` / ``AsyncClient``: the whole middleware stack of the
example project, the URL resolver and the response, without a socket). The setups take turns
in round-robin batches, so that a noisy neighbour on the machine slows them all alike, and the
table gives each one's median time per request, its ratio against stock Django and against
django-multidb-router, and its extra microseconds per request over stock.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, RequestFactory
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import path
from django.utils.module_loading import import_string

from django_scale.conf import conf
from django_scale.replicas import monitor, stop_monitors
from django_scale.testing import override_scale_settings

from benchmarks import print_table, require_replica

SCALE_MIDDLEWARE = "django_scale.middleware.ScaleMiddleware"
MULTIDB_MIDDLEWARE = "multidb.middleware.PinningRouterMiddleware"
SCALE_ROUTER = "django_scale.routers.ReplicaRouter"
MULTIDB_ROUTER = "multidb.PinningReplicaRouter"

STOCK = "stock Django"
FLOOR = "one-line router to the replica"
MULTIDB = "django-multidb-router"
#: django-scale's setup as a project deploys it (both parts).
SCALE = "django-scale (both)"


# -- The views (a urlconf of their own) ------------------------------------------------------


def _count() -> int:
    from news.models import Section

    return Section.objects.count()


def one_query(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(_count()))


def ten_queries(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(sum(_count() for _ in range(10))))


async def async_one_query(request: HttpRequest) -> HttpResponse:
    from news.models import Section

    return HttpResponse(str(await Section.objects.acount()))


async def async_ten_queries(request: HttpRequest) -> HttpResponse:
    from news.models import Section

    total = 0
    for _ in range(10):
        total += await Section.objects.acount()
    return HttpResponse(str(total))


urlpatterns = [
    path("sync/1/", one_query),
    path("sync/10/", ten_queries),
    path("async/1/", async_one_query),
    path("async/10/", async_ten_queries),
]

#: (label, URL, async) of each view.
VIEWS = [
    ("sync, 1 query", "/sync/1/", False),
    ("sync, 10 queries", "/sync/10/", False),
    ("async, 1 query", "/async/1/", True),
    ("async, 10 queries", "/async/10/", True),
]


#: The example project's alias of the same standby that django-scale does not manage (not in
#: REPLICAS, so its connection has no ReplicaGuard): the setups that are not django-scale's
#: read through it, so that their figures carry none of django-scale's per-query work.
PLAIN_REPLICA = "replica_plain"


class FixedReplicaRouter:
    """Send every read to the replica, with no decision at all: the floor of replica routing."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return PLAIN_REPLICA


# -- The setups -------------------------------------------------------------------------------


def setups(replica: str) -> dict[str, dict[str, Any]]:
    """The settings of each setup, over the example project's own middleware."""
    base = [entry for entry in settings.MIDDLEWARE if entry not in (SCALE_MIDDLEWARE, MULTIDB_MIDDLEWARE)]
    common = {"ROOT_URLCONF": __name__, "ALLOWED_HOSTS": ["testserver"], "DEBUG": False}
    return {
        STOCK: {**common, "DATABASE_ROUTERS": [], "MIDDLEWARE": base},
        FLOOR: {**common, "DATABASE_ROUTERS": [f"{__name__}.FixedReplicaRouter"], "MIDDLEWARE": base},
        "ScaleMiddleware only": {**common, "DATABASE_ROUTERS": [], "MIDDLEWARE": [SCALE_MIDDLEWARE, *base]},
        "ReplicaRouter only": {**common, "DATABASE_ROUTERS": [SCALE_ROUTER], "MIDDLEWARE": base},
        SCALE: {
            **common,
            "DATABASE_ROUTERS": [SCALE_ROUTER],
            "MIDDLEWARE": [SCALE_MIDDLEWARE, *base],
        },
        MULTIDB: {
            **common,
            "DATABASE_ROUTERS": [MULTIDB_ROUTER],
            "MIDDLEWARE": [MULTIDB_MIDDLEWARE, *base],
            "REPLICA_DATABASES": [PLAIN_REPLICA],
        },
    }


#: Where each setup's reads must go (checked before timing, on the sync views).
def expected_alias(name: str, replica: str) -> str:
    if name in (FLOOR, MULTIDB):
        return PLAIN_REPLICA
    return conf.PRIMARY if name in (STOCK, "ScaleMiddleware only") else replica


def _reset_multidb() -> None:
    # multidb caches its replica list in a module global on first use.
    import multidb

    multidb.replicas = None


# -- Timing -------------------------------------------------------------------------------------

#: One sample: (wall-clock seconds, CPU seconds of the request's threads) of one request.
Sample = tuple[float, float]


class RequestCPU:
    """The CPU time of the threads that serve a request: this one, and the ORM's thread.

    A sync request runs in this thread. An async one runs its view on the event loop, in this
    thread, and its ORM calls in asgiref's one thread for sync code. Other threads (the replica
    monitors, the watchdog) and other processes on the machine are not counted.
    """

    def __init__(self, orm_thread: int | None = None) -> None:
        self.clock = time.pthread_getcpuclockid(orm_thread) if orm_thread is not None else None

    def __call__(self) -> float:
        if self.clock is None:
            return time.thread_time()
        return time.thread_time() + time.clock_gettime(self.clock)


def _time_sync(client: Client, url: str, requests: int, cpu_time: RequestCPU) -> list[Sample]:
    samples = []
    get = client.get
    for _ in range(requests):
        wall, cpu = time.perf_counter(), cpu_time()
        response = get(url)
        samples.append((time.perf_counter() - wall, cpu_time() - cpu))
        assert response.status_code == 200, response
    return samples


async def _time_async(client: AsyncClient, url: str, requests: int, cpu_time: RequestCPU) -> list[Sample]:
    samples = []
    get = client.get
    for _ in range(requests):
        wall, cpu = time.perf_counter(), cpu_time()
        response = await get(url)
        samples.append((time.perf_counter() - wall, cpu_time() - cpu))
        assert response.status_code == 200, response
    return samples


def _check_routing(name: str, client: Client, url: str, replica: str) -> None:
    """Fail loudly if a setup's reads do not go where the table says they go."""
    want = expected_alias(name, replica)
    with CaptureQueriesContext(connections[want]) as captured:
        assert client.get(url).status_code == 200
    assert len(captured) >= 1, f"{name}: its read did not run on {want!r}"


#: Per (view, setup): every sample, and the median of each round's batch.
Results = dict[tuple[str, str], tuple[list[Sample], list[Sample]]]


def measure(replica: str, rounds: int, per_batch: int) -> Results:
    """Time each (view, setup), the setups taking turns in batches of *per_batch* requests.

    Each round runs one batch of every setup on every view, in an order that rotates from
    round to round, so that whatever else the machine does hits every setup alike.
    """
    configs = setups(replica)
    names = list(configs)
    sync_clients: dict[str, Client] = {}
    async_clients: dict[str, AsyncClient] = {}
    results: Results = {}
    loop = asyncio.new_event_loop()
    sync_cpu = RequestCPU()
    async_cpu = RequestCPU(loop.run_until_complete(sync_to_async(threading.get_ident)()))
    try:
        for name in names:
            # Warm up: each setup's clients and middleware built, the connections open.
            _reset_multidb()
            with override_settings(**configs[name]):
                client = sync_clients[name] = Client()
                aclient = async_clients[name] = AsyncClient()
                _check_routing(name, client, "/sync/1/", replica)
                for _, url, is_async in VIEWS:
                    if is_async:
                        loop.run_until_complete(_time_async(aclient, url, 5, async_cpu))
                    else:
                        _time_sync(client, url, 5, sync_cpu)
        for batch in range(rounds):
            for label, url, is_async in VIEWS:
                shift = batch % len(names)
                for name in names[shift:] + names[:shift]:
                    _reset_multidb()
                    with override_settings(**configs[name]):
                        if is_async:
                            found = loop.run_until_complete(
                                _time_async(async_clients[name], url, per_batch, async_cpu)
                            )
                        else:
                            found = _time_sync(sync_clients[name], url, per_batch, sync_cpu)
                    every, medians = results.setdefault((label, name), ([], []))
                    every.extend(found)
                    medians.append(
                        (statistics.median(s[0] for s in found), statistics.median(s[1] for s in found))
                    )
            gc.collect()
    finally:
        # The async views' queries ran in asgiref's thread for sync code: close its connections.
        loop.run_until_complete(sync_to_async(connections.close_all)())
        loop.close()
    return results


def _paired_ratio(results: Results, label: str, name: str, against: str, part: int) -> float:
    """The median over rounds of (this setup's batch median / the other setup's, same round)."""
    mine, theirs = results[(label, name)][1], results[(label, against)][1]
    return statistics.median(a[part] / b[part] for a, b in zip(mine, theirs, strict=True))


def report(out: TextIO, results: Results, names: list[str], title: str) -> None:
    rows: list[list[object]] = []
    for label, _, _ in VIEWS:
        for name in names:
            every = results[(label, name)][0]
            wall = statistics.median(sample[0] for sample in every)
            cpu = statistics.median(sample[1] for sample in every)
            stock_cpu = statistics.median(sample[1] for sample in results[(label, STOCK)][0])
            rows.append(
                [
                    label,
                    name,
                    f"{wall * 1e3:.3f}",
                    f"{_paired_ratio(results, label, name, STOCK, 0):.3f}x",
                    f"{_paired_ratio(results, label, name, MULTIDB, 0):.3f}x",
                    f"{cpu * 1e3:.3f}",
                    f"{(cpu - stock_cpu) * 1e6:+.0f}",
                    f"{_paired_ratio(results, label, name, STOCK, 1):.3f}x",
                    f"{_paired_ratio(results, label, name, MULTIDB, 1):.3f}x",
                ]
            )
    print_table(
        out,
        title,
        [
            "view",
            "setup",
            "wall ms",
            "vs stock",
            "vs multidb",
            "CPU ms",
            "CPU µs vs stock",
            "vs stock",
            "vs multidb",
        ],
        rows,
    )


# -- In isolation: the middleware and the routing decisions, without the database ------------


def _decide(count: int) -> None:
    from django.db import router

    from news.models import Section

    for _ in range(count):
        router.db_for_read(Section)


def _sync_view(count: int) -> Callable[[HttpRequest], HttpResponse]:
    def view(request: HttpRequest) -> HttpResponse:
        _decide(count)
        return HttpResponse("")

    return view


def _async_view(count: int) -> Callable[[HttpRequest], Awaitable[HttpResponse]]:
    async def view(request: HttpRequest) -> HttpResponse:
        # As an async view's ORM call does: the decision in the ORM's thread.
        await sync_to_async(_decide)(count)
        return HttpResponse("")

    return view


def isolated(out: TextIO, replica: str, quick: bool) -> None:
    """Time each setup's own middleware around a view that only makes routing decisions."""
    calls = 1_000 if quick else 10_000
    configs = setups(replica)
    request = RequestFactory().get("/")
    rows: list[list[object]] = []
    loop = asyncio.new_event_loop()
    sync_cpu = RequestCPU()
    async_cpu = RequestCPU(loop.run_until_complete(sync_to_async(threading.get_ident)()))

    def cpu_per_call(function: Callable[[], object], cpu_time: RequestCPU) -> float:
        samples = []
        for _ in range(5):
            started = cpu_time()
            function()
            samples.append((cpu_time() - started) / calls)
        return statistics.median(samples)

    try:
        for label, count, is_async in (
            ("sync, 1 decision", 1, False),
            ("sync, 10 decisions", 10, False),
            ("async, 1 decision", 1, True),
            ("async, 10 decisions", 10, True),
        ):
            timings: dict[str, float] = {}
            for name, options in configs.items():
                _reset_multidb()
                with override_settings(**options):
                    # Only the setup's own middleware (ScaleMiddleware or multidb's), as the
                    # outermost entry: the rest of the stack is the same for every setup.
                    own = [
                        entry
                        for entry in options["MIDDLEWARE"]
                        if entry in (SCALE_MIDDLEWARE, MULTIDB_MIDDLEWARE)
                    ]
                    handler: Any = _async_view(count) if is_async else _sync_view(count)
                    for entry in reversed(own):
                        handler = import_string(entry)(handler)
                    if is_async:

                        async def many(handler: Any = handler) -> None:
                            for _ in range(calls):
                                await handler(request)

                        timings[name] = cpu_per_call(
                            lambda many=many: loop.run_until_complete(many()), async_cpu
                        )
                    else:

                        def many_sync(handler: Any = handler) -> None:
                            for _ in range(calls):
                                handler(request)

                        timings[name] = cpu_per_call(many_sync, sync_cpu)
            stock, anchor = timings[STOCK], timings[MULTIDB]
            for name, seconds in timings.items():
                rows.append(
                    [
                        label,
                        name,
                        f"{seconds * 1e6:.1f}",
                        f"{(seconds - stock) * 1e6:+.1f}",
                        f"{seconds / anchor:.2f}x",
                    ]
                )
    finally:
        loop.run_until_complete(sync_to_async(connections.close_all)())
        loop.close()
    print_table(
        out,
        "In isolation: the setup's own middleware around a view that only routes (no query, no test "
        f"client); CPU µs of the request's threads per request, median of 5 runs of {calls:,}",
        ["view", "setup", "µs/request", "µs vs stock", "vs multidb"],
        rows,
    )


def run(out: TextIO, quick: bool = False) -> None:
    # (Imported here: the counts import this module's setups and views.)
    from benchmarks.request_counts import CHILD, ONLY, _instruction_segments, calls_per_request, instructions

    child = os.environ.get(CHILD)
    if child:
        # A slow probe under callgrind must not leave the replica unavailable mid-segment, and
        # no probe runs in a segment (its instructions would count against the request).
        with override_scale_settings(HEALTH_CHECK_INTERVAL=600.0):
            rounds, requests = (int(part) for part in child.split(","))
            _instruction_segments(require_replica(out, "request"), rounds, requests)
        return
    replica = require_replica(out, "request")
    if os.environ.get(ONLY) == "instructions":
        instructions(out, replica, quick)
        return
    if PLAIN_REPLICA not in settings.DATABASES:
        raise SystemExit(
            f"bench request reads through a second alias of the standby, {PLAIN_REPLICA!r}, which "
            "the example project's settings define when REPLICA_URL is set."
        )
    rounds, per_batch = (10, 10) if quick else (100, 10)
    with override_scale_settings(HEALTH_CHECK_INTERVAL=0.5):
        if not monitor(replica).is_available():
            raise SystemExit(f"the replica {replica!r} is not available: {monitor(replica).error}")
        names = list(setups(replica))
        try:
            results = measure(replica, rounds, per_batch)
            report(
                out,
                results,
                names,
                f"Time per request through the test client: {rounds} rounds of {per_batch} requests per cell. "
                "Wall and CPU (of the request's threads) medians; ratios are medians over rounds of "
                "each round's batch medians",
            )
            isolated(out, replica, quick)
            calls_per_request(out, replica, quick)
        finally:
            stop_monitors()
    if os.environ.get(ONLY) != "time":
        instructions(out, replica, quick)
