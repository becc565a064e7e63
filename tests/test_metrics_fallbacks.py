"""Replica fallbacks in the request metrics, on the real standby: counted apart from reads.

A fallback is a read meant for a replica that went to the primary because no replica could
serve it: none available (lag, ejection, an open breaker), none that had replayed the user's
write, or a read on one failed. Reads on the primary for any other reason (the request wrote,
``use_primary()``, ``atomic()``) are not fallbacks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from prometheus_client.parser import text_string_to_metric_families
from support import (
    METRICS_TOKEN,
    break_replica_connection,
    create_user,
    log_in,
    metrics_middleware,
    recording_metrics,
    wait_until,
)

from django_scale.metrics.store import SlotStore
from django_scale.replicas import monitor
from django_scale.replicas.wal import parse_lsn
from django_scale.testing import capture_reads, override_scale_settings, simulate_lag

from testapp.models import Author

TOKEN = METRICS_TOKEN
REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])
MIDDLEWARE = metrics_middleware()
FALLBACKS = "fallbacks\x1fauthor\x1fGET"


@pytest.fixture
def store(replica: Any, tmp_path: Path) -> Iterator[SlotStore]:
    """Request metrics on, the replica caught up and in rotation in this process."""
    target = parse_lsn(replica.primary_lsn())
    replica.wait_for_replay()
    wait_until(lambda: monitor("replica").is_available(None, target), "the monitor seeing the replay")
    with recording_metrics(str(tmp_path)) as recording:
        yield recording


def prometheus_fallbacks() -> dict[tuple[str, str], float]:
    """The fallback counters of the Prometheus export, by (route, method)."""
    body = Client().get("/scale/metrics", headers={"authorization": f"Bearer {TOKEN}"}).content.decode()
    found = {}
    for family in text_string_to_metric_families(body):
        if family.name == "django_scale_replica_fallbacks":
            for sample in family.samples:
                found[(sample.labels["route"], sample.labels["method"])] = sample.value
    return found


def status_json() -> dict[str, Any]:
    out = StringIO()
    call_command("scale_status", "--json", stdout=out)
    document: dict[str, Any] = json.loads(out.getvalue())
    return document


def author_row(document: dict[str, Any]) -> dict[str, Any]:
    (row,) = [row for row in document["routes"] if row["route"] == "author" and row["method"] == "GET"]
    return row


def primary_row(document: dict[str, Any]) -> dict[str, Any]:
    (row,) = [row for row in document["replicas"] if row["role"] == "primary"]
    return row


@REPLICA
def test_no_fallback_is_counted_while_the_replica_serves(store: SlotStore) -> None:
    client = Client()
    with capture_reads() as reads:
        for pk in range(4):
            assert client.get(f"/authors/{pk}/").status_code == 200
    assert reads == {"replica": 4}
    counters = store.snapshot().counters
    assert counters["reads\x1fauthor\x1fGET\x1freplica"] == 4
    assert FALLBACKS not in counters
    assert prometheus_fallbacks() == {}
    document = status_json()
    assert author_row(document)["fallbacks"] == 0
    assert primary_row(document)["fallbacks"] == 0


@REPLICA
def test_reads_that_fall_back_for_lag_are_counted_per_route(store: SlotStore) -> None:
    client = Client()
    assert client.get("/authors/1/").status_code == 200  # on the replica: no fallback
    with override_scale_settings(MAX_REPLICA_LAG=0.3), simulate_lag("replica"):
        Author.objects.create(name="lag maker")
        wait_until(lambda: not monitor("replica").is_available(), "ejection for lag")
        with capture_reads() as reads:
            for pk in range(3):
                assert client.get(f"/authors/{pk}/").status_code == 200
            # A request pinned because it wrote reads from the primary, but not as a fallback.
            assert client.post("/authors/", {"name": "writer"}).status_code == 200
        assert reads == {"default": 4}
        counters = store.snapshot().counters
        assert counters[FALLBACKS] == 3
        assert counters["reads\x1fauthor\x1fGET\x1fdefault"] == 3
        assert counters["reads\x1fauthor\x1fGET\x1freplica"] == 1
        assert not any(name.startswith("fallbacks\x1f/authors/") for name in counters)
    # Every export shows them: Prometheus, scale_status --json and its tables, the status page.
    assert prometheus_fallbacks() == {("author", "GET"): 3.0}
    document = status_json()
    assert author_row(document)["fallbacks"] == 3
    assert primary_row(document)["fallbacks"] == 3
    table = StringIO()
    call_command("scale_status", stdout=table)
    line = next(line for line in table.getvalue().splitlines() if line.strip().startswith("author "))
    assert line.split()[-1] == "3"
    assert "default (primary): 4 reads" in table.getvalue()  # 3 fallbacks, the writer's read
    assert "3 of them fallbacks" in table.getvalue()
    staff = Client()
    log_in(staff, create_user("boss", is_staff=True))
    page = staff.get("/scale/status/").content.decode()
    assert re.search(
        r'<td>author</td><td>GET</td>(?:(?!</tr>).)*<td class="number">3</td>\s*</tr>', page, re.S
    )
    assert re.search(
        r'<td>default</td><td>primary</td>(?:(?!</tr>).)*<td class="number">3</td>\s*</tr>', page, re.S
    )


@REPLICA
def test_a_writer_whose_write_no_replica_has_replayed_falls_back(store: SlotStore) -> None:
    writer = Client()
    with override_scale_settings(REPLICA_WAIT=0.05), simulate_lag("replica"):
        assert writer.post("/authors/", {"name": "Hopper"}).status_code == 200
        # The writer's next requests find no replica with their write: each read falls back.
        # Another user, with nothing to wait for, still reads from the replica.
        with capture_reads() as reads:
            for pk in (1, 2):
                assert writer.get(f"/authors/{pk}/").status_code == 200
            assert Client().get("/authors/3/").status_code == 200
        assert reads == {"default": 2, "replica": 1}
    counters = store.snapshot().counters
    assert counters[FALLBACKS] == 2
    assert counters["reads\x1fauthor\x1fGET\x1freplica"] == 1


@pytest.fixture
def readmit(store: SlotStore) -> Iterator[SlotStore]:
    """Put the replica back in rotation after a test that broke its connection."""
    yield store
    connections["replica"].close()
    monitor("replica").forget_ejection()
    wait_until(lambda: monitor("replica").is_available(), "the replica back in rotation")


@REPLICA
def test_the_second_run_of_a_request_whose_replica_read_failed_counts_its_reads_as_fallbacks(
    readmit: SlotStore,
) -> None:
    client = Client()
    assert client.get("/authors/1/").status_code == 200  # opens the replica connection
    break_replica_connection(connections["replica"])
    with capture_reads() as reads:
        assert client.get("/authors/1/").status_code == 200
    # The first run's read failed on the replica; the second run read from the primary.
    assert reads == {"replica": 1, "default": 1}
    counters = readmit.snapshot().counters
    assert counters["event\x1fauthor\x1fGET\x1freplicas.read_failed"] == 1
    assert counters["reads\x1fauthor\x1fGET\x1fdefault"] == 1
    assert counters[FALLBACKS] == 1
    # MetricsMiddleware before ScaleMiddleware: the two runs are one request (two in all).
    assert counters["requests\x1fauthor\x1fGET\x1f2xx"] == 2
    assert not any(name.startswith("requests\x1fauthor\x1fGET\x1f5") for name in counters)


@REPLICA
def test_every_query_of_a_write_is_in_its_figures_the_write_position_too(store: SlotStore) -> None:
    # ScaleMiddleware reads the primary's write position after a write, inside MetricsMiddleware.
    with CaptureQueriesContext(connections["default"]) as captured:
        assert Client().post("/authors/", {"name": "counted"}).status_code == 200
    statements = [query["sql"] for query in captured.captured_queries]
    assert any("pg_current_wal_insert_lsn" in sql for sql in statements)
    counters = store.snapshot().counters
    assert counters["queries\x1f/authors/\x1fPOST\x1fdefault"] == len(statements)
