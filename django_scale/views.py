"""The ``/scale/`` endpoints: Prometheus text and raw sketches, for staff or a bearer token.

Include them with ``path("scale/", include("django_scale.urls"))``. Each request of
``sketches.json`` (and ``manage.py scale_status --publish``) also publishes this host's sketches
to the cache, so ``?scope=cluster`` on any host merges every host published in the last 20
minutes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TypeVar

from django.contrib import admin
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseForbidden, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.crypto import constant_time_compare
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from django_scale.breakers import Breakers
from django_scale.conf import conf
from django_scale.metrics import merge
from django_scale.metrics.charts import line_chart
from django_scale.metrics.export import prometheus_text
from django_scale.metrics.recording import SEP, get_store
from django_scale.metrics.status import replica_gauges, status_document
from django_scale.metrics.store import WINDOWS, HostSnapshot

__all__ = ["allowed", "metrics_view", "sketches_view", "status_view"]

T = TypeVar("T")

logger = logging.getLogger("django_scale.metrics")

#: The content type of Prometheus's text format.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def allowed(request: HttpRequest) -> bool:
    """Return whether *request* may read the metrics: a staff user, or the ``METRICS_TOKEN``."""
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    token = conf.METRICS_TOKEN
    header = request.META.get("HTTP_AUTHORIZATION", "")
    return bool(token) and header.startswith("Bearer ") and constant_time_compare(header[7:], token)


def _scope(request: HttpRequest) -> str | None:
    scope = request.GET.get("scope", "host")
    return scope if scope in ("host", "cluster") else None


#: The cache's breaker: after a failure (or a time-out: a hung cache), the views skip the cache
#: for ``CACHE_RETRY_AFTER`` seconds and serve this host's figures alone.
_breakers = Breakers(logger)


def _through_cache(call: Callable[[], T], default: T) -> T:
    """Return ``call()``, or *default* when the cache fails or its breaker is open."""
    name = f"the metrics cache {conf.CACHE_ALIAS!r}"
    if _breakers.is_open(name):
        return default
    try:
        result = call()
    except Exception as error:  # down, hung (a client time-out) or misconfigured: degrade
        _breakers.trip(name, error, conf.CACHE_RETRY_AFTER, metric="metrics.cache_down")
        return default
    _breakers.close(name)
    return result


def _cluster_or_local(local: HostSnapshot) -> HostSnapshot:
    """Return every published host merged, or *local* alone when the cache fails."""
    return _through_cache(merge.cluster, local)


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve Prometheus text: ``?window=1|5|15`` (minutes, default 5), ``?scope=host|cluster``."""
    if not allowed(request):
        return HttpResponseForbidden("Staff or the METRICS_TOKEN bearer token only.")
    try:
        window = int(request.GET.get("window", "5"))
    except ValueError:
        window = 0
    if window not in WINDOWS:
        return HttpResponseBadRequest("window must be 1, 5 or 15")
    scope = _scope(request)
    if scope is None:
        return HttpResponseBadRequest("scope must be host or cluster")
    if scope == "cluster":
        snapshot = _cluster_or_local(merge.local_snapshot())
    else:
        # Only the window asked for: a scrape stays cheap however many routes there are.
        snapshot = merge.local_snapshot(windows=(window,), kills=False)
    body = prometheus_text(snapshot, window, gauges=replica_gauges(snapshot))
    return HttpResponse(body, content_type=PROMETHEUS_CONTENT_TYPE)


@never_cache
@require_GET
def sketches_view(request: HttpRequest) -> HttpResponse:
    """Serve the host's (or ``?scope=cluster``) raw sketches as JSON; publish the host's to the cache."""
    if not allowed(request):
        return HttpResponseForbidden("Staff or the METRICS_TOKEN bearer token only.")
    scope = _scope(request)
    if scope is None:
        return HttpResponseBadRequest("scope must be host or cluster")
    local = merge.local_snapshot()
    document = merge.to_document(local)

    def publish() -> bool:
        merge.publish(document)
        return True

    published = _through_cache(publish, False)
    if scope == "cluster" and published:
        document = merge.to_document(_cluster_or_local(local), host="cluster")
    return JsonResponse(document, json_dumps_params={"separators": (",", ":")}, encoder=json.JSONEncoder)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3g}"


#: How many of the slowest routes the status page charts.
CHARTED_ROUTES = 5


@never_cache
@require_GET
def status_view(request: HttpRequest) -> HttpResponse:
    """The status page, in the admin's look: replicas, slowest routes with charts, cache, sniper.

    Staff users only (others are sent to the admin's login page); ``?scope=cluster`` merges
    every host published to the cache.
    """
    user = getattr(request, "user", None)
    if user is None or not (user.is_active and user.is_staff):
        return redirect_to_login(request.get_full_path(), reverse("admin:login"))
    scope = _scope(request) or "host"
    local = merge.local_snapshot()
    snapshot = _cluster_or_local(local) if scope == "cluster" else local
    document = status_document(snapshot)
    minute = snapshot.minute
    minutes = list(range(minute - 15, minute + 1))
    routes = document["routes"][:CHARTED_ROUTES]
    names = [f"request{SEP}{row['route']}{SEP}{row['method']}" for row in routes]
    history = get_store().history(names)
    for row, name in zip(routes, names, strict=True):
        per_minute = history.get(name, {})
        points = {at: per_minute[at].quantiles((0.5, 0.99)) for at in sorted(per_minute)}
        row["chart"] = line_chart(
            {
                "p50": [(at, found[0.5]) for at, found in points.items()],
                "p99": [(at, found[0.99]) for at, found in points.items()],
            },
            minutes,
            title=f"{row['route']} {row['method']}: p50 and p99 per minute",
        )
    for row in document["routes"]:
        figures = row["windows"][str(document["window"])]
        row["shown"] = {
            "requests": figures["requests"],
            **{key: _ms(figures.get(key)) for key in ("p50", "p95", "p99", "p999")},
            "db": ", ".join(f"{alias}: {_ms(seconds)}" for alias, seconds in row["db_seconds"].items())
            or "-",
            "queries": ", ".join(f"{alias}: {count:.1f}" for alias, count in row["queries"].items()) or "-",
        }
    kills = [
        {
            **kill,
            "when": f"{datetime.fromtimestamp(float(kill.get('at') or 0.0), tz=timezone.utc):%Y-%m-%d %H:%M:%S}",
        }
        for kill in document["kills"]
    ]
    context = {
        **admin.site.each_context(request),
        "kills": kills,
        "title": "django-scale status",
        # The admin's sidebar lists the models; this page has none of its own.
        "is_nav_sidebar_enabled": False,
        "scope": scope,
        "document": document,
        "charted": routes,
    }
    return TemplateResponse(request, "django_scale/status.html", context)
