"""The run of ``bench site``: each configuration deployed in turn, loaded, and measured.

Per configuration (stock first: its capacity sets the open-loop rates of all three):

1. gunicorn and a Celery worker started (:mod:`~benchmarks.site.deploy`), the staff user
   logged in, a short closed-loop warm-up (caches filled as in steady state; not counted);
2. a closed loop of :data:`CONNECTIONS` clients for a fixed time: its throughput is the
   naive capacity figure (kept as a second column), and where the search starts;
3. capacity: the highest fixed rate at which the p99 stays under :data:`P99_LIMIT` without
   errors, found by a short search of open-loop steps (:func:`capacity_search`);
4. open loop (:mod:`~benchmarks.site.loadgen`) at 50 % and 80 % of stock's capacity, latency
   from the intended send times;
5. each page alone (:mod:`~benchmarks.site.pages`): its queries per request, and the
   server's percentiles against the generator's;
6. ``scale`` (and ``stock`` in a full run): the faults (:mod:`~benchmarks.site.faults`),
   each during an open loop, a canary writing and reading back: stock's at 50 % of its
   capacity, ``scale``'s at 50 % of ``tuned``'s (after an open loop at that rate with no
   fault, their baseline).

Then ``tuned`` and ``scale`` once more, through cache expiry (:func:`_through_expiry`): their
cached pages fresh for a few seconds only, an open loop at half of ``tuned``'s capacity, so
that every cached page and the sidebar expire several times under load.

Per phase and page: requests, errors (no answer or 5xx), throughput and exact p50 / p99 /
p99.9 / max. Per phase: queries per request and statement execution time per request on the
primary and on the replica (``pg_stat_statements``, reset before the phase), the peak of
connections held on each (``pg_stat_activity``, sampled every 0.25 s), and the CPU time of
gunicorn's workers per request (``/proc``).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

import django
from django.db import connections

from django_scale.conf import conf
from django_scale.replicas import monitor

from benchmarks import require_replica
from benchmarks.site.deploy import SERVERS, WORKERS, Deployment, deployment, floor
from benchmarks.site.faults import Canary, baselines, faults, run_fault
from benchmarks.site.loadgen import Record, capacity_search, closed_loop, open_loop, summarise
from benchmarks.site.mix import FOLLOWS, PAGES, Mix, edit_forms, login
from benchmarks.site.pages import probe_floor, probe_pages
from benchmarks.site.plots import bars_svg, timeline_svg
from benchmarks.site.report import HALF_TUNED, print_results
from benchmarks.site.seed import STAFF, seed
from news.models import Section

__all__ = ["CONFIGS", "run"]

#: The configurations, in the order they run (stock first: its capacity sets the rates).
CONFIGS = ("stock", "tuned", "scale")
#: Clients of the closed-loop capacity run: enough to keep every worker busy.
CONNECTIONS = 2 * WORKERS
#: The open-loop rates, as fractions of stock's capacity.
LOADS = (0.5, 0.8)
#: The measured phases of each configuration, in the tables' order.
PHASES = ("closed loop", *(f"open {load:.0%}" for load in LOADS))
#: Statements of this process (the figures' own queries) left out of the per-request counts.
#: The deployment's own bookkeeping counts: the replica monitors' probes
#: (``pg_last_wal_replay_lsn()``, ``pg_is_in_recovery()``) and the write positions read for
#: read-your-writes and the query cache (``pg_current_wal_insert_lsn()``) are django-scale's
#: work on the servers.
OWN_STATEMENTS = ("pg_stat_statements", "pg_stat_activity", "pg_backend_pid")


def _durations(quick: bool) -> dict[str, float]:
    """Seconds of each phase ("step": one open-loop step of the capacity search; "steps": how
    many; "fault before/during/after": a fault's run, before it, while it lasts, after it)."""
    if quick:
        return {"warm-up": 2.0, "closed loop": 6.0, "step": 3.0, "steps": 3, "open": 8.0, "probe": 1.0,
                "fault before": 1.5, "fault during": 3.0, "fault after": 3.5}  # fmt: skip
    # The full run within 20 minutes on a 2-core machine with seeding 1,000,000 articles (7 min).
    return {"warm-up": 5.0, "closed loop": 15.0, "step": 8.0, "steps": 5, "open": 20.0, "probe": 3.0,
            "fault before": 4.0, "fault during": 8.0, "fault after": 10.0}  # fmt: skip


#: Seconds the cached pages are fresh for in the phase through cache expiry (full run, --quick):
#: each expires about four times in the phase's open loop.
EXPIRY_TTL = {False: 5, True: 2}
#: The configurations run through cache expiry: the two that cache.
EXPIRY_CONFIGS = ("tuned", "scale")


def _fault_configs(quick: bool) -> tuple[str, ...]:
    """The configurations that suffer the faults: django-scale, and stock for contrast (full run)."""
    return ("scale",) if quick else ("stock", "scale")


#: The article the canary comments on and reads back: the oldest, which readers rarely open.
CANARY_ARTICLE = "article-1"


def _faults(
    running: Deployment,
    mix: Mix,
    durations: dict[str, float],
    rate: float,
    baseline: float,
    page_baselines: dict[str, float],
) -> dict[str, Any]:
    """Run each fault during a fixed-rate open loop at *rate*, the canary writing throughout."""
    canary = Canary(running.host, running.port, login(running.host, running.port, *STAFF), CANARY_ARTICLE)
    canary.start()
    results = []
    try:
        for fault in faults(running):
            results.append(
                run_fault(
                    fault,
                    lambda seconds: open_loop(
                        running.host, running.port, mix.restart(), rate=rate, duration=seconds
                    ),
                    canary,
                    before=durations["fault before"],
                    during=durations["fault during"],
                    after=durations["fault after"],
                    baseline_p99=baseline,
                    page_baselines=page_baselines,
                )
            )
    finally:
        canary.stop()
    return {
        "rate": rate,
        "faults": results,
        "canary": {kind: sum(1 for _, k in canary.events if k == kind) for kind in ("ok", "stale", "error")},
    }


def _statement_aliases() -> dict[str, str]:
    """The servers whose statements are counted: the primary and the (first) replica."""
    return {"primary": "default", "replica": conf.REPLICAS[0]}


def _reset_statements() -> None:
    for alias in _statement_aliases().values():
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_stat_statements_reset()")


def _statements() -> dict[str, tuple[int, float]]:
    """Return (calls, total execution ms) of the newsroom's statements on each server."""
    exclusions = " AND ".join("s.query NOT ILIKE %s" for _ in OWN_STATEMENTS)
    totals = {}
    for server, alias in _statement_aliases().items():
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "SELECT coalesce(sum(s.calls), 0), coalesce(sum(s.total_exec_time), 0) "
                "  FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                f" WHERE d.datname = current_database() AND {exclusions}",
                [f"%{name}%" for name in OWN_STATEMENTS],
            )
            calls, ms = cursor.fetchone()
            totals[server] = (int(calls), float(ms))
    return totals


def _top_statements(server: str = "primary", limit: int = 5) -> list[dict[str, Any]]:
    """The newsroom's statements that took the most execution time on *server*: what its time
    per request is made of (the figures' own queries left out)."""
    exclusions = " AND ".join("s.query NOT ILIKE %s" for _ in OWN_STATEMENTS)
    with connections[_statement_aliases()[server]].cursor() as cursor:
        cursor.execute(
            "SELECT left(regexp_replace(s.query, '\\s+', ' ', 'g'), 100), s.calls, s.total_exec_time "
            "  FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            f" WHERE d.datname = current_database() AND {exclusions}"
            " ORDER BY s.total_exec_time DESC LIMIT %s",
            [*(f"%{name}%" for name in OWN_STATEMENTS), limit],
        )
        return [
            {"query": query, "calls": int(calls), "ms": float(ms)} for query, calls, ms in cursor.fetchall()
        ]


class _ConnectionSampler:
    """Sample, in a thread, the connections the deployment holds on each server (the peak).

    Counted from ``pg_stat_activity``: client backends of the newsroom database, but this
    process's own (the sampling thread's, and the main thread's that resets the statistics).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.own: dict[str, int] = {}
        for server, alias in _statement_aliases().items():
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                self.own[server] = int(cursor.fetchone()[0])
        self.peak = dict.fromkeys(_statement_aliases(), 0)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        try:
            while not self._stop.is_set():
                for server, alias in _statement_aliases().items():
                    with connections[alias].cursor() as cursor:
                        cursor.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND backend_type = 'client backend' AND pid NOT IN (pg_backend_pid(), %s)",
                            [self.own[server]],
                        )
                        self.peak[server] = max(self.peak[server], int(cursor.fetchone()[0]))
                # Its connections are open now: their set-up statements come before the reset.
                self._ready.set()
                self._stop.wait(self.interval)
        finally:
            self._ready.set()
            connections.close_all()

    def __enter__(self) -> _ConnectionSampler:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def _phase(records: Sequence[Record], duration: float) -> dict[str, Any]:
    """Figures of one phase: all requests, and each page."""
    by_page: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_page[record.name].append(record)
    return {
        "all": summarise(records, duration),
        "pages": {
            name: summarise(by_page[name], duration)
            for name in (*(page for page, _ in PAGES), *FOLLOWS.values())
            if by_page[name]
        },
        "statuses": dict(sorted(_statuses(records).items())),
    }


def _statuses(records: Sequence[Record]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        counts[str(record.status)] += 1
    return counts


def _measured(running: Deployment, phase: str, run_load: Any, duration: float) -> dict[str, Any]:
    """Run *run_load* (returns records) with the server-side counters around it."""
    with _ConnectionSampler() as sampler:
        _reset_statements()
        cpu = running.cpu_seconds()
        records = run_load()
        cpu = running.cpu_seconds() - cpu
    statements = _statements()
    top = _top_statements()
    figures = _phase(records, duration)
    answered = max(1, len(records))
    figures["server"] = {
        "app_cpu_ms_per_request": 1000 * cpu / answered,
        **{f"{server}_queries_per_request": calls / answered for server, (calls, _) in statements.items()},
        **{f"{server}_exec_ms_per_request": ms / answered for server, (_, ms) in statements.items()},
        **{f"{server}_connections_peak": peak for server, peak in sampler.peak.items()},
        "primary_top_statements": top,
    }
    figures["phase"] = phase
    return figures


class _Phases:
    """The wall seconds of each phase of the run, printed as each ends, and the full run's estimate.

    Each phase knows its planned load seconds (a function of the durations): the full run's
    estimate is each phase's measured seconds less this run's planned seconds plus the full
    run's (what a phase costs beyond its load, starting and stopping processes, is the same).
    """

    def __init__(self, out: TextIO, durations: dict[str, float]) -> None:
        self.out = out
        self.durations = durations
        self.full = _durations(False)
        #: (phase, measured seconds, full run's estimate)
        self.rows: list[tuple[str, float, float]] = []

    @contextmanager
    def __call__(
        self, name: str, planned: Callable[[dict[str, float]], float] = lambda d: 0.0
    ) -> Iterator[None]:
        started = time.monotonic()
        yield
        seconds = time.monotonic() - started
        self.rows.append((name, seconds, max(0.0, seconds - planned(self.durations)) + planned(self.full)))
        self.out.write(f"  {name}: {seconds:.1f} s\n")
        self.out.flush()


@contextmanager
def _warmed(
    config: str, articles: int, sections: list[tuple[int, str]], warm_up: float, **deploy: Any
) -> Iterator[tuple[Deployment, Mix]]:
    """Deploy *config*, log the staff user in, and warm it up for *warm_up* seconds (a closed
    loop, not counted: caches filled as in steady state); yield the deployment and the mix."""
    # A previous configuration's faults (the replica killed and started again) broke this
    # process's own connections: its figures' queries open new ones.
    connections.close_all()
    with deployment(config, **deploy) as running:
        mix = Mix(articles, sections, login(running.host, running.port, *STAFF), edit_forms())
        closed_loop(running.host, running.port, mix, connections=CONNECTIONS, duration=warm_up)
        yield running, mix


def _half_capacity(figures: dict[str, Any]) -> float:
    """Half of a configuration's capacity (its closed loop's throughput if no step passed)."""
    return max(
        0.1, round(0.5 * (figures["capacity"]["rate"] or figures["closed loop"]["all"]["throughput"]), 2)
    )


def _fault_seconds(d: dict[str, float], count: int) -> float:
    return count * (d["fault before"] + d["fault during"] + d["fault after"])


def _one_config(
    config: str,
    articles: int,
    sections: list[tuple[int, str]],
    rates: list[float],
    fault_configs: tuple[str, ...],
    phases: _Phases,
    server: str = "gunicorn",
    fault_rate: float | None = None,
) -> dict[str, Any]:
    """Deploy *config* under *server* and load it. The ASGI run (uvicorn) is loaded at the WSGI
    run's fixed rates only: no closed loop, no capacity search, no faults. The faults run at
    *fault_rate* (default: the first open loop's), after a run at that rate with no fault, if
    it is another, for their baseline. ``tuned`` runs at half of its own capacity too (the
    faults' rate, :data:`HALF_TUNED`), with no fault."""
    durations, name = phases.durations, config if server == "gunicorn" else f"{config} ({server})"
    with ExitStack() as stack:
        with phases(f"{name}: start, warm-up", lambda d: d["warm-up"]):
            running, mix = stack.enter_context(
                _warmed(config, articles, sections, durations["warm-up"], server=server)
            )
            host, port = running.host, running.port
        result: dict[str, Any] = {
            "server": server,
            "workers": running.workers,
            # The processes the deployment started (all stopped when it ends).
            "pids": [running.server.pid, *running.worker_pids(), running.celery.pid if running.celery else 0],
        }
        if server == "gunicorn":
            with phases(f"{name}: closed loop", lambda d: d["closed loop"]):
                result["closed loop"] = _measured(
                    running,
                    "closed loop",
                    lambda: closed_loop(
                        host, port, mix, connections=CONNECTIONS, duration=durations["closed loop"]
                    ),
                    durations["closed loop"],
                )
            with phases(f"{name}: capacity", lambda d: d["step"] * d["steps"]):
                result["capacity"] = capacity_search(
                    lambda rate: open_loop(host, port, mix.restart(), rate=rate, duration=durations["step"]),
                    start=result["closed loop"]["all"]["throughput"],
                    steps=int(durations["steps"]),
                    step_seconds=durations["step"],
                )
        if not rates:
            # Stock runs first: its capacity sets every configuration's open-loop rates (its
            # closed loop's throughput if no step of the search kept the p99 under the limit).
            capacity = result["capacity"]["rate"] or result["closed loop"]["all"]["throughput"]
            rates.extend(max(0.1, round(capacity * load, 2)) for load in LOADS)
        for load, rate in zip(LOADS, rates, strict=True):
            with phases(f"{name}: open {load:.0%}", lambda d: d["open"]):
                result[f"open {load:.0%}"] = _measured(
                    running,
                    f"open loop at {rate:g}/s",
                    lambda rate=rate: open_loop(
                        host, port, mix.restart(), rate=rate, duration=durations["open"]
                    ),
                    durations["open"],
                )
            result[f"open {load:.0%}"]["rate"] = rate
        with phases(f"{name}: pages alone", lambda d: d["probe"] * len(PAGES)):
            result["pages"] = probe_pages(running, mix, durations["probe"], _measured)
        if config == "tuned" and server == "gunicorn":
            # The faults' rate is half of tuned's capacity: tuned at that rate too, with no
            # fault, is what django-scale's primary time per request is held against (at 80 %
            # of stock's capacity a phase holds a few dozen requests and hardly a write).
            fault_rate = _half_capacity(result)
        steady = result[f"open {LOADS[0]:.0%}"]
        if fault_rate is not None and fault_rate != rates[0] and server == "gunicorn":
            with phases(f"{name}: open at the faults' rate", lambda d: d["open"]):
                steady = result[HALF_TUNED] = _measured(
                    running,
                    f"open loop at {fault_rate:g}/s",
                    lambda: open_loop(host, port, mix.restart(), rate=fault_rate, duration=durations["open"]),
                    durations["open"],
                )
            steady["rate"] = fault_rate
        if config in fault_configs and server == "gunicorn":
            with phases(f"{name}: faults", lambda d: _fault_seconds(d, len(result["faults"]["faults"]))):
                result["faults"] = _faults(
                    running,
                    mix,
                    durations,
                    steady["rate"],
                    steady["all"]["p99"],
                    baselines(steady, result["pages"]),
                )
        with phases(f"{name}: stop"):
            stack.close()
        return result


def _through_expiry(
    config: str, articles: int, sections: list[tuple[int, str]], rate: float, ttl: int, phases: _Phases
) -> dict[str, Any]:
    """Deploy *config* with its cached pages fresh for *ttl* seconds only, and load it at *rate*.

    The hand-tuned pages expire (``cache_page``, ``get_or_set``, ``{% cache %}``) and are built
    again by the requests that find them gone, all of those at once (a stampede); django-scale's
    go stale and are served while one refill rebuilds each. The open loop lasts the ``open``
    phase's seconds, several TTLs: what it measures is the p99 through the expiries.
    """
    durations = phases.durations
    with (
        phases(f"{config}: through cache expiry", lambda d: d["warm-up"] + d["open"]),
        _warmed(config, articles, sections, durations["warm-up"], cache_ttl=ttl) as (running, mix),
    ):
        result = _measured(
            running,
            f"open loop at {rate:g}/s, pages fresh for {ttl} s",
            lambda: open_loop(
                running.host, running.port, mix.restart(), rate=rate, duration=durations["open"]
            ),
            durations["open"],
        )
    result["rate"], result["ttl"] = rate, ttl
    return result


def _phase_seconds(phases: _Phases, quick: bool) -> dict[str, Any]:
    """Each phase's seconds, and the full run's estimate from them (seeding aside: it grows
    with ``--articles``, and a full run's seeding is measured by a full run only)."""
    rows = [
        {"phase": name, "seconds": seconds, "full run estimate": full} for name, seconds, full in phases.rows
    ]
    if quick:
        # The full run's faults run on stock too, for contrast: as long as scale's.
        rows += [
            {
                "phase": "stock: faults (full run only)",
                "seconds": 0.0,
                "full run estimate": row["full run estimate"],
            }
            for row in rows
            if row["phase"] == "scale: faults"
        ]
    estimate = sum(row["full run estimate"] for row in rows if row["phase"] != "seed")
    return {"phases": rows, "full run estimate without seeding": estimate}


def _floors(phases: _Phases) -> dict[str, Any]:
    """The no-op application under each app server, one client: the floor under the agreement."""
    found = {}
    for server in SERVERS:
        with phases(f"floor ({server})", lambda d: d["probe"]), floor(server) as running:
            found[server] = probe_floor(running, phases.durations["probe"])
    return found


def run(out: TextIO, quick: bool = False, articles: int | None = None, json_path: str | None = None) -> None:
    """Seed, deploy each configuration in turn, load it, and print (and write) the figures."""
    require_replica(out, "site")
    articles = articles or (100_000 if quick else 1_000_000)
    durations = _durations(quick)
    phases = _Phases(out, durations)
    started = time.monotonic()
    with phases("seed"):
        counts = seed(articles)
    out.write(
        f"seeded: {counts['news_article']:,} articles, {counts['news_article_tags']:,} tags of articles, "
        f"{counts['news_comment']:,} comments ({time.monotonic() - started:.0f} s)\n"
    )
    # This process's replica monitors would count among the replica's statements.
    for alias in conf.REPLICAS:
        monitor(alias).stop()
    sections = list(Section.objects.using("default").order_by("pk").values_list("pk", "slug"))
    results: dict[str, Any] = {
        "command": "manage.py bench site" + (" --quick" if quick else "") + f" --articles {articles}",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "django": django.get_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "articles": articles,
        "durations": durations,
        "connections": CONNECTIONS,
        "workers": WORKERS,
        "loads": LOADS,
        "schedule": "uniform (fixed intervals)",
        "configs": {},
    }
    rates: list[float] = []
    for config in CONFIGS:
        out.write(f"{config}: deploying and loading ...\n")
        out.flush()
        # django-scale's faults at half of hand-tuned's capacity, where a second holds enough
        # requests for a p99 (at stock's half capacity it holds two); stock's at its own rate.
        fault_rate = _half_capacity(results["configs"]["tuned"]) if config == "scale" else None
        results["configs"][config] = _one_config(
            config, articles, sections, rates, _fault_configs(quick), phases, fault_rate=fault_rate
        )
    results["rates"] = rates
    expiry_rate = _half_capacity(results["configs"]["tuned"])
    out.write(f"tuned and scale through cache expiry, at {expiry_rate:g}/s: deploying and loading ...\n")
    out.flush()
    results["expiry"] = {
        config: _through_expiry(config, articles, sections, expiry_rate, EXPIRY_TTL[quick], phases)
        for config in EXPIRY_CONFIGS
    }
    out.write("scale under uvicorn (ASGI), at the same rates: deploying and loading ...\n")
    out.flush()
    results["asgi"] = _one_config("scale", articles, sections, rates, (), phases, server="uvicorn")
    results["floor"] = _floors(phases)
    results["seconds"] = time.monotonic() - started
    results["phases"] = _phase_seconds(phases, quick)
    print_results(out, results)
    if json_path:
        path = Path(json_path)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        out.write(f"figures written to {json_path}\n")
        # The plots for the docs, beside the figures.
        for name, draw in (("timeline", timeline_svg), ("bars", bars_svg)):
            plot = path.with_name(f"{path.stem}-{name}.svg")
            plot.write_text(draw(results))
            out.write(f"plot written to {plot}\n")
