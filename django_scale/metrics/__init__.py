"""Monitoring: counters, per-route percentiles merged across processes and hosts, export.

The parts, one concept each:

* :mod:`~django_scale.metrics.counters`: the per-process counters and timings of
  django-scale's features (:func:`increment`, :func:`observe`, :func:`snapshot`).
* :mod:`~django_scale.metrics.sketch`: :class:`Sketch`, a mergeable relative-error quantile
  sketch (DDSketch's logarithmic buckets, 1 % relative accuracy).
* :mod:`~django_scale.metrics.store`: :class:`SlotStore`, the host's shared-memory file with
  one slot per worker process (not per pid), and the 1/5/15 minute windows.
* :mod:`~django_scale.metrics.recording`: :class:`MetricsMiddleware`, which records each
  request by route and method.
* :mod:`~django_scale.metrics.pending`: the requests a process has not yet written, written
  in batches (:func:`flush` writes them now).
* :mod:`~django_scale.metrics.merge`: snapshots as JSON raw sketches; hosts merged through
  the cache or by pulling.
* :mod:`~django_scale.metrics.export`: Prometheus text exposition.
* :mod:`~django_scale.metrics.kills`: the query sniper's recent kills, shared by a host's
  processes (:func:`recent_kills`) and merged across hosts with the sketches.
* :mod:`~django_scale.metrics.status`: what ``manage.py scale_status`` prints.

See :doc:`/monitoring`.
"""

from __future__ import annotations

from django_scale.metrics.counters import Timing, increment, observe, reset, snapshot
from django_scale.metrics.export import prometheus_text
from django_scale.metrics.kills import recent_kills
from django_scale.metrics.merge import (
    cluster,
    local_snapshot,
    merge_documents,
    merge_snapshots,
    publish,
    to_document,
)
from django_scale.metrics.recording import MetricsMiddleware, enable, flush, get_store
from django_scale.metrics.sketch import Sketch
from django_scale.metrics.store import HostSnapshot, SlotStore

__all__ = [
    "HostSnapshot",
    "MetricsMiddleware",
    "Sketch",
    "SlotStore",
    "Timing",
    "cluster",
    "enable",
    "flush",
    "get_store",
    "increment",
    "local_snapshot",
    "merge_snapshots",
    "merge_documents",
    "observe",
    "prometheus_text",
    "publish",
    "recent_kills",
    "reset",
    "snapshot",
    "to_document",
]
