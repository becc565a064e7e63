"""Request metrics end to end: MetricsMiddleware, the /scale/ export, scale_status, merging hosts."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.cache import caches
from django.core.management import call_command
from django.db import connection, connections
from django.test import AsyncClient, Client, override_settings
from django.test.utils import CaptureQueriesContext
from prometheus_client.parser import text_string_to_metric_families
from support import METRICS_TOKEN, create_user, log_in, metrics_middleware, recording_metrics

from django_scale import metrics
from django_scale.metrics.merge import cluster, publish, to_document
from django_scale.metrics.recording import (
    UNRESOLVED,
    _wrap_connection,
    disable,
    is_query_timer,
    queue_seconds,
)
from django_scale.metrics.store import SlotStore
from django_scale.testing import override_scale_settings

TOKEN = METRICS_TOKEN
DB = pytest.mark.django_db(transaction=True, databases="__all__")
MIDDLEWARE = metrics_middleware()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SlotStore]:
    """Request metrics on, in a metrics file of the test's own, with a token set."""
    with recording_metrics(str(tmp_path)) as recording:
        yield recording


def series(store: SlotStore, kind: str) -> dict[str, int]:
    snapshot = store.snapshot()
    found = {name: count for name, (count, _) in snapshot.totals.items() if name.startswith(kind + "\x1f")}
    found.update({name: value for name, value in snapshot.counters.items() if name.startswith(kind + "\x1f")})
    return found


@DB
def test_two_urls_of_one_route_are_one_series(store: SlotStore) -> None:
    client = Client()
    with ExitStack() as stack:
        captured = {
            alias: stack.enter_context(CaptureQueriesContext(connections[alias])) for alias in connections
        }
        for pk in (1, 2, 3):
            assert client.get(f"/authors/{pk}/").status_code == 200
    ran = {alias: len(queries) for alias, queries in captured.items() if len(queries)}
    assert client.post("/authors/4/").status_code == 200
    assert client.get("/plain/abc/").status_code == 200
    assert client.get("/plain/xyz/").status_code == 200
    assert series(store, "request") == {
        "request\x1fauthor\x1fGET": 3,
        "request\x1fauthor\x1fPOST": 1,
        # No URL name: the pattern, never the path.
        "request\x1f/^plain/(?P<slug>[a-z]+)/$\x1fGET": 2,
    }
    assert series(store, "requests") == {
        "requests\x1fauthor\x1fGET\x1f2xx": 3,
        "requests\x1fauthor\x1fPOST\x1f2xx": 1,
        "requests\x1f/^plain/(?P<slug>[a-z]+)/$\x1fGET\x1f2xx": 2,
    }
    # Every query of the GETs, counted on the alias that ran it (the view's read, and on
    # PostgreSQL what routing runs on a replica's connection).
    queries = series(store, "queries")
    assert {
        name.rsplit("\x1f", 1)[1]: value for name, value in queries.items() if "\x1fauthor\x1fGET\x1f" in name
    } == ran
    db = {
        name.rsplit("\x1f", 1)[1]: n
        for name, n in series(store, "db").items()
        if "\x1fauthor\x1fGET\x1f" in name
    }
    assert db == dict.fromkeys(ran, 3)  # one DB time per request and alias
    # The view's metrics.increment("swr.hit") is counted for its route and host-wide.
    assert store.snapshot().counters["event\x1fauthor\x1fGET\x1fswr.hit"] == 3
    assert store.snapshot().counters["counter\x1fswr.hit"] == 4


@DB
def test_a_404_flood_adds_no_series(store: SlotStore) -> None:
    client = Client()
    client.get("/authors/1/")
    before = len(store.names(True)), len(store.names(False))
    for index in range(50):
        assert client.get(f"/no/such/page/{index}/", {"q": index}).status_code == 404
    assert client.generic("BREW", "/no/such/pot/").status_code == 404
    metrics.flush()  # names() reads the file as it is: this process's batch written first
    assert len(store.names(True)) == before[0] + 2  # <unresolved> GET and OTHER
    assert series(store, "request") == {
        "request\x1fauthor\x1fGET": 1,
        f"request\x1f{UNRESOLVED}\x1fGET": 50,
        f"request\x1f{UNRESOLVED}\x1fOTHER": 1,
    }
    assert store.snapshot().counters[f"requests\x1f{UNRESOLVED}\x1fGET\x1f4xx"] == 50


@DB
def test_async_views_are_recorded_with_their_db_time(store: SlotStore) -> None:
    async def scenario() -> list[int]:
        client = AsyncClient()
        statuses = []
        for pk in (1, 2):
            response = await client.get(f"/async/authors/{pk}/", headers={"x-request-start": "t=1"})
            statuses.append(response.status_code)
        return statuses

    # async_to_sync runs the ORM's thread-sensitive calls in this thread, on the test's connection.
    assert async_to_sync(scenario)() == [200, 200]
    assert series(store, "request") == {"request\x1fasync-author\x1fGET": 2}
    queries = series(store, "queries")
    assert sum(queries.values()) == 2, queries
    # X-Request-Start an implausibly long time ago (1970) is not a queue time.
    assert series(store, "queue") == {}


def test_queue_time_from_x_request_start() -> None:
    now = 1_800_000_000.0
    assert queue_seconds("t=1799999999.75", now) == pytest.approx(0.25)
    assert queue_seconds("t=1799999999750", now) == pytest.approx(0.25)  # milliseconds
    assert queue_seconds("1799999999750000", now) == pytest.approx(0.25)  # microseconds
    assert queue_seconds("t=1800000000.5", now) == 0.0  # the proxy's clock is a little ahead
    assert queue_seconds("t=1", now) is None
    assert queue_seconds("garbage", now) is None
    assert queue_seconds(None, now) is None


@DB
def test_queue_time_is_recorded(store: SlotStore) -> None:
    Client().get("/authors/1/", headers={"x-request-start": f"t={time.time() - 0.05:.3f}"})
    snapshot = store.snapshot()
    sketch = snapshot.windows["queue\x1fauthor\x1fGET"][1]
    assert sketch.count == 1
    assert 0.04 <= (sketch.quantile(0.5) or 0) <= 5


@DB
def test_the_export_is_refused_to_anonymous_users_and_non_staff(store: SlotStore) -> None:
    client = Client()
    for url in ("/scale/metrics", "/scale/sketches.json"):
        assert client.get(url).status_code == 403
        assert client.get(url, headers={"authorization": "Bearer wrong"}).status_code == 403
        assert client.get(url, headers={"authorization": f"Bearer {TOKEN}x"}).status_code == 403
        assert client.get(url, headers={"authorization": TOKEN}).status_code == 403
    log_in(client, create_user("reader"))
    assert client.get("/scale/metrics").status_code == 403
    with override_scale_settings(METRICS_TOKEN=""):
        # No token set: an empty bearer token must not pass.
        assert Client().get("/scale/metrics", headers={"authorization": "Bearer "}).status_code == 403


@DB
def test_the_token_and_staff_read_prometheus_text(store: SlotStore) -> None:
    client = Client()
    for pk in range(20):
        client.get(f"/authors/{pk}/")
    response = client.get("/scale/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(response.content.decode())}
    latency = families["django_scale_request_seconds"]
    assert latency.type == "summary"
    samples = {
        (sample.name, sample.labels.get("quantile")): sample.value
        for sample in latency.samples
        if sample.labels.get("route") == "author"
    }
    assert samples[("django_scale_request_seconds_count", None)] == 20
    assert (
        0
        < samples[("django_scale_request_seconds", "0.5")]
        <= samples[("django_scale_request_seconds", "0.999")]
    )
    requests = families["django_scale_requests"]
    assert requests.type == "counter"
    assert [
        s.value for s in requests.samples if s.labels == {"route": "author", "method": "GET", "status": "2xx"}
    ] == [20]
    assert families["django_scale_metrics_slots"].samples
    log_in(client, create_user("staff", is_staff=True))
    assert client.get("/scale/metrics?window=15").status_code == 200
    assert client.get("/scale/metrics?window=7").status_code == 400
    document = client.get("/scale/sketches.json").json()
    assert document["timings"]["request\x1fauthor\x1fGET"]["count"] == 20
    assert (
        metrics.Sketch.from_json(document["timings"]["request\x1fauthor\x1fGET"]["windows"]["5"]).count == 20
    )


def test_label_values_are_escaped(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, 2, 8, 1)
    store.record([('request\x1fa"b\\c\nd\x1fGET', 10, 0.001)], [])
    text = metrics.prometheus_text(store.snapshot())
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "django_scale_request_seconds"]
    assert {sample.labels["route"] for sample in family.samples} == {'a"b\\c\nd'}


@DB
def test_scale_status_prints_routes_and_json(store: SlotStore) -> None:
    client = Client()
    for pk in range(5):
        client.get(f"/authors/{pk}/")
    out = StringIO()
    call_command("scale_status", "--json", "--no-replicas", stdout=out)
    document = json.loads(out.getvalue())
    [row] = [row for row in document["routes"] if row["route"] == "author"]
    assert row["requests"] == 5
    assert row["windows"]["1"]["requests"] == 5
    assert row["windows"]["5"]["p99"] > 0
    assert sum(row["queries"].values()) == 1.0
    assert document["cache"]["events"]["swr.hit"] == 5
    assert document["slots"]["used"] == 1
    out = StringIO()
    call_command("scale_status", stdout=out)
    text = out.getvalue()
    assert "author" in text and "GET" in text
    assert f"{settings.DJANGO_SCALE.get('PRIMARY', 'default')} (primary)" in text


@DB
def test_hosts_merge_through_the_cache(store: SlotStore) -> None:
    caches["default"].clear()
    client = Client()
    for pk in range(3):
        client.get(f"/authors/{pk}/")
    local = store.snapshot()
    publish(to_document(local, host="web-1"))
    publish(to_document(local, host="web-2"))
    merged = cluster()
    assert merged.totals["request\x1fauthor\x1fGET"][0] == 6
    assert merged.windows["request\x1fauthor\x1fGET"][5].count == 6
    assert merged.counters["requests\x1fauthor\x1fGET\x1f2xx"] == 6
    response = client.get("/scale/metrics?scope=cluster", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert 'django_scale_request_seconds_count{route="author",method="GET"} 6' in response.content.decode()
    # sketches.json publishes this host (under its host name) before merging.
    document = client.get(
        "/scale/sketches.json?scope=cluster", headers={"authorization": f"Bearer {TOKEN}"}
    ).json()
    assert document["timings"]["request\x1fauthor\x1fGET"]["count"] == 9
    out = StringIO()
    call_command("scale_status", "--cluster", "--json", "--no-replicas", stdout=out)
    [row] = [row for row in json.loads(out.getvalue())["routes"] if row["route"] == "author"]
    assert row["requests"] == 9
    caches["default"].clear()


@pytest.mark.django_db
def test_the_timing_wrapper_stays_outermost_and_leaves_other_wrappers_alone(store: SlotStore) -> None:
    # tests the use of BaseDatabaseWrapper.execute_wrappers in recording._wrap_connection.
    seen: list[str] = []

    def theirs(execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(theirs):
        _wrap_connection(connection=connection)
        _wrap_connection(connection=connection)  # once only
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    assert [is_query_timer(wrapper) for wrapper in connection.execute_wrappers] == [True]
    assert theirs not in connection.execute_wrappers
    assert seen == ["SELECT 1"]
    disable()
    assert not any(is_query_timer(wrapper) for wrapper in connection.execute_wrappers)


def test_checks_of_the_metrics_file_and_the_middleware_order(tmp_path: Path) -> None:
    from django_scale.checks import check_settings
    from django_scale.metrics.checks import check_metrics

    assert check_metrics() == []  # MetricsMiddleware not installed: nothing to check
    a_file = tmp_path / "file"
    a_file.write_text("")
    with override_settings(MIDDLEWARE=MIDDLEWARE), override_scale_settings(METRICS_DIR=str(a_file)):
        assert [message.id for message in check_metrics()] == ["django_scale.E508"]
    with override_settings(MIDDLEWARE=MIDDLEWARE), override_scale_settings(METRICS_DIR=str(tmp_path / "new")):
        assert check_metrics() == []
        assert (tmp_path / "new").is_dir()
    reversed_order = [MIDDLEWARE[1], MIDDLEWARE[0], *MIDDLEWARE[2:]]
    with override_settings(MIDDLEWARE=reversed_order), override_scale_settings(METRICS_DIR=str(tmp_path)):
        assert [message.id for message in check_metrics()] == ["django_scale.W510"]
    with override_scale_settings(METRICS_TOKEN="short"):
        assert [(m.id, m.obj) for m in check_settings()] == [
            ("django_scale.E003", "DJANGO_SCALE['METRICS_TOKEN']")
        ]
    with override_scale_settings(METRICS_SLOTS=0):
        assert [(m.id, m.obj) for m in check_settings()] == [
            ("django_scale.E003", "DJANGO_SCALE['METRICS_SLOTS']")
        ]


@pytest.mark.django_db
def test_approximate_and_exact_counts_are_counted() -> None:
    from django_scale.counting import approx_count

    from testapp.models import Author

    metrics.reset()
    approx_count(Author.objects.all())
    approx_count(Author.objects.filter(name="nobody"))
    found = metrics.snapshot()
    assert found.get("counts.exact", 0) + found.get("counts.approx", 0) == 2


@pytest.fixture
def hung_cache() -> Iterator[str]:
    """A cache alias on a server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    hung = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{port}/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.3, "SOCKET_TIMEOUT": 0.3},
    }
    with (
        override_settings(CACHES={**settings.CACHES, "hung": hung}),
        override_scale_settings(CACHE_ALIAS="hung"),
    ):
        yield "hung"
        caches["hung"].close()
    server.close()


@DB
def test_a_hung_cache_never_holds_up_requests_or_the_export(store: SlotStore, hung_cache: str) -> None:
    client = Client()
    started = time.monotonic()
    for pk in range(3):
        assert client.get(f"/authors/{pk}/").status_code == 200  # recording never uses the cache
    assert time.monotonic() - started < 0.3 * 3
    auth = {"authorization": f"Bearer {TOKEN}"}
    document = client.get("/scale/sketches.json?scope=cluster", headers=auth).json()
    # The cache timed out once: this host's figures, under its own host name, not "cluster".
    assert document["host"] != "cluster"
    assert document["timings"]["request\x1fauthor\x1fGET"]["count"] == 3
    started = time.monotonic()
    for _ in range(3):  # the breaker is open: no more waiting for the cache
        assert client.get("/scale/sketches.json?scope=cluster", headers=auth).status_code == 200
        assert client.get("/scale/metrics?scope=cluster", headers=auth).status_code == 200
    assert time.monotonic() - started < 0.3
    assert metrics.snapshot()["metrics.cache_down"] == 1


@DB
def test_scale_status_pulls_other_hosts_sketches(store: SlotStore, live_server: Any) -> None:
    from django.core.management import CommandError

    Client().get("/authors/1/")
    out = StringIO()
    url = f"{live_server.url}/scale/sketches.json"
    call_command("scale_status", "--json", "--no-replicas", "--pull", url, stdout=out)
    # The live server is this same host: its copy of the sketches adds to the local one.
    [row] = [row for row in json.loads(out.getvalue())["routes"] if row["route"] == "author"]
    assert row["requests"] == 2
    with pytest.raises(CommandError, match="Could not read"):
        call_command(
            "scale_status", "--no-replicas", "--pull", f"{live_server.url}/no/such/", stdout=StringIO()
        )
    with override_scale_settings(METRICS_TOKEN=""), pytest.raises(CommandError, match="METRICS_TOKEN"):
        call_command("scale_status", "--no-replicas", "--pull", url, stdout=StringIO())


@DB
def test_a_request_that_wrote_is_counted_as_pinned_to_the_primary(store: SlotStore) -> None:
    client = Client()
    response = client.post("/authors/", {"name": "Hopper"})
    assert response.status_code == 200
    assert response.json()["pinned"]  # testapp's view reports its routing state
    # Another user, who wrote nothing, reads freely (the writer's next reads are pinned too).
    assert Client().get("/authors/1/").status_code == 200
    counters = store.snapshot().counters
    assert counters["event\x1f/authors/\x1fPOST\x1frouting.pinned"] == 1
    assert "event\x1fauthor\x1fGET\x1frouting.pinned" not in counters
