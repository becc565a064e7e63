"""Stale-while-revalidate and shared replica health on a django-redis Sentinel set-up.

A real master, replica and sentinel (tests/redis_sentinel.py); ``SENTINEL FAILOVER`` runs
while threads keep calling a cached function: every call returns the right value (served from
the cache, stale, or computed), none raises.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis_sentinel
from django.conf import settings
from django.core.cache import caches
from django.test.utils import override_settings
from support import wait_until

from django_scale.cache import stale_while_revalidate
from django_scale.replicas import SharedHealth
from django_scale.testing import override_scale_settings

import harness

ALIAS = "sentinel"
computed: Counter[int] = Counter()


# On CACHE_ALIAS, which the fixture points at the sentinel's cache: a cache= alias that is not
# in the suite's CACHES would fail check E201 for the rest of the run.
@stale_while_revalidate(fresh=0.2, stale=300, refill="inline", wait=0.5)
def headline(n: int) -> str:
    computed[n] += 1
    return f"headline {n}"


pytestmark = [pytest.mark.redis]


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_sentinel.SentinelSet]:
    if harness.BACKEND == "sqlite":
        pytest.skip("the embedded default (SQLite + local-memory cache) has no Redis")
    found = redis_sentinel.start(Path(tmp_path_factory.mktemp("sentinel")))
    yield found
    found.stop()


@pytest.fixture
def sentinel_cache(sentinel_set: redis_sentinel.SentinelSet) -> Iterator[str]:
    """The cache alias ``sentinel``: django-redis through the sentinel, short socket timeouts."""
    cache = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://{redis_sentinel.SERVICE}/0",
        "KEY_PREFIX": "django-scale-sentinel-tests",
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.SentinelClient",
            "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
            "SENTINELS": [("127.0.0.1", sentinel_set.sentinel_port)],
            "SOCKET_TIMEOUT": 0.5,
            "SOCKET_CONNECT_TIMEOUT": 0.5,
        },
    }
    with (
        override_settings(CACHES={**settings.CACHES, ALIAS: cache}),
        override_scale_settings(CACHE_RETRY_AFTER=0.5),
    ):
        caches[ALIAS].clear()
        try:
            yield ALIAS
        finally:
            from django_redis import get_redis_connection

            get_redis_connection(ALIAS).connection_pool.disconnect()


def _cache_answers() -> bool:
    try:
        caches[ALIAS].set("probe", 1, 30)
        return caches[ALIAS].get("probe") == 1
    except Exception:
        return False


def test_a_failover_during_load_serves_stale_or_computes_never_fails(sentinel_set, sentinel_cache):
    keys = range(5)
    for n in keys:
        assert headline(n) == f"headline {n}"
    failures: list[BaseException] = []
    wrong: list[tuple[int, object]] = []
    calls = Counter[str]()
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set():
            n = (n + 1) % len(keys)
            try:
                value = headline(n)
            except BaseException as error:  # any exception here is what the test forbids
                failures.append(error)
                continue
            calls["done"] += 1
            if value != f"headline {n}":
                wrong.append((n, value))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        before = calls["done"]
        old_master = sentinel_set.master()
        new_master = sentinel_set.failover()
        assert new_master != old_master
        # The load ran through the failover, not only around it.
        during = calls["done"] - before
        # The cache answers again through the new master (the old one is now its replica).
        wait_until(_cache_answers, "the cache answering after the failover", timeout=30)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == [], failures[:3]
    assert wrong == []
    assert before > 0 and during > 0
    # Writes go to the new master: a value written now is read back.
    caches[ALIAS].set("after-failover", "yes", 30)
    assert caches[ALIAS].get("after-failover") == "yes"


def test_shared_replica_ejections_go_through_the_sentinel_and_survive_a_failover(
    sentinel_set, sentinel_cache
):
    writer, reader = SharedHealth(ALIAS), SharedHealth(ALIAS)

    def reads(until: float) -> bool:
        # SentinelClient reads from a Redis replica, which has the write once replication
        # delivered it (after a failover, once the demoted master has resynchronised).
        ticket = reader.request("replica-x")
        return ticket is not None and reader.wait(ticket, 1) and reader.down_until("replica-x") == until

    until = time.time() + 60
    writer.publish("replica-x", until)
    assert writer.flush(5)
    wait_until(lambda: reads(until), "the ejection read by the other process", timeout=30)

    sentinel_set.failover()
    wait_until(_cache_answers, "the cache answering after the failover", timeout=30)
    # A write after the failover reaches the new master, and the other process reads it.
    later = time.time() + 120
    writer.publish("replica-x", later)
    wait_until(lambda: writer.flush(1), "the ejection written after the failover", timeout=30)
    wait_until(lambda: reads(later), "the ejection read after the failover", timeout=30)
