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
import statistics
import time
from typing import Any, TextIO

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import path

from django_scale.conf import conf
from django_scale.replicas import monitor
from django_scale.testing import override_scale_settings

from benchmarks import print_table

SCALE_MIDDLEWARE = "django_scale.middleware.ScaleMiddleware"
MULTIDB_MIDDLEWARE = "multidb.middleware.PinningRouterMiddleware"
SCALE_ROUTER = "django_scale.routers.ReplicaRouter"
MULTIDB_ROUTER = "multidb.PinningReplicaRouter"

STOCK = "stock Django"
FLOOR = "one-line router to the replica"
MULTIDB = "django-multidb-router"


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


class FixedReplicaRouter:
    """Send every read to the replica, with no decision at all: the floor of replica routing."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return conf.REPLICAS[0]


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
        "django-scale (both)": {
            **common,
            "DATABASE_ROUTERS": [SCALE_ROUTER],
            "MIDDLEWARE": [SCALE_MIDDLEWARE, *base],
        },
        MULTIDB: {
            **common,
            "DATABASE_ROUTERS": [MULTIDB_ROUTER],
            "MIDDLEWARE": [MULTIDB_MIDDLEWARE, *base],
            "REPLICA_DATABASES": [replica],
        },
    }


#: Where each setup's reads must go (checked before timing, on the sync views).
def expected_alias(name: str, replica: str) -> str:
    return conf.PRIMARY if name in (STOCK, "ScaleMiddleware only") else replica


def _reset_multidb() -> None:
    # multidb caches its replica list in a module global on first use.
    import multidb

    multidb.replicas = None


# -- Timing -------------------------------------------------------------------------------------


def _time_sync(client: Client, url: str, requests: int) -> list[float]:
    samples = []
    get = client.get
    for _ in range(requests):
        started = time.perf_counter()
        response = get(url)
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200, response
    return samples


async def _time_async(client: AsyncClient, url: str, requests: int) -> list[float]:
    samples = []
    get = client.get
    for _ in range(requests):
        started = time.perf_counter()
        response = await get(url)
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200, response
    return samples


def _check_routing(name: str, client: Client, url: str, replica: str) -> None:
    """Fail loudly if a setup's reads do not go where the table says they go."""
    want = expected_alias(name, replica)
    with CaptureQueriesContext(connections[want]) as captured:
        assert client.get(url).status_code == 200
    assert len(captured) >= 1, f"{name}: its read did not run on {want!r}"


def measure(replica: str, batches: int, per_batch: int) -> dict[tuple[str, str], list[float]]:
    """Return every per-request time of each (view, setup), the setups taking turns per batch."""
    configs = setups(replica)
    sync_clients: dict[str, Client] = {}
    async_clients: dict[str, AsyncClient] = {}
    samples: dict[tuple[str, str], list[float]] = {}
    names = list(configs)
    loop = asyncio.new_event_loop()
    try:
        for batch in range(batches):
            # Rotate the order each batch, so that no setup always runs right after another.
            order = names[batch % len(names) :] + names[: batch % len(names)]
            for name in order:
                _reset_multidb()
                with override_settings(**configs[name]):
                    client = sync_clients.setdefault(name, Client())
                    aclient = async_clients.setdefault(name, AsyncClient())
                    if batch == 0:
                        _check_routing(name, client, "/sync/1/", replica)
                    for label, url, is_async in VIEWS:
                        # Warm up: the connection of this thread (or of the ORM's thread) open.
                        if is_async:
                            loop.run_until_complete(_time_async(aclient, url, 2))
                        else:
                            _time_sync(client, url, 2)
                        gc.collect()
                        if is_async:
                            found = loop.run_until_complete(_time_async(aclient, url, per_batch))
                        else:
                            found = _time_sync(client, url, per_batch)
                        samples.setdefault((label, name), []).extend(found)
    finally:
        # The async views' queries ran in asgiref's thread for sync code: close its connections.
        loop.run_until_complete(sync_to_async(connections.close_all)())
        loop.close()
    return samples


def report(out: TextIO, samples: dict[tuple[str, str], list[float]], names: list[str], title: str) -> None:
    rows: list[list[object]] = []
    for label, _, _ in VIEWS:
        medians = {name: statistics.median(samples[(label, name)]) for name in names}
        stock, anchor = medians[STOCK], medians[MULTIDB]
        for name in names:
            value = medians[name]
            rows.append(
                [
                    label,
                    name,
                    f"{value * 1e3:.3f}",
                    f"{(value - stock) * 1e6:+.0f}",
                    f"{value / stock:.3f}x",
                    f"{value / anchor:.3f}x",
                ]
            )
    print_table(out, title, ["view", "setup", "ms/request", "µs vs stock", "vs stock", "vs multidb"], rows)


def run(out: TextIO, quick: bool = False) -> None:
    replicas = conf.REPLICAS
    if not replicas or connections[replicas[0]].vendor != "postgresql":
        out.write(
            "bench request needs PostgreSQL with a streaming replica. Set DATABASE_URL and "
            "REPLICA_URL, or run with DJANGO_SCALE_EXAMPLE_HARNESS=1 to start a throwaway primary "
            "and replica with the test harness.\n"
        )
        raise SystemExit(2)
    replica = replicas[0]
    batches, per_batch = (4, 25) if quick else (20, 50)
    with override_scale_settings(HEALTH_CHECK_INTERVAL=0.5):
        if not monitor(replica).is_available():
            raise SystemExit(f"the replica {replica!r} is not available: {monitor(replica).error}")
        names = list(setups(replica))
        samples = measure(replica, batches, per_batch)
    report(
        out,
        samples,
        names,
        f"Time per request through the test client: median of {batches * per_batch} requests per cell, "
        f"setups in round-robin batches of {per_batch}",
    )
