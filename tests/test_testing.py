"""django_scale.testing: helpers for the test suites of projects that use django-scale."""

from __future__ import annotations

import pytest
from django.db import connections

from django_scale.replicas import ReplicaGuard, monitor, routing_state
from django_scale.testing import capture_reads, share_primary_connection, simulate_lag

from testapp.models import Author


@pytest.mark.postgres
@pytest.mark.django_db(databases=["default", "replica"])
def test_inside_testcase_reads_stay_on_the_primary_unless_the_replica_shares_its_connection():
    author = Author.objects.create(name="Rosalind")  # uncommitted: TestCase rolls it back

    with routing_state(), capture_reads() as reads:
        assert Author.objects.get(pk=author.pk).name == "Rosalind"
    # The replica's own connection cannot see the test's rows (Django ticket #23718).
    assert reads == {"default": 1}

    with share_primary_connection(), routing_state(), capture_reads() as reads:
        assert connections["replica"] is connections["default"]
        assert Author.objects.get(pk=author.pk).name == "Rosalind"
    assert reads == {"replica": 1}
    assert connections["replica"] is not connections["default"]
    # The primary's connection object served the replica alias: it got no replica guard
    # (whose errors would eject the "replica" and rerun requests on a primary failure).
    assert not [
        wrapper for wrapper in connections["default"].execute_wrappers if isinstance(wrapper, ReplicaGuard)
    ]


@pytest.mark.postgres
@pytest.mark.django_db(databases=["default", "replica"])
def test_a_shared_connection_is_never_closed_after_a_replica_failure():
    # After the replica failed once, the router reopens a replica connection opened before the
    # failure; the primary's connection, shared in a TestCase's transaction, must stay open.
    author = Author.objects.create(name="Ada")
    item = monitor("replica")
    failures = item.failures
    item.failures += 1
    try:
        with share_primary_connection(), routing_state(), capture_reads() as reads:
            assert Author.objects.get(pk=author.pk).name == "Ada"
            assert Author.objects.get(pk=author.pk).name == "Ada"
        assert reads == {"replica": 2}
    finally:
        item.failures = failures
    assert Author.objects.filter(pk=author.pk).exists()  # the transaction is intact


@pytest.mark.postgres
@share_primary_connection()
@pytest.mark.django_db(databases=["default", "replica"])
def test_share_primary_connection_decorates_tests():
    assert connections["replica"] is connections["default"]


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_simulate_lag_hides_writes_until_the_block_ends(replica):
    before = Author.objects.using("default").create(name="before")
    replica.wait_for_replay()
    with simulate_lag("replica"):
        during = Author.objects.using("default").create(name="during")
        assert Author.objects.using("replica").filter(pk=before.pk).exists()
        assert not Author.objects.using("replica").filter(pk=during.pk).exists()
    replica.wait_for_replay()
    assert Author.objects.using("replica").filter(pk=during.pk).exists()
