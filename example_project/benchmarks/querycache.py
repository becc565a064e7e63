"""``bench querycache``: ``.cached()`` against no cache, django-cachalot and django-cacheops.

django-scale and stock Django run in this process; django-cachalot and django-cacheops each
run in a subprocess of their own (cachalot patches the ORM for every query once installed,
so it cannot share a process with the others), on the same PostgreSQL and Redis, reading on
the primary. Two queries: a *page* (20 sections, a cheap indexed read: the round trip is the
cost) and a *report* (the 20 sections with their article counts and views, an aggregate over
ARTICLES articles: the database's work is the cost). Tables:

1. **Hit and miss latency**, per query: median time with no cache, of a hit, and of a miss
   (a parameter not seen before, so each call misses), and the ratios. "most" is the
   largest speed-up any cache could reach: no cache against building the queryset alone
   (``Section.objects.filter(...)...``), which every system still does on a hit.
2. **Miss overhead against one round trip**: a miss's time minus the same new query's time
   with no cache, against one Redis ``PING`` round trip measured in the same run (a redis-py
   client of its own, on the same Redis); the goal is met when the overhead is at most one
   round trip. The three are timed in turns (no cache, miss, ``PING``, again), so that a
   load that comes and goes on the machine falls on all three alike.
3. **Stale reads under concurrent writes**: 4 threads each increment a counter row in a
   transaction and read it back through the cache 3 times; a read that returns a value older
   than the newest one any thread had committed before the read began is stale.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TextIO

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Count, Sum

from django_scale.replicas import use_primary
from django_scale.testing import override_scale_settings

from benchmarks import print_table, time_per_call

#: The rival a subprocess measures (set by the parent process).
RIVAL_VARIABLE = "DJANGO_SCALE_BENCH_QUERYCACHE"
ROWS = 20
ARTICLES = 20000
WORKERS = 4


def _setup() -> None:
    from news.models import Article, Author, Section

    Article.objects.filter(slug__startswith="qc-").delete()
    Section.objects.filter(slug__startswith="qc-").delete()
    sections = Section.objects.bulk_create(
        [Section(name=f"Section {n:02}", slug=f"qc-{n:02}") for n in range(ROWS)]
        + [Section(name="0", slug="qc-counter")]
    )
    author, _ = Author.objects.get_or_create(name="qc-author")
    Article.objects.bulk_create(
        [
            Article(
                section=sections[n % ROWS], author=author, title=f"t{n}", slug=f"qc-{n}", body="", views=n
            )
            for n in range(ARTICLES)
        ],
        batch_size=5000,
    )


def _systems() -> dict[str, dict[str, Callable[..., Any]]]:
    """For each system: how to read uncached, read cached, and scope the run."""
    from news.models import Section

    def page(n: int = 0) -> Any:
        return (
            Section.objects.filter(slug__startswith="qc-", id__gt=-n)
            .exclude(slug="qc-counter")
            .order_by("id")
        )

    def report(n: int = 0) -> Any:
        return (
            Section.objects.filter(slug__startswith="qc-", id__gt=-n)
            .exclude(slug="qc-counter")
            .annotate(articles_count=Count("articles"), views=Sum("articles__views"))
            .order_by("id")
        )

    def counter() -> Any:
        return Section.objects.filter(slug="qc-counter")

    systems: dict[str, dict[str, Callable[..., Any]]] = {
        "django-scale": {
            "plain": lambda qs: list(qs),
            "cached": lambda qs: list(qs.cached()),
            "scope": lambda: override_scale_settings(QUERY_CACHE=True),
        },
        "stock Django": {
            "plain": lambda qs: list(qs),
            "cached": lambda qs: list(qs),
            "scope": nullcontext,
        },
        "django-cachalot": {
            "plain": lambda qs: _cachalot_disabled(lambda: list(qs)),
            "cached": lambda qs: list(qs),
            "scope": nullcontext,
        },
        "django-cacheops": {
            "plain": lambda qs: list(qs.nocache()),
            "cached": lambda qs: list(qs.cache()),
            "scope": nullcontext,
        },
    }
    for system in systems.values():
        system["page"] = page
        system["report"] = report
        system["counter"] = counter
    return systems


def _cachalot_disabled(read: Callable[[], Any]) -> Any:
    from cachalot.api import cachalot_disabled

    with cachalot_disabled():
        return read()


def measure(name: str, quick: bool) -> dict[str, Any]:
    """Measure *name* in this process: latencies and stale reads."""
    system = _systems()[name]
    plain, cached = system["plain"], system["cached"]
    calls = 30 if quick else 200
    scope: AbstractContextManager[Any] = system["scope"]()
    result: dict[str, Any] = {}
    ping = _pinger()
    with scope, use_primary():
        _setup()
        misses = itertools.count(1)
        for query in ("page", "report"):
            result[query] = _latencies(system[query], plain, cached, ping, calls, misses)
        result["stale"], result["reads"] = _stale_reads(system["counter"], cached, 8 if quick else 25)
    return result


def _pinger() -> Callable[[], Any]:
    """Return one Redis round trip: a ``PING`` on a redis-py client of its own (every system
    measures the same client, whatever its cache uses)."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.ping()  # connected before it is timed
    return client.ping


def _latencies(
    make: Callable[..., Any],
    plain: Callable[[Any], Any],
    cached: Callable[[Any], Any],
    ping: Callable[[], Any],
    calls: int,
    misses: Iterator[int],
) -> dict[str, float]:
    cached(make())  # warm
    cached(make(next(misses)))  # the first miss on a connection asks its server its position
    return {
        # Building the queryset: what every system pays on a hit too (the floor of a hit).
        "build": time_per_call(make, calls=calls),
        "plain": time_per_call(lambda: plain(make()), calls=calls),
        "hit": time_per_call(lambda: cached(make()), calls=calls),
        **_in_turns(
            {
                "plain_unique": lambda: plain(make(next(misses))),
                "miss": lambda: cached(make(next(misses))),
                "ping": ping,
            },
            calls,
        ),
    }


def _in_turns(functions: dict[str, Callable[[], Any]], calls: int, repeats: int = 5) -> dict[str, float]:
    """Time *functions* in turns (*calls* calls of each, *repeats* times): the median time of
    one call of each, and ``overhead_low``/``overhead_high``, the range over the turns of a
    miss's time minus no cache's."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            for _ in range(calls):
                function()
            samples[name].append((time.perf_counter() - started) / calls)
    overheads = [miss - plain for miss, plain in zip(samples["miss"], samples["plain_unique"], strict=True)]
    return {
        **{name: statistics.median(values) for name, values in samples.items()},
        "overhead_low": min(overheads),
        "overhead_high": max(overheads),
    }


def overhead_row(name: str, query: str, times: dict[str, float]) -> list[str]:
    """One row of the miss-overhead table: met when a miss costs at most one round trip more."""
    overhead = times["miss"] - times["plain_unique"]
    return [
        name,
        query,
        f"{times['plain_unique'] * 1e6:.0f} µs",
        f"{times['miss'] * 1e6:.0f} µs",
        f"{overhead * 1e6:.0f} µs ({times['overhead_low'] * 1e6:.0f} to {times['overhead_high'] * 1e6:.0f})",
        f"{times['ping'] * 1e6:.0f} µs",
        f"{overhead / times['ping']:.1f}",
        "met" if overhead <= times["ping"] else "NOT MET",
    ]


def _stale_reads(
    counter: Callable[[], Any], cached: Callable[[Any], list[Any]], rounds: int
) -> tuple[int, int]:
    newest = [0]
    stale = [0]
    reads = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with use_primary():
                for _ in range(rounds):
                    with transaction.atomic():
                        row = counter().select_for_update().get()
                        row.name = str(int(row.name) + 1)
                        row.save(update_fields=["name"])
                    with lock:
                        newest[0] = max(newest[0], int(row.name))
                    for _ in range(3):
                        with lock:
                            seen = newest[0]
                        value = int(cached(counter())[0].name)
                        with lock:
                            reads[0] += 1
                            if value < seen:
                                stale[0] += 1
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return stale[0], reads[0]


def _rival(name: str, quick: bool) -> dict[str, Any] | str:
    """Measure *name* in a subprocess (its app installed there); return its figures or why not."""
    module = {"django-cachalot": "cachalot", "django-cacheops": "cacheops"}[name]
    try:
        __import__(module)
    except ImportError:
        return "not installed (pip install -e '.[bench]')"
    env = {**os.environ, RIVAL_VARIABLE: name, "DJANGO_SCALE_EXAMPLE_HARNESS": "0"}
    manage = Path(__file__).resolve().parent.parent / "manage.py"
    command = [sys.executable, str(manage), "bench", "querycache", *(["--quick"] if quick else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    return f"failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"


def run(out: TextIO, quick: bool = False) -> None:
    rival = os.environ.get(RIVAL_VARIABLE)
    if rival:
        out.write(json.dumps(measure(rival, quick)) + "\n")
        return
    from benchmarks import require_replica

    require_replica(out, "querycache")
    results: dict[str, dict[str, Any] | str] = {}
    results["stock Django"] = measure("stock Django", quick)
    results["django-scale"] = measure("django-scale", quick)
    for name in ("django-cachalot", "django-cacheops"):
        results[name] = _rival(name, quick)
    for query in ("page", "report"):
        rows = []
        for name, figures in results.items():
            if isinstance(figures, str):
                rows.append([name, figures, "", "", "", "", ""])
                continue
            times = figures[query]
            rows.append(
                [
                    name,
                    f"{times['plain'] * 1e6:.0f} µs",
                    f"{times['hit'] * 1e6:.0f} µs",
                    f"{times['plain'] / times['hit']:.1f}x",
                    f"{times['plain'] / times['build']:.1f}x",
                    f"{times['miss'] * 1e6:.0f} µs",
                    f"{times['miss'] / times['plain_unique']:.2f}x",
                ]
            )
        print_table(
            out,
            f"Query cache, the {query} query ({ROWS} rows, primary); miss = a query not seen before",
            [
                "system",
                "no cache",
                "hit",
                "hit speed-up",
                "most (no cache / build)",
                "miss",
                "miss / no cache",
            ],
            rows,
        )
    overheads = []
    for name, figures in results.items():
        if name == "stock Django":
            continue  # no cache, no miss
        for query in ("page", "report"):
            if isinstance(figures, str):
                overheads.append([name, query, figures, "", "", "", "", ""])
            else:
                overheads.append(overhead_row(name, query, figures[query]))
    print_table(
        out,
        "Miss overhead: a miss minus the same new query with no cache, against one Redis PING "
        "(medians of 5 turns; the overhead's range over the turns in brackets)",
        [
            "system",
            "query",
            "no cache",
            "miss",
            "overhead",
            "1 round trip (PING)",
            "round trips",
            "goal: <= 1 round trip",
        ],
        overheads,
    )
    print_table(
        out,
        f"Stale reads: {WORKERS} threads increment a row and read it back through the cache",
        ["system", "stale reads"],
        [
            [name, figures if isinstance(figures, str) else f"{figures['stale']} of {figures['reads']}"]
            for name, figures in results.items()
        ],
    )
