"""Merging: a host's snapshot as JSON raw sketches, and the hosts of a site merged.

Inside a host, :meth:`~django_scale.metrics.store.SlotStore.snapshot` already sums every
worker's slot. Across hosts, sketches merge by adding bucket counts, so any number of hosts
add up exactly as their workers do. Two ways to gather them:

* **through the cache**: :func:`publish` writes this host's snapshot under its own key of
  ``CACHE_ALIAS`` (the ``/scale/`` views do it on each scrape) and :func:`cluster` reads every
  host's latest and merges them;
* **by pulling**: fetch each host's ``/scale/sketches.json`` and pass the documents to
  :func:`merge_documents` (``manage.py scale_status --pull URL ...`` does it).
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from django.core.cache import caches

from django_scale.conf import conf
from django_scale.exceptions import MetricsDocumentError
from django_scale.metrics.kills import merge_kills, recent_kills
from django_scale.metrics.recording import get_store
from django_scale.metrics.sketch import RELATIVE_ACCURACY, Sketch
from django_scale.metrics.store import WINDOWS, HostSnapshot

__all__ = [
    "cluster",
    "from_document",
    "local_snapshot",
    "merge_snapshots",
    "merge_documents",
    "publish",
    "pull",
    "to_document",
]

#: The cache key of the list of hosts that published, and the prefix of each host's key.
HOSTS_KEY = "django_scale:metrics:hosts"
HOST_KEY = "django_scale:metrics:host:"
#: How long a host's published snapshot counts: a host that stopped publishing drops out of
#: the merged windows after the longest one.
PUBLISHED_FOR = 20 * 60
FORMAT = 1


def local_snapshot(windows: Iterable[int] = WINDOWS, kills: bool = True) -> HostSnapshot:
    """Return this host's snapshot: every worker slot of the file summed, and its recent kills."""
    snapshot = get_store().snapshot(windows)
    if kills:
        snapshot.kills = recent_kills()
    return snapshot


def to_document(snapshot: HostSnapshot, host: str | None = None) -> dict[str, Any]:
    """Return *snapshot* as JSON-able raw sketches (what ``/scale/sketches.json`` serves)."""
    timings: dict[str, Any] = {}
    for name, (count, total) in snapshot.totals.items():
        windows = snapshot.windows.get(name, {})
        timings[name] = {
            "count": count,
            "sum": total,
            "windows": {str(window): sketch.to_json() for window, sketch in sorted(windows.items())},
        }
    return {
        "format": FORMAT,
        "host": host or socket.gethostname(),
        "minute": snapshot.minute,
        "relative_accuracy": RELATIVE_ACCURACY,
        "timings": timings,
        "counters": dict(snapshot.counters),
        "live_slots": snapshot.live_slots,
        "used_slots": snapshot.used_slots,
        "dropped": snapshot.dropped,
        "kills": snapshot.kills,
    }


def from_document(document: Mapping[str, Any]) -> HostSnapshot:
    """Return the snapshot a :func:`to_document` document describes (:exc:`~django_scale.exceptions.MetricsDocumentError` if malformed)."""
    if document.get("format") != FORMAT or document.get("relative_accuracy") != RELATIVE_ACCURACY:
        raise MetricsDocumentError("not a django-scale metrics document of this version")
    try:
        snapshot = HostSnapshot(minute=int(document["minute"]))
        for name, timing in dict(document["timings"]).items():
            snapshot.totals[name] = (int(timing["count"]), float(timing["sum"]))
            snapshot.windows[name] = {
                int(window): Sketch.from_json(sketch) for window, sketch in dict(timing["windows"]).items()
            }
        snapshot.counters = {str(name): int(value) for name, value in dict(document["counters"]).items()}
        snapshot.live_slots = int(document.get("live_slots", 0))
        snapshot.used_slots = int(document.get("used_slots", 0))
        snapshot.dropped = int(document.get("dropped", 0))
        kills = list(document.get("kills", []))
        if not all(isinstance(kill, dict) for kill in kills):
            raise MetricsDocumentError("not a django-scale metrics document: a kill is not an object")
        snapshot.kills = merge_kills([kills])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, MetricsDocumentError):
            raise
        raise MetricsDocumentError(f"not a django-scale metrics document: {error!r}") from None
    return snapshot


def merge_snapshots(snapshots: Iterable[HostSnapshot]) -> HostSnapshot:
    """Return the sum of *snapshots*: sketches merged, totals and counters added, kills merged."""
    merged: HostSnapshot | None = None
    kills = []
    for snapshot in snapshots:
        kills.append(snapshot.kills)
        if merged is None:
            merged = HostSnapshot(minute=snapshot.minute)
        merged.minute = max(merged.minute, snapshot.minute)
        for name, windows in snapshot.windows.items():
            into = merged.windows.setdefault(name, {})
            for window, sketch in windows.items():
                into.setdefault(window, Sketch()).merge(sketch)
        for name, (count, total) in snapshot.totals.items():
            known = merged.totals.get(name, (0, 0.0))
            merged.totals[name] = (known[0] + count, known[1] + total)
        for name, value in snapshot.counters.items():
            merged.counters[name] = merged.counters.get(name, 0) + value
        merged.live_slots += snapshot.live_slots
        merged.used_slots += snapshot.used_slots
        merged.dropped += snapshot.dropped
    if merged is None:
        return HostSnapshot(minute=0)
    merged.kills = merge_kills(kills)
    return merged


def merge_documents(documents: Iterable[Mapping[str, Any]]) -> HostSnapshot:
    """Return the merge of hosts' ``/scale/sketches.json`` documents."""
    return merge_snapshots(from_document(document) for document in documents)


def publish(document: Mapping[str, Any]) -> None:
    """Write this host's *document* to the cache, for :func:`cluster` on any host."""
    cache = caches[conf.CACHE_ALIAS]
    host = str(document["host"])
    cache.set(HOST_KEY + host, json.dumps(document), PUBLISHED_FOR)
    hosts = set(cache.get(HOSTS_KEY) or ())
    if host not in hosts:
        # Two hosts adding themselves at once may lose one: it is back on its next publish.
        cache.set(HOSTS_KEY, sorted(hosts | {host}), None)


def cluster() -> HostSnapshot:
    """Return every host's latest published snapshot, merged (hosts silent for 20 min drop out)."""
    cache = caches[conf.CACHE_ALIAS]
    hosts = cache.get(HOSTS_KEY) or []
    found = cache.get_many([HOST_KEY + host for host in hosts])
    return merge_documents(json.loads(value) for value in found.values())


def pull(url: str, token: str, timeout: float = 10.0) -> dict[str, Any]:
    """Fetch one host's ``sketches.json`` from *url* with the bearer *token*."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the operator's URL)
        document: dict[str, Any] = json.loads(response.read())
    return document
