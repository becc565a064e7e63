"""The status page (/scale/status/): who may see it, what it shows, and in a real browser."""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.conf import settings
from django.test import Client, override_settings
from support import create_user, log_in
from test_browser import _browser

from django_scale import metrics
from django_scale.metrics.charts import line_chart
from django_scale.metrics.recording import disable
from django_scale.metrics.sketch import bucket_of
from django_scale.testing import override_scale_settings

if TYPE_CHECKING:
    from pytest_django.live_server_helper import LiveServer

DB = pytest.mark.django_db(transaction=True, databases="__all__")
MIDDLEWARE = [
    "django_scale.metrics.MetricsMiddleware",
    "django_scale.middleware.ScaleMiddleware",
    *[name for name in settings.MIDDLEWARE if name != "django_scale.middleware.ScaleMiddleware"],
]


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[None]:
    """Request metrics on, and a few requests of two routes recorded.

    Every read on the primary: what the page shows does not depend on replication, and a
    logged-in session is never looked for on a replica that has not replayed it yet.
    """
    with (
        override_settings(ROOT_URLCONF="testapp.metrics_urls", MIDDLEWARE=MIDDLEWARE),
        override_scale_settings(METRICS_DIR=str(tmp_path), REPLICAS=[]),
    ):
        client = Client()
        for pk in range(10):
            assert client.get(f"/authors/{pk}/").status_code == 200
            assert client.get(f"/plain/p{'x' * pk}/").status_code == 200
        yield
    disable()


@DB
def test_the_status_page_is_for_staff_only(recorded: None) -> None:
    client = Client()
    response = client.get("/scale/status/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=/scale/status/")
    log_in(client, create_user("reader"))
    assert client.get("/scale/status/").status_code == 302
    # The token opens the machine-readable export, not the page.
    token = {"authorization": "Bearer " + "t" * 40}
    with override_scale_settings(METRICS_TOKEN="t" * 40):
        assert Client().get("/scale/status/", headers=token).status_code == 302


@DB
def test_the_status_page_shows_routes_replicas_cache_and_charts(recorded: None) -> None:
    client = Client()
    log_in(client, create_user("staff", is_staff=True))
    response = client.get("/scale/status/")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('class="django-scale-chart"') == 2  # one chart per route recorded
    assert "<title>author GET: p50 and p99 per minute</title>" in html
    routes = response.context["document"]["routes"]
    assert {(row["route"], row["method"]) for row in routes} >= {
        ("author", "GET"),
        ("/^plain/(?P<slug>[a-z]+)/$", "GET"),
    }
    [author] = [row for row in routes if row["route"] == "author"]
    assert author["shown"]["requests"] == 10
    assert 'id="cache-hit-rate">Hit rate: 100 %' in html  # the author view counts swr.hit
    assert f"<td>{settings.DJANGO_SCALE.get('PRIMARY', 'default')}</td><td>primary</td>" in html
    assert client.get("/scale/status/?scope=cluster").status_code == 200


def test_charts_escape_their_labels_and_break_lines_at_empty_minutes() -> None:
    chart = line_chart(
        {"<p50>": [(1, 0.01), (2, 0.02), (4, 0.03)], "p99": []}, list(range(6)), title="<script>x</script>"
    )
    assert "<script>" not in chart
    assert "&lt;script&gt;" in chart and "&lt;p50&gt;" in chart
    assert chart.count("<polyline") == 1  # minutes 1-2; minute 4 stands alone
    assert chart.count("<circle") == 1


@DB
def test_the_status_page_in_a_browser(
    recorded: None, live_server: LiveServer, chromium: str, tmp_path: Path
) -> None:
    create_user("ops", is_staff=True)

    # The page reads the host's file: the requests recorded above, whatever process serves
    # it, and a quarter of an hour of the author route's latencies written straight into it,
    # oldest first, by another process (a slot's series never go back a minute: in this
    # process's slot the author route's latest minute is the current one).
    def back_fill() -> None:
        store = metrics.get_store()
        now = time.time()
        rng = random.Random(14)
        for minutes_ago in range(14, 0, -1):
            for _ in range(200):
                value = rng.lognormvariate(math.log(0.02 + 0.002 * (minutes_ago % 5)), 0.6)
                store.record(
                    [("request\x1fauthor\x1fGET", bucket_of(value), value)], [], now=now - 60 * minutes_ago
                )

    process = multiprocessing.get_context("fork").Process(target=back_fill)
    process.start()
    process.join(60)
    assert process.exitcode == 0
    with _browser(chromium) as browser, browser.new_context(base_url=live_server.url) as context:
        page = context.new_page()
        page.goto("/scale/status/")
        page.wait_for_url(re.compile(r"/admin/login/"))
        page.fill("#id_username", "ops")
        page.fill("#id_password", "pw")
        page.click("input[type=submit]")
        page.wait_for_url(re.compile(r"/scale/status/$"))
        assert page.locator("svg.django-scale-chart").count() == 2
        chart = page.locator("svg.django-scale-chart").first
        assert chart.bounding_box() is not None and chart.bounding_box()["width"] > 100  # type: ignore[index]
        # The author route's p50 and p99 lines over the last 15 minutes.
        assert page.locator("svg.django-scale-chart polyline").count() >= 2
        assert "author" in page.locator("#routes").inner_text()
        assert "primary" in page.locator("#replicas").inner_text()
        directory = Path(os.environ.get("DJANGO_SCALE_TEST_SCREENSHOTS", tmp_path))
        page.screenshot(path=str(directory / "status-page.png"), full_page=True)
