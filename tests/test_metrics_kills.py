"""The sniper's recent kills: recorded by the real sniper, shared by a host's processes, merged
across hosts, and shown by sketches.json, scale_status and the status page."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import caches
from django.core.management import call_command
from django.test import Client, override_settings
from support import create_user, log_in, wait_until
from test_sniper import VICTIM_APP, Victim

from django_scale import metrics
from django_scale.metrics.kills import KEEP, KillLog, kill_log, merge_kills, recent_kills, record_kill
from django_scale.metrics.merge import from_document, merge_documents, publish, to_document
from django_scale.metrics.recording import disable
from django_scale.metrics.store import HostSnapshot
from django_scale.sniper import Rule, Sniper
from django_scale.testing import override_scale_settings

TOKEN = "t" * 40
AUTH = {"authorization": f"Bearer {TOKEN}"}
# The sniper and its victims run on PostgreSQL ("mirror" is the primary's second alias there).
POSTGRES = pytest.mark.postgres
DB = pytest.mark.django_db(transaction=True, databases=["default", "mirror"])
FORK = multiprocessing.get_context("fork")
RUNAWAY = "SELECT pg_sleep(30), 'literal' /* runaway */"


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """Shared metrics on in this process (as scale_snipe turns them on), in a directory of the test's own."""
    with (
        override_settings(ROOT_URLCONF="testapp.metrics_urls"),
        # Every read on the primary: the sniper's tests use no replica.
        override_scale_settings(METRICS_DIR=str(tmp_path), METRICS_TOKEN=TOKEN, REPLICAS=[]),
    ):
        metrics.enable()
        yield tmp_path
    disable()


@pytest.fixture
def victims() -> Iterator[Callable[[], Victim]]:
    """Make victims (tests/test_sniper.py's), closed after the test."""
    made: list[Victim] = []

    def make() -> Victim:
        made.append(Victim())
        return made[-1]

    yield make
    for victim in made:
        victim.close()


def kill_runaway(victim: Victim, *, grace: float) -> dict[str, Any]:
    """Start the runaway query on *victim*, let the real sniper kill it, return what the log kept."""
    victim.start(RUNAWAY)
    wait_until(
        lambda: any(b.pid == victim.pid and b.state == "active" for b in Sniper().backends("default")),
        "the runaway query running",
    )
    rule = Rule(name="runaway", max_duration=0.2, applications=(VICTIM_APP,))
    before = time.time()
    wait_until(lambda: Sniper(using="default", rules=[rule], grace=grace).run().kills, "a kill")
    victim.join()
    assert victim.error is not None  # cancelled or terminated: the query did not finish
    newest = recent_kills()[0]
    assert newest["at"] >= before
    return newest


@POSTGRES
@DB
def test_the_real_sniper_records_its_kills_where_every_export_shows_them(
    shared: Path, victims: Callable[[], Victim]
) -> None:
    cancelled = victims()
    kill = kill_runaway(cancelled, grace=60.0)
    assert cancelled.cancelled
    assert kill["pid"] == cancelled.pid
    assert kill["action"] == "cancel"
    assert kill["alias"] == "default"
    assert kill["fingerprint"] == "SELECT pg_sleep(?), ?"
    assert kill["duration"] >= 0.2
    assert (kill["dry_run"], kill["signalled"], kill["rule"], kill["state"]) == (
        False,
        True,
        "runaway",
        "active",
    )
    terminated = victims()
    kill = kill_runaway(terminated, grace=0.0)
    assert (kill["pid"], kill["action"]) == (terminated.pid, "terminate")
    kills = recent_kills()
    assert [(k["pid"], k["action"]) for k in kills] == [
        (terminated.pid, "terminate"),
        (cancelled.pid, "cancel"),
    ]
    # sketches.json carries them (so hosts merge them), newest first.
    document = Client().get("/scale/sketches.json", headers=AUTH).json()
    assert [(k["pid"], k["action"]) for k in document["kills"]] == [
        (terminated.pid, "terminate"),
        (cancelled.pid, "cancel"),
    ]
    out = StringIO()
    call_command("scale_status", "--json", "--no-replicas", stdout=out)
    assert json.loads(out.getvalue())["kills"] == kills
    out = StringIO()
    call_command("scale_status", "--no-replicas", stdout=out)
    text = out.getvalue()
    assert "sniper.cancel: 1" in text and "sniper.terminate: 1" in text
    assert f"terminate pid {terminated.pid} on default" in text
    assert f"cancel pid {cancelled.pid} on default" in text
    assert text.index(f"pid {terminated.pid}") < text.index(f"pid {cancelled.pid}")
    staff = Client()
    log_in(staff, create_user("boss", is_staff=True))
    page = staff.get("/scale/status/").content.decode()
    table = page[page.index('<table id="kills">') :]
    table = table[: table.index("</table>")]
    assert f'<td class="number">{terminated.pid}</td>' in table
    assert f'<td class="number">{cancelled.pid}</td>' in table
    assert "<td>terminate</td>" in table and "<td>cancel</td>" in table
    assert "SELECT pg_sleep(?), ?" in table


@POSTGRES
@DB
def test_dry_runs_are_listed_as_such(shared: Path, victims: Callable[[], Victim]) -> None:
    victim = victims().start(RUNAWAY)
    wait_until(
        lambda: any(b.pid == victim.pid and b.state == "active" for b in Sniper().backends("default")),
        "the runaway query running",
    )
    rule = Rule(name="runaway", max_duration=0.1, applications=(VICTIM_APP,))
    wait_until(lambda: Sniper(using="default", rules=[rule], dry_run=True).run().kills, "a dry-run kill")
    [kill] = recent_kills()
    assert (kill["pid"], kill["dry_run"], kill["signalled"]) == (victim.pid, True, False)
    out = StringIO()
    call_command("scale_status", "--no-replicas", stdout=out)
    assert f"would cancel pid {victim.pid}" in out.getvalue()


def test_nothing_is_recorded_without_shared_metrics(tmp_path: Path) -> None:
    with override_scale_settings(METRICS_DIR=str(tmp_path)):
        disable()
        record_kill({"at": time.time(), "pid": 1, "action": "cancel"})
        assert recent_kills() == []
        metrics.enable()
        try:
            record_kill({"at": time.time(), "pid": 1, "action": "cancel"})
            assert [kill["pid"] for kill in recent_kills()] == [1]
        finally:
            disable()


def _write_kills(directory: str, writer: int, count: int) -> None:
    log = KillLog(directory)
    for index in range(count):
        log.add({"at": 1000.0 + index, "host": "web", "pid": writer * 1000 + index, "action": "cancel"})


def test_the_log_is_bounded_and_shared_by_processes(tmp_path: Path) -> None:
    processes = [FORK.Process(target=_write_kills, args=(str(tmp_path), writer, 40)) for writer in (1, 2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    log = KillLog(tmp_path)
    kills = log.recent()
    assert len(kills) == KEEP
    # Each writer's kills are kept newest first, and the ring kept the 50 written last.
    pids = [kill["pid"] for kill in kills]
    assert len(set(pids)) == KEEP
    for writer in (1, 2):
        own = [pid for pid in pids if pid // 1000 == writer]
        assert own == sorted(own, reverse=True)
        assert own[0] == writer * 1000 + 39
    size = log.path.stat().st_size
    _write_kills(str(tmp_path), 3, 200)
    assert log.path.stat().st_size == size
    assert [kill["pid"] for kill in log.recent()] == [3000 + index for index in range(199, 149, -1)]


def test_a_long_query_is_shortened_to_fit_its_record(tmp_path: Path) -> None:
    log = KillLog(tmp_path)
    log.add({"at": 1.0, "pid": 7, "fingerprint": "SELECT " + "x, " * 2000 + "é"})
    [kill] = log.recent()
    assert kill["pid"] == 7
    assert kill["fingerprint"].startswith("SELECT x, x, ") and kill["fingerprint"].endswith("…")
    assert len(json.dumps(kill, separators=(",", ":")).encode()) <= 1024 - 4  # its record, less the length


def test_hosts_kills_merge_newest_first_once_each() -> None:
    def kill(host: str, at: float, pid: int) -> dict[str, Any]:
        return {"at": at, "host": host, "alias": "default", "pid": pid, "action": "cancel"}

    one = HostSnapshot(minute=1, kills=[kill("web-1", 30.0, 3), kill("web-1", 10.0, 1)])
    two = HostSnapshot(minute=1, kills=[kill("web-2", 20.0, 2), kill("web-1", 10.0, 1)])
    merged = merge_documents([to_document(one, host="web-1"), to_document(two, host="web-2")])
    assert [(k["host"], k["pid"]) for k in merged.kills] == [("web-1", 3), ("web-2", 2), ("web-1", 1)]
    many = [
        [kill("web-1", float(at), at) for at in range(40)],
        [kill("web-2", float(at), at) for at in range(40)],
    ]
    assert len(merge_kills(many)) == KEEP
    assert merge_kills(many)[0]["at"] == 39.0
    with pytest.raises(ValueError):  # MetricsDocumentError
        from_document({**to_document(one, host="web-1"), "kills": ["not a kill"]})


@POSTGRES
@DB
def test_kills_of_every_host_merge_through_the_cache(shared: Path) -> None:
    caches["default"].clear()
    record_kill({"at": time.time(), "alias": "default", "pid": 11, "action": "cancel"})
    other = HostSnapshot(minute=1, kills=[{"at": 5.0, "host": "web-9", "alias": "default", "pid": 99}])
    publish(to_document(other, host="web-9"))
    document = Client().get("/scale/sketches.json?scope=cluster", headers=AUTH).json()
    assert [kill["pid"] for kill in document["kills"]] == [11, 99]
    out = StringIO()
    call_command("scale_status", "--cluster", "--json", "--no-replicas", stdout=out)
    assert [kill["pid"] for kill in json.loads(out.getvalue())["kills"]] == [11, 99]
    assert kill_log().path.parent == shared
    caches["default"].clear()
