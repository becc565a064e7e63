"""``bench site`` per page: its queries, and the server's percentiles against the generator's.

After the load, each page of the mix is sent alone, by one client, one request after another,
for a few seconds (:func:`probe_pages`): ``pg_stat_statements`` then counts that page's queries
on the primary and the replica (the mix's figures are per request of the whole mix), and with
one client nothing waits in gunicorn's backlog, so the generator's times and the latencies
``MetricsMiddleware`` recorded inside Django (the ``scale`` configuration) measure the same
requests. The server side is read from the deployment's metrics file: the per-minute
sketches of every ``request`` series after the probe, less those before it (sketches add by
bucket, so they subtract too), are exactly the probe's requests; the ``queue`` series the same
way, the time from the generator's ``X-Request-Start`` (its send time) to the request's start in
Django. The generator's figure compared is its wire time (:attr:`~benchmarks.site.loadgen.Record.wire_time`):
from the request on the wire, the instant it stamped, to the last byte of the answer read;
opening the connection before it (one per request under gunicorn's sync workers) is reported
apart (``connect``). The server's latency plus its queue time spans all of it but the last part
of the answer: from the middleware's end to the last byte at the generator.

:func:`probe_floor` measures the same way a no-op application under the same app server: the
floor under any agreement, what the server, the socket and the generator cost with no Django.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django_scale.conf import conf
from django_scale.metrics.pending import Pending
from django_scale.metrics.recording import SEP
from django_scale.metrics.sketch import Sketch
from django_scale.metrics.store import SlotStore

from benchmarks.site.deploy import Deployment
from benchmarks.site.loadgen import Record, Request, closed_loop, percentile
from benchmarks.site.mix import PAGES, Mix, alone

__all__ = [
    "QUANTILES",
    "page_requests",
    "probe_floor",
    "probe_pages",
    "server_latencies",
    "sketch_difference",
]

#: The percentiles compared, server against generator.
QUANTILES = (0.5, 0.9, 0.99)
#: Requests drawn per page for its probe (sent round and round for the probe's seconds).
DRAWN = 50


def page_requests(mix: Mix, page: str, count: int = DRAWN) -> list[Request]:
    """Draw requests from *mix*, from its start, until *count* of them are for *page*; return
    those, without the redirects they would follow (a write's page alone is its POST)."""
    found: list[Request] = []
    i = 0
    mix.restart()
    while len(found) < count:
        request = mix(i)
        i += 1
        if request.name == page:
            found.append(alone(request))
    return found


def sketch_difference(after: dict[int, Sketch], before: dict[int, Sketch]) -> Sketch:
    """Return one sketch of what *after* (per-minute sketches) holds beyond *before*."""
    result = Sketch()
    for minute, sketch in after.items():
        earlier = before.get(minute, Sketch())
        for bucket, count in sketch.buckets.items():
            added = count - earlier.buckets.get(bucket, 0)
            if added:
                result.buckets[bucket] = result.buckets.get(bucket, 0) + added
                result.count += added
    return result


class _Requests:
    """The deployment's metrics file, read from this process (no slot claimed: it only reads)."""

    def __init__(self, running: Deployment) -> None:
        _, slots, series, memory = conf.metrics_options()
        self.store = SlotStore(running.metrics_dir, slots, series, memory)

    def history(self) -> dict[str, dict[int, Sketch]]:
        # A worker writes its requests in batches (METRICS_BATCH): what it had not written when
        # the load stopped, its timer writes within a second of its last write.
        time.sleep(Pending.interval + 0.5)
        names = [name for name in self.store.names(True) if name.startswith((f"request{SEP}", f"queue{SEP}"))]
        return self.store.history(names)


def server_latencies(
    before: dict[str, dict[int, Sketch]], after: dict[str, dict[int, Sketch]], series: str = "request"
) -> Sketch:
    """The values of *series* (``request``, ``queue``) recorded between two readings, all routes in one."""
    total = Sketch()
    for name, minutes in after.items():
        if name.startswith(f"{series}{SEP}"):
            total.merge(sketch_difference(minutes, before.get(name, {})))
    return total


def _quantiles(values: list[float]) -> dict[str, float]:
    return {f"p{q * 100:g}": percentile(values, q) for q in QUANTILES}


def probe_floor(running: Deployment, seconds: float) -> dict[str, Any]:
    """One client against :func:`~benchmarks.site.deploy.floor`'s no-op app: the generator's figures."""
    records = closed_loop(
        running.host, running.port, lambda i: Request("floor", "/"), connections=1, duration=seconds
    )
    answered = [record for record in records if record.status == 200]
    figures: dict[str, Any] = {
        "server": running.kind,
        "requests": len(records),
        "errors": len(records) - len(answered),
        **_quantiles([record.wire_time for record in answered]),
        "connect": _quantiles([record.sent - record.start for record in answered]),
    }
    # Each request's arrival at the application (the floor's log), paired in order with its
    # record (one client: one request after another): before the application, and after it.
    arrivals = (running.log_dir / "arrivals.log").read_text().splitlines()
    before, after = [], []
    for record, line in zip(records, arrivals, strict=False):
        stamp, arrived = line.split()
        if record.status == 200 and stamp.startswith("t="):
            queued = float(arrived) - int(stamp[2:]) / 1e6
            before.append(queued)
            after.append(record.wire_time - queued)
    figures["before the app"], figures["after the app"] = _quantiles(before), _quantiles(after)
    return figures


def probe_pages(
    running: Deployment,
    mix: Mix,
    seconds: float,
    measured: Callable[[Deployment, str, Callable[[], list[Record]], float], dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Probe each page alone; return per page its phase figures (``measured``'s), and the
    generator's and the server's percentiles where the deployment records metrics."""
    metrics = _Requests(running) if Path(running.metrics_dir).is_dir() else None
    results: dict[str, dict[str, Any]] = {}
    for page, _ in PAGES:
        requests = page_requests(mix, page)
        before = metrics.history() if metrics is not None else {}
        records: list[Record] = []

        def load(requests: list[Request] = requests, records: list[Record] = records) -> list[Record]:
            records += closed_loop(
                running.host,
                running.port,
                lambda i: requests[i % len(requests)],
                connections=1,
                duration=seconds,
            )
            return records

        figures = measured(running, f"{page} alone", load, seconds)
        answered = [record for record in records if 0 < record.status < 500]
        # From the request on the wire (its X-Request-Start) to the last byte: what the server's
        # latency plus queue time spans. Opening the connection comes before, apart.
        figures["generator"] = _quantiles([record.wire_time for record in answered])
        figures["connect"] = _quantiles([record.sent - record.start for record in answered])
        if metrics is not None:
            after = metrics.history()
            server, queue = server_latencies(before, after), server_latencies(before, after, "queue")
            figures["server"]["metrics_requests"] = server.count
            figures["server"]["metrics_queued"] = queue.count
            figures["server side"] = {f"p{q * 100:g}": server.quantile(q) for q in QUANTILES}
            figures["queue"] = {f"p{q * 100:g}": queue.quantile(q) for q in QUANTILES}
            # Percentile by percentile: with one client the queue time hardly varies, so the
            # sum of the two percentiles is close to the percentile of the sums.
            figures["server + queue"] = {
                key: (value or 0.0) + (figures["queue"][key] or 0.0)
                for key, value in figures["server side"].items()
            }
            # What neither the middleware nor the queue time covers (compare the floor's "after").
            figures["rest"] = {
                key: None if total is None else figures["generator"][key] - total
                for key, total in figures["server + queue"].items()
            }
        results[page] = figures
    if metrics is not None:
        metrics.store.release()
    return results
