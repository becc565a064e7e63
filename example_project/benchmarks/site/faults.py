"""``bench site``'s faults: parts of the deployment broken during a fixed-rate run, and a canary.

Each :class:`Fault` breaks one part and puts it back:

* ``replica killed``: the streaming replica stopped as a crash would (``pg_ctl -m immediate``,
  through the test harness's server control), started again at recovery;
* ``replica paused``: its replay paused (``pg_wal_replay_pause()``): its lag grows;
* ``redis stopped`` / ``redis frozen``: the cache's Redis stopped (started again, empty) or
  SIGSTOPped (connections open, nothing answers);
* ``broker stopped``: the Celery broker's Redis stopped;
* ``runaway lock``: a query on the primary that holds a lock on the comments table (``SHARE``:
  reads go on, every comment waits) and sleeps. django-scale's sniper is the cure: in the
  ``scale`` configuration it runs here, with the example project's rules (a long query, then
  the session terminated), on a threshold of :data:`SNIPER_MAX_DURATION` seconds instead of
  30 s, because the fault lasts seconds; other configurations have no sniper, and the query
  is cancelled at recovery.

The :class:`Canary` is a logged-in user who, throughout, posts a comment and reads the
article back: a read that does not show the comment just written is a stale read.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from django.db import connections

from django_scale.conf import conf

from benchmarks.site.deploy import Deployment
from benchmarks.site.loadgen import Browser, Record, percentile, summarise

__all__ = [
    "SNIPER_MAX_DURATION",
    "Canary",
    "Fault",
    "baselines",
    "faults",
    "recovery_seconds",
    "run_fault",
    "timeline",
]

#: Seconds a query may run on the primary before the bench's sniper cancels it (scale only).
SNIPER_MAX_DURATION = 1.0
#: Seconds between the bench's sniper's runs.
SNIPER_INTERVAL = 0.25
#: The runaway query's ``application_name`` (to find and cancel it at recovery).
RUNAWAY = "bench-site-runaway"


@dataclass
class Fault:
    """One part of the deployment broken by ``inject()`` and put back by ``recover()``."""

    name: str
    inject: Callable[[], None]
    recover: Callable[[], None]
    #: Set by the fault while it runs: e.g. whether the sniper killed the runaway query.
    notes: dict[str, Any] = field(default_factory=dict)


def _replica_control() -> Any:
    """The harness's control of the replica server, or None (external servers)."""
    harness = sys.modules.get("harness")
    return harness.services().replica_control if harness is not None else None


def _execute(alias: str, sql: str) -> None:
    connection = connections[alias]
    # A connection from before a fault (the replica was restarted) is broken: a fresh one.
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute(sql)
    connection.close()


class _Runaway:
    """A query on the primary holding a SHARE lock on the comments table, in a thread."""

    def __init__(self, sniper: bool) -> None:
        self.sniper = sniper
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.sniped = 0
        self.snipe_thread: threading.Thread | None = None
        self.sniping = threading.Event()

    def _hold(self) -> None:
        try:
            with connections["default"].cursor() as cursor:
                cursor.execute(f"SET application_name = '{RUNAWAY}'")
                # One statement: when it is cancelled, its (autocommit) transaction and lock end.
                with suppress(Exception):
                    cursor.execute(
                        "DO $$ BEGIN LOCK TABLE news_comment IN SHARE MODE; PERFORM pg_sleep(3600); END $$"
                    )
        finally:
            connections.close_all()

    def _snipe(self) -> None:
        from django_scale.sniper import run_loop

        rules = [
            {"name": "long query", "max_duration": SNIPER_MAX_DURATION},
            {
                "name": "idle in transaction",
                "states": ["idle in transaction", "idle in transaction (aborted)"],
                "max_duration": SNIPER_MAX_DURATION,
            },
        ]
        try:
            for report in run_loop(SNIPER_INTERVAL, stop=self.stop, using="default", rules=rules, grace=1.0):
                self.sniped += len(report.kills)
                self.sniping.set()
        finally:
            self.sniping.set()
            connections.close_all()

    def inject(self) -> None:
        self.stop.clear()
        if self.sniper:
            # The sniper is on duty before the runaway starts, as a deployed one would be.
            self.sniping.clear()
            self.snipe_thread = threading.Thread(target=self._snipe, daemon=True)
            self.snipe_thread.start()
            self.sniping.wait(timeout=30)
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()

    def recover(self) -> None:
        self.stop.set()
        if self.snipe_thread is not None:
            self.snipe_thread.join()
        _execute(
            "default",
            f"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = '{RUNAWAY}'",
        )
        if self.thread is not None:
            self.thread.join(timeout=30)


def faults(running: Deployment) -> list[Fault]:
    """Return the faults this deployment can suffer, in the order they run."""
    replica = conf.REPLICAS[0]
    found: list[Fault] = []
    control = _replica_control()
    if control is not None:
        found.append(Fault("replica killed", control.stop, control.start))
    found += [
        Fault(
            "replica paused",
            lambda: _execute(replica, "SELECT pg_wal_replay_pause()"),
            lambda: _execute(replica, "SELECT pg_wal_replay_resume()"),
        ),
        Fault("redis stopped", running.cache.stop, running.cache.start),
        Fault("redis frozen", running.cache.freeze, running.cache.thaw),
        Fault("broker stopped", running.broker.stop, running.broker.start),
    ]
    runaway = _Runaway(sniper=running.config == "scale")
    fault = Fault("runaway lock", runaway.inject, lambda: None)

    def recover() -> None:
        runaway.recover()
        fault.notes["sniped"] = runaway.sniped

    fault.recover = recover
    found.append(fault)
    return found


class Canary(threading.Thread):
    """A user who posts a comment on one article and reads the article back, over and over.

    ``events`` holds ``(monotonic time, kind)`` per round: ``ok``, ``stale`` (the page did not
    show the comment the answered POST had just saved) or ``error`` (no answer, or not 303 to
    the POST / 200 to the GET). Cookies the server sets (the read-your-writes cookie) are kept
    and sent back, as a browser does.
    """

    def __init__(self, host: str, port: int, browser: Browser, slug: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.slug, self.interval = host, port, slug, interval
        self.browser = browser
        self.events: list[tuple[float, str]] = []
        #: What went wrong in each ``error`` round: ``(monotonic time, what)``.
        self.errors: list[tuple[float, str]] = []
        self.stopped = threading.Event()
        self.marker = uuid.uuid4().hex[:12]

    def _request(self, method: str, path: str, body: str = "") -> tuple[int, str]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            headers = {"Cookie": self.browser.header()}
            if method == "POST":
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                headers["X-CSRFToken"] = self.browser.get("csrftoken")
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            text = response.read().decode("utf-8", errors="replace")
            self.browser.take(response.headers.get_all("Set-Cookie") or [])
            return response.status, text
        finally:
            connection.close()

    def _error(self, what: str) -> str:
        self.errors.append((time.monotonic(), what))
        return "error"

    def round(self, n: int) -> str:
        """Write comment *n* and read it back; return the round's kind."""
        body = f"canary {self.marker} {n}"
        try:
            status, _ = self._request(
                "POST",
                f"/articles/{self.slug}/comments/",
                urlencode({"author_name": "Canary", "body": body}),
            )
            if status != 303:
                return self._error(f"POST answered {status}")
            status, html = self._request("GET", f"/articles/{self.slug}/")
        except (OSError, http.client.HTTPException) as error:
            return self._error(f"{type(error).__name__}: {error}")
        if status != 200:
            return self._error(f"GET answered {status}")
        return "ok" if body in html else "stale"

    def run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            n += 1
            kind = self.round(n)
            self.events.append((time.monotonic(), kind))
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)

    def count(self, kind: str, start: float, end: float) -> int:
        """Rounds of *kind* that ended in [start, end)."""
        return sum(1 for at, k in self.events if k == kind and start <= at < end)


#: Width, in seconds, of the windows of the timeline and of the recovery test.
WINDOW = 0.5


def _windows(records: list[Record], origin: float, end: float) -> Iterator[tuple[float, list[Record]]]:
    """Per :data:`WINDOW` of intended send times from *origin* to *end*: its offset from
    *origin*, and the requests intended in it."""
    start = origin
    while start < end:
        yield round(start - origin, 3), [r for r in records if start <= r.intended < start + WINDOW]
        start += WINDOW


def timeline(records: list[Record], origin: float, end: float) -> list[dict[str, float]]:
    """Per :data:`WINDOW` of intended send times from *origin*: count, errors, p50, p99, max."""
    rows = []
    for offset, inside in _windows(records, origin, end):
        figures = summarise(inside, WINDOW)
        rows.append(
            {"t": offset, "requests": figures["requests"], "errors": figures["errors"],
             "p50": figures["p50"], "p99": figures["p99"], "max": figures["max"]}
        )  # fmt: skip
    return rows


def recovery_seconds(
    records: list[Record], recovered: float, limits: Mapping[str, float], end: float
) -> float | None:
    """Seconds from *recovered* (in steps of :data:`WINDOW`) from which on, to *end*, no request
    failed (a single failure counts) and the p99 is under the limit: each request's latency against its page's limit in
    *limits* (the ``"all"`` entry for a page without one), the p99 of those ratios under 1.

    Per page: an admin search, normally ten times slower than the front page, is held to its
    own limit, not the mix's. From a time on to the end, not per window: a window of a second
    holds a few requests, and the p99 of a few is their slowest, so one slow request of the
    ordinary 1 % would hold a window, and so the recovery, back. None if no time passes (the
    run ended before the site recovered).
    """
    after = [r for r in records if r.intended >= recovered]
    offset = 0.0
    while recovered + offset < end:
        since = [r for r in after if r.intended >= recovered + offset]
        failed = any(not 0 < r.status < 500 for r in since)
        ratios = [r.latency / limits.get(r.name, limits["all"]) for r in since]
        if not since:
            break  # the run ended before the site recovered
        if not failed and percentile(ratios, 0.99) < 1.0:
            return offset
        offset += WINDOW
    return None


def baselines(steady: dict[str, Any], alone: dict[str, Any]) -> dict[str, float]:
    """Each page's baseline p99, and the whole mix's (``"all"``), for the recovery test.

    A page's is the higher of its p99 in *steady* (figures of an open loop at the faults' rate,
    no fault: few requests of the rarer pages) and sent alone (*alone*: ``probe_pages()``'s
    figures, many requests of each page, no load beside them).
    """
    found = {"all": steady["all"]["p99"]}
    for page, summary in steady["pages"].items():
        found[page] = summary["p99"]
    for page, probe in alone.items():
        found[page] = max(found.get(page, 0.0), probe["generator"]["p99"])
    return found


def run_fault(
    fault: Fault,
    load: Callable[[float], list[Record]],
    canary: Canary,
    *,
    before: float,
    during: float,
    after: float,
    baseline_p99: float,
    page_baselines: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Run ``load(seconds)`` (a fixed-rate open loop) with *fault* injected *before* s into it.

    Return the fault's figures: 5xx and unanswered requests answered from the fault on (and how
    many of them were in flight at its instant), the canary's stale reads and errors, p99 before, during and after,
    the seconds to recover (in every window, each page's p99 back under twice its baseline in
    *page_baselines*, or *baseline_p99* for a page without one), the timeline.
    """
    limits = {page: 2 * p99 for page, p99 in (page_baselines or {}).items()}
    limits["all"] = 2 * baseline_p99
    instants: dict[str, float] = {}

    def break_and_mend() -> None:
        time.sleep(before)
        instants["injected"] = time.monotonic()
        fault.inject()
        instants["inject done"] = time.monotonic()
        time.sleep(max(0.0, instants["injected"] + during - time.monotonic()))
        instants["recovering"] = time.monotonic()
        fault.recover()
        instants["recovered"] = time.monotonic()

    origin = time.monotonic()
    thread = threading.Thread(target=break_and_mend, daemon=True)
    thread.start()
    records = load(before + during + after)
    thread.join()
    end = max([r.intended for r in records] + [instants["recovered"]]) + WINDOW
    injected, recovered = instants["injected"], instants["recovered"]

    def p99(start: float, stop: float) -> float:
        return summarise([r for r in records if start <= r.intended < stop])["p99"]

    # Errors answered from the fault on: those of requests sent after it, and of those in flight.
    hit = [r for r in records if r.end > injected and (r.status == 0 or r.status >= 500)]
    return {
        "fault": fault.name,
        # Seconds from the run's start.
        "window": {name: round(at - origin, 3) for name, at in instants.items()},
        "errors": len(hit),
        "5xx": sum(1 for r in hit if r.status >= 500),
        "no answer": sum(1 for r in hit if r.status == 0),
        "in flight at the fault": sum(1 for r in records if r.start <= injected < r.end),
        "errors in flight at the fault": sum(1 for r in hit if r.start <= injected),
        "canary stale reads": canary.count("stale", injected, end + 5),
        "canary errors": canary.count("error", injected, end + 5),
        "canary error details": sorted({what for at, what in canary.errors if injected <= at < end + 5}),
        "canary rounds": sum(canary.count(kind, injected, end + 5) for kind in ("ok", "stale", "error")),
        "baseline p99": baseline_p99,
        "p99 before": p99(origin, injected),
        "p99 during": p99(injected, recovered),
        "p99 after": p99(recovered, end),
        "baseline p99 per page": dict(page_baselines or {}),
        "recovery seconds": recovery_seconds(records, recovered, limits, end),
        "notes": dict(fault.notes),
        "timeline": timeline(records, origin, end),
    }
