"""Routing among two real standbys that lag differently: replay paused on one, not the other.

The suite's REPLICAS lists only "replica" (the single-replica tests pin what happens when *the*
replica lags); these tests list both standbys with override_scale_settings().
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from django.db import connections
from django.test import Client
from support import wait_until

from django_scale.replicas import monitor, parse_lsn
from django_scale.testing import override_scale_settings, pause_replay, resume_replay

from testapp.models import Author

SEVERAL = pytest.mark.django_db(transaction=True, databases=["default", "replica", "replica2"])
BOTH = ["replica", "replica2"]
COOKIE = "django_scale_lsn"


def _primary_lsn() -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()::text")
        return parse_lsn(cursor.fetchone()[0])


def _has_replayed(alias: str, lsn: int) -> bool:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_last_wal_replay_lsn()::text")
        return parse_lsn(cursor.fetchone()[0]) >= lsn


def _settle(*aliases: str) -> None:
    """Wait until *aliases* replayed all the primary wrote so far, and their monitors saw it."""
    target = _primary_lsn()
    for alias in aliases:
        wait_until(lambda alias=alias: _has_replayed(alias, target), f"{alias} replaying", interval=0.005)
        wait_until(lambda alias=alias: monitor(alias).is_available(None, target), f"{alias}'s monitor")


def _reads(client: Client, times: int) -> Counter[str]:
    """Make *times* read-only requests; return which alias served them."""
    served: Counter[str] = Counter()
    for _ in range(times):
        body = client.get("/authors/1/").json()
        assert body["wrote"] is False and len(body["reads"]) == 1, body
        served.update(body["reads"])
    return served


@pytest.fixture
def two_replicas(replica) -> Iterator[None]:
    """Both standbys in REPLICAS, caught up, and their monitors aware of it."""
    assert connections["replica2"].settings_dict["PORT"] != connections["replica"].settings_dict["PORT"], (
        "the harness started one standby only"
    )
    with override_scale_settings(REPLICAS=BOTH, MAX_REPLICA_LAG=30.0):
        _settle(*BOTH)
        yield


@pytest.fixture
def first_paused(two_replicas) -> Iterator[None]:
    """Replay paused on "replica" (resumed after the test), "replica2" streaming on."""
    pause_replay("replica")
    try:
        yield
    finally:
        resume_replay("replica")
        _settle(*BOTH)


@SEVERAL
def test_the_writer_reads_its_write_from_the_replica_that_has_it(first_paused):
    client = Client()
    pk = client.post("/authors/", {"name": "Grace"}).json()["pk"]
    assert COOKIE in client.cookies
    target = _primary_lsn()
    assert not _has_replayed("replica", target)
    for _ in range(10):
        # Before each read: the monitor's last probe must still be fresh (on a loaded machine a
        # late probe makes replica2 unavailable for a moment, and the read goes to the primary,
        # as it should: not what this test is about; CI once saw it).
        wait_until(
            lambda: monitor("replica2").is_available(None, target), "replica2's monitor seeing the write"
        )
        body = client.get(f"/authors/{pk}/").json()
        # Never the paused standby (it lacks the row), never the primary (replica2 has it).
        assert body == {"found": True, "reads": {"replica2": 1}, "pinned": "", "wrote": False}


@SEVERAL
def test_free_reads_leave_a_replica_that_lags_past_the_limit(first_paused):
    Author.objects.create(name="Ada")
    with override_scale_settings(MAX_REPLICA_LAG=0.3):
        wait_until(lambda: (monitor("replica").lag or 0) > 0.3, "the paused replica lagging")
        assert _reads(Client(), 20) == {"replica2": 20}


@SEVERAL
def test_least_lag_prefers_the_caught_up_replica_within_the_limit(first_paused):
    Author.objects.create(name="Hedy")
    # Both are within MAX_REPLICA_LAG (30 s); one lags by more than a probe interval.
    wait_until(lambda: (monitor("replica").lag or 0) > 0.5, "the paused replica lagging")
    assert monitor("replica").is_available()
    with override_scale_settings(REPLICA_POLICY="least_lag"):
        assert _reads(Client(), 20) == {"replica2": 20}
    # The default policy spreads the same reads over both.
    assert set(_reads(Client(), 40)) == set(BOTH)


@SEVERAL
def test_round_robin_takes_the_replicas_in_turn(two_replicas):
    with override_scale_settings(REPLICA_POLICY="round_robin"):
        assert _reads(Client(), 10) == {"replica": 5, "replica2": 5}


@SEVERAL
def test_weights_steer_the_reads(two_replicas):
    with override_scale_settings(REPLICA_POLICY="weighted", REPLICA_WEIGHTS={"replica": 0, "replica2": 1}):
        assert _reads(Client(), 20) == {"replica2": 20}
    with override_scale_settings(REPLICA_POLICY="weighted", REPLICA_WEIGHTS={"replica": 1}):
        # replica2 is missing from the weights: it weighs 1, as much as "replica".
        assert set(_reads(Client(), 40)) == set(BOTH)


@SEVERAL
def test_a_replica_removed_from_replicas_and_back(two_replicas):
    with override_scale_settings(REPLICAS=["replica2"]):
        assert _reads(Client(), 10) == {"replica2": 10}
    with override_scale_settings(REPLICA_POLICY="round_robin"):
        assert _reads(Client(), 10) == {"replica": 5, "replica2": 5}


@SEVERAL
def test_an_ejected_replica_leaves_the_rotation_and_comes_back(two_replicas):
    monitor("replica").report_failure("connection refused (test)")
    try:
        assert _reads(Client(), 10) == {"replica2": 10}
    finally:
        monitor("replica").forget_ejection()
    _settle(*BOTH)
    with override_scale_settings(REPLICA_POLICY="round_robin"):
        assert _reads(Client(), 10) == {"replica": 5, "replica2": 5}


@SEVERAL
def test_the_writer_goes_to_the_primary_when_neither_replica_has_the_write(two_replicas):
    pause_replay("replica")
    pause_replay("replica2")
    try:
        client = Client()
        pk = client.post("/authors/", {"name": "Barbara"}).json()["pk"]
        body = client.get(f"/authors/{pk}/").json()
        assert body["found"] is True and body["reads"] == {"default": 1}
        assert "replayed" in body["pinned"]
    finally:
        resume_replay("replica")
        resume_replay("replica2")
    _settle(*BOTH)
