"""``PRIMARY_METHODS``: every read of a POST, PUT, PATCH or DELETE request goes to the primary.

Attack side first: a request that reads and then writes what it read must not read a replica
that lags (a lost update), and the pin must stay with its own request, never reach a GET's.
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.core import checks
from django.db import connections
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext
from support import wait_until

from django_scale.checks import check_routing, check_settings
from django_scale.conf import conf
from django_scale.middleware import PRIMARY_METHOD
from django_scale.replicas import monitor, parse_lsn
from django_scale.testing import capture_reads, override_scale_settings, simulate_lag

from testapp.models import Author

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


@pytest.fixture
def author(replica) -> Author:
    """An author replayed on the standby, with this process's monitor aware of it."""
    created = Author.objects.create(name="Ada")
    target = parse_lsn(replica.primary_lsn())
    replica.wait_for_replay()
    wait_until(lambda: monitor("replica").is_available(None, target), "the monitor seeing the replay")
    return created


# -- Attacks: a read-modify-write must not read stale rows ------------------------------------


@REPLICA
def test_a_post_that_reads_then_writes_reads_the_primary(author):
    with (
        capture_reads() as reads,
        CaptureQueriesContext(connections["replica"]) as on_replica,
    ):
        response = Client().post(f"/authors/{author.pk}/rename/")
    assert response.json() == {
        "name": "Ada!",
        "reads": {"default": 1},
        "pinned": PRIMARY_METHOD,
        "wrote": True,
    }
    assert reads == {"default": 1}
    assert len(on_replica) == 0


@REPLICA
def test_a_post_under_lag_reads_the_fresh_row_and_loses_no_update(author):
    with simulate_lag("replica"):
        # Another user's write, which the paused standby does not have.
        Author.objects.filter(pk=author.pk).update(name="Grace")
        assert Author.objects.using("replica").get(pk=author.pk).name == "Ada"
        response = Client().post(f"/authors/{author.pk}/rename/")
    assert response.json()["name"] == "Grace!"
    assert Author.objects.using("default").get(pk=author.pk).name == "Grace!"


@REPLICA
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_every_unsafe_method_of_the_default_reads_the_primary(author, method):
    with capture_reads() as reads:
        response = Client().generic(method, f"/authors/{author.pk}/")
    assert response.json() == {
        "found": True,
        "reads": {"default": 1},
        "pinned": PRIMARY_METHOD,
        "wrote": False,
    }
    assert reads == {"default": 1}


@REPLICA
def test_a_get_is_unaffected(author):
    with capture_reads() as reads:
        response = Client().get(f"/authors/{author.pk}/")
    assert response.json() == {"found": True, "reads": {"replica": 1}, "pinned": "", "wrote": False}
    assert reads == {"replica": 1}


@REPLICA
def test_an_async_post_reads_the_primary_and_its_pin_reaches_no_concurrent_get(author):
    async def post(n: int) -> dict[str, object]:
        return (await AsyncClient().post(f"/async/authors/{author.pk}/rename/")).json()

    async def get(n: int) -> dict[str, object]:
        return (await AsyncClient().get(f"/async/authors/{author.pk}/")).json()

    async def main() -> list[dict[str, object]]:
        try:
            return list(await asyncio.gather(*((post if n % 2 else get)(n) for n in range(50))))
        finally:
            await sync_to_async(connections.close_all)()

    for n, body in enumerate(asyncio.run(main())):
        if n % 2:
            assert body["reads"] == {"default": 1} and body["pinned"] == PRIMARY_METHOD
        else:
            # No cookie, and the monitor saw the replay: a GET reads the replica, never under
            # the POSTs' pin.
            assert body == {"found": True, "reads": {"replica": 1}, "pinned": "", "wrote": False}
    # (Concurrent read-modify-writes may still overwrite each other: that is for locks, such
    # as select_for_update(), not routing. Each one read a row the primary had.)
    assert Author.objects.get(pk=author.pk).name.startswith("Ada!")


@REPLICA
def test_use_replica_in_a_post_still_reads_a_replica(author):
    # An explicit use_replica() is the view's word that this read may be stale, as after a
    # write: the method's pin does not override it (the second run of a failed GET does).
    with capture_reads() as reads:
        response = Client().post(f"/authors/{author.pk}/rename/?replica=1")
    assert response.json()["reads"] == {"replica": 1}
    assert reads == {"replica": 1}


# -- Turned off: the old behaviour --------------------------------------------------------------


@REPLICA
def test_with_primary_methods_off_a_post_reads_the_replica(author):
    with override_scale_settings(PRIMARY_METHODS=()), capture_reads() as reads:
        response = Client().post(f"/authors/{author.pk}/rename/")
    assert response.json() == {
        "name": "Ada!",
        "reads": {"replica": 1},
        "pinned": "this request wrote",
        "wrote": True,
    }
    assert reads == {"replica": 1}


@REPLICA
def test_a_listed_safe_method_reads_the_primary(author):
    with override_scale_settings(PRIMARY_METHODS=["GET"]), capture_reads() as reads:
        assert Client().get(f"/authors/{author.pk}/").json()["reads"] == {"default": 1}
        assert Client().post(f"/authors/{author.pk}/").json()["reads"] == {"replica": 1}
    assert reads == {"default": 1, "replica": 1}


# -- The setting and its checks ---------------------------------------------------------------------


def test_the_default_and_the_frozenset_the_request_path_reads():
    assert frozenset({"POST", "PUT", "PATCH", "DELETE"}) == conf.PRIMARY_METHODS
    with override_scale_settings(PRIMARY_METHODS=["POST"]):
        assert conf.hot().primary_methods == frozenset({"POST"})
    with override_scale_settings(PRIMARY_METHODS=()):
        assert conf.hot().primary_methods == frozenset()


@pytest.mark.parametrize(
    ("value", "check_id"),
    [
        ("POST", "django_scale.E002"),
        (["POST", 1], "django_scale.E002"),
        (["post"], "django_scale.E003"),
        ([""], "django_scale.E003"),
    ],
)
def test_a_malformed_value_is_reported(value, check_id):
    with override_scale_settings(PRIMARY_METHODS=value):
        found = [message for message in check_settings() if "PRIMARY_METHODS" in message.msg]
    assert [message.id for message in found] == [check_id]


def test_safe_methods_listed_are_a_warning():
    with override_scale_settings(PRIMARY_METHODS=["POST", "GET", "HEAD"]):
        found = [message for message in check_routing() if message.id == "django_scale.W110"]
        assert not [message for message in check_settings() if "PRIMARY_METHODS" in message.msg]
    assert len(found) == 1 and found[0].level == checks.WARNING
    assert "'GET', 'HEAD'" in found[0].msg
    with override_scale_settings(PRIMARY_METHODS=["POST", "PUT"]):
        assert not [message for message in check_routing() if message.id == "django_scale.W110"]
