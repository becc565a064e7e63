"""Tests of django_scale.cache: stale-while-revalidate on real Redis with a real Celery worker.

Tests with the ``redis_cache`` / ``celery_worker`` fixtures run on the services backend only;
the ones on the ``locmem`` alias (the portable store) run on both backends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings
from django.core.cache import caches
from django.db import connections
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext, override_settings
from support import counter, wait_until

from django_scale import metrics
from django_scale.cache import invalidations, reset_state, stale_while_revalidate, wait_for_refills
from django_scale.cache.degrade import breakers
from django_scale.cache.store import MARKER, Envelope, RedisStore, Store, store_for
from django_scale.exceptions import CacheArgumentError, CacheKeyError
from django_scale.models import PendingInvalidation
from django_scale.replicas import routing_state
from django_scale.testing import override_scale_settings

from testapp import cached
from testapp.cached import probe
from testapp.models import Author

LOCMEM = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "swr-tests"}


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    probe.reset()
    metrics.reset()
    reset_state()
    yield
    probe.release.set()
    assert wait_for_refills(), "the refill publisher is stuck"
    reset_state()


@pytest.fixture
def locmem() -> Iterator[None]:
    """A ``locmem`` cache alias beside the suite's caches, empty before the test."""
    with (
        override_settings(CACHES={**_caches(), "locmem": LOCMEM}),
        override_scale_settings(CACHE_ALIAS="locmem"),
    ):
        caches["locmem"].clear()
        yield


def _caches() -> dict[str, Any]:
    from django.conf import settings

    return dict(settings.CACHES)


def make_stale(function: Any, *args: Any, value: Any, past_stale: bool = False) -> str:
    """Store *value* for *function(*args)* as a stale entry (or one past ``stale``); return its key."""
    engine = function._django_scale_engine
    key: str = function.key(*args)
    store = store_for(engine.alias())
    now = time.time()
    stale_until = now - 1 if past_stale else now + 3000
    envelope = Envelope(MARKER, value, now - 4000, now - 100, stale_until)
    assert store.write(key, envelope, 3600, store.generation(key), "")
    return key


def concurrently(function: Callable[[], Any], callers: int = 50) -> list[Any]:
    """Call *function* from *callers* threads released at once; return their results."""
    barrier = threading.Barrier(callers)

    def call() -> Any:
        barrier.wait()
        return function()

    with ThreadPoolExecutor(callers) as pool:
        futures = [pool.submit(call) for _ in range(callers)]
        return [future.result(timeout=60) for future in futures]


class CommandCounts(dict[str, int]):
    def __sub__(self, other: dict[str, int]) -> dict[str, int]:
        return {
            name: calls - other.get(name, 0) for name, calls in self.items() if calls != other.get(name, 0)
        }


def redis_commands(cache: Any) -> CommandCounts:
    """How many times the Redis server ran each command (INFO itself not counted)."""
    stats = cache.client.get_client().info("commandstats")
    return CommandCounts({name: stat["calls"] for name, stat in stats.items() if name != "cmdstat_info"})


# -- keys -------------------------------------------------------------------------------------------


def test_arguments_bind_to_the_signature() -> None:
    key = cached.headline.key
    assert key("news") == key("news", 1) == key(section="news") == key("news", page=1)
    assert key("news", 2) != key("news")
    assert key("1") != key(1)  # type: ignore[arg-type]
    assert key("news").startswith("swr:{testapp.cached.headline:1:")


def test_keys_tell_apart_values_that_print_alike() -> None:
    @stale_while_revalidate(fresh=1, stale=2)
    def anything(value: Any) -> Any:
        return value

    values = [1, 1.0, True, "1", None, "None", [1], {"a": 1}, {"a": "1"}, "a,", ["a"], ("a",)]
    # A tuple and a list are one JSON array: the only pair that shares a key.
    assert len({anything.key(value) for value in values}) == len(values) - 1
    assert anything.key({"a": 1, "b": 2}) == anything.key({"b": 2, "a": 1})


@pytest.mark.django_db
def test_model_instances_key_by_primary_key_and_requests_are_refused() -> None:
    @stale_while_revalidate(fresh=1, stale=2)
    def of(author: Author) -> str:
        return author.name

    first, second = Author.objects.create(name="a"), Author.objects.create(name="b")
    assert of.key(first) != of.key(second)
    assert of.key(first) == of.key(Author.objects.get(pk=first.pk))
    with pytest.raises(CacheKeyError, match="unsaved Author"):
        of.key(Author(name="c"))
    from django.test import RequestFactory

    with pytest.raises(CacheKeyError, match=r"HttpRequest.*request\.user\.pk"):
        of.key(RequestFactory().get("/"))  # type: ignore[arg-type]
    with pytest.raises(CacheKeyError, match="type object"):
        of.key(object())  # type: ignore[arg-type]


def test_invalid_arguments_name_the_argument() -> None:
    with pytest.raises(CacheArgumentError, match=r"stale=10 is less than fresh=60.*stale=70"):
        stale_while_revalidate(fresh=60, stale=10)
    with pytest.raises(CacheArgumentError, match="fresh= must be greater than zero"):
        stale_while_revalidate(fresh=0, stale=10)
    with pytest.raises(CacheArgumentError, match="refill= must be"):
        stale_while_revalidate(fresh=1, stale=2, refill="thread")  # type: ignore[arg-type]
    with pytest.raises(CacheArgumentError, match="jitter="):
        stale_while_revalidate(fresh=1, stale=2, jitter=1.5)


# -- the portable store (local memory): both backends ------------------------------------------------


def test_locmem_fresh_stale_and_missing(locmem: None) -> None:
    assert cached.on_locmem(3) == "v1:3"
    probe.data = "v2"
    assert cached.on_locmem(3) == "v1:3"
    assert probe.count("on_locmem") == 1
    assert counter("swr.hit") == 1

    make_stale(cached.on_locmem, 3, value="old:3")
    # Inline refill: the claim holder recomputes, and every caller gets the stale value.
    assert cached.on_locmem(3) == "old:3"
    assert probe.count("on_locmem") == 2
    assert cached.on_locmem(3) == "v2:3"
    assert counter("swr.refill.inline") == 1

    make_stale(cached.on_locmem, 3, value="ancient:3", past_stale=True)
    assert cached.on_locmem(3) == "v2:3"  # past stale: a miss, computed now
    assert probe.count("on_locmem") == 3


def test_locmem_invalidate_and_refresh(locmem: None) -> None:
    assert cached.on_locmem(1) == "v1:1"
    probe.data = "v2"
    cached.on_locmem.invalidate(1)
    assert cached.on_locmem(1) == "v2:1"
    probe.data = "v3"
    assert cached.on_locmem.refresh(1) == "v3:1"
    assert cached.on_locmem(1) == "v3:1"
    assert probe.count("on_locmem") == 3


def test_locmem_cold_miss_is_computed_once(locmem: None) -> None:
    probe.delay = 0.2
    results = concurrently(lambda: cached.on_locmem(9), callers=20)
    assert results == ["v1:9"] * 20
    assert probe.count("on_locmem") == 1


class Renamed:
    """A class a deploy renames: values pickled before cannot be unpickled after."""


def test_locmem_undecodable_value_is_a_miss(locmem: None, monkeypatch: pytest.MonkeyPatch) -> None:
    key = cached.on_locmem.key(4)
    caches["locmem"].set(key, (MARKER, Renamed(), 0.0, time.time() + 100, time.time() + 100), 100)
    monkeypatch.delitem(globals(), "Renamed")
    assert cached.on_locmem(4) == "v1:4"
    # Counted on each read that found it (the miss looks again once it holds the claim).
    assert counter("swr.undecodable") >= 1
    assert probe.count("on_locmem") == 1
    assert cached.on_locmem(4) == "v1:4"  # the recomputed value replaced it
    assert probe.count("on_locmem") == 1


def test_without_parentheses_settings_give_the_lifetimes(locmem: None) -> None:
    engine = cached.bare._django_scale_engine
    with override_scale_settings(SWR_FRESH=5, SWR_STALE=50):
        assert engine.lifetimes() == (5.0, 50.0)
    with override_scale_settings(SWR_FRESH=5, SWR_STALE=1):
        assert engine.lifetimes() == (5.0, 5.0)


def test_template_fragment_varies_and_is_computed_once(locmem: None) -> None:
    client = Client()
    first = client.get("/swr/fragment/?section=a")
    again = client.get("/swr/fragment/?section=a")
    probe.data = "v2"
    other = client.get("/swr/fragment/?section=b")
    assert first.content == again.content == b"<p>v1</p>"
    assert other.content == b"<p>v2</p>"
    assert probe.count("fragment") == 2


def test_template_tag_syntax_errors() -> None:
    from django.template import TemplateSyntaxError, engines

    with pytest.raises(TemplateSyntaxError, match="at least three arguments"):
        engines["django"].from_string("{% load scale %}{% swrcache 1 2 %}x{% endswrcache %}")


# -- Redis: hits, stale windows, cold misses ------------------------------------------------------------


def test_a_fresh_hit_is_one_redis_command(private_redis: Callable[[bool], None]) -> None:
    # On a Redis server of the test's own, so no other thread's commands are counted.
    @stale_while_revalidate(fresh=60, stale=3600, cache="swr-private")
    def lookup(n: int) -> int:
        probe.record("lookup", n)
        return n

    assert lookup(7) == 7
    cache = caches["swr-private"]
    before = redis_commands(cache)
    for _ in range(5):
        assert lookup(7) == 7
    assert redis_commands(cache) - before == {"cmdstat_get": 5}
    assert probe.count("lookup") == 1
    assert counter("swr.hit") == 5


def test_a_leftover_wake_up_does_not_make_a_cold_waiter_spin(private_redis: Callable[[bool], None]) -> None:
    @stale_while_revalidate(fresh=60, stale=3600, cache="swr-private", wait=0.3)
    def lookup(n: int) -> int:
        probe.record("lookup", n)
        return n

    cache = caches["swr-private"]
    redis = cache.client.get_client()
    key = lookup.key(1)
    # A wake-up left by an earlier write, and a claim another process holds: the waiter wakes
    # at once, finds no value, and must block again rather than poll Redis until its deadline.
    redis.rpush(cache.client.make_key(f"{key}:notify"), b"1")
    redis.set(cache.client.make_key(f"{key}:claim"), b"someone else", px=10_000)
    before = redis_commands(cache)
    assert lookup(1) == 1
    assert (redis_commands(cache) - before).get("cmdstat_blpop") == 2
    assert probe.count("lookup") == 1


def test_different_arguments_never_share_an_entry(redis_cache: Any) -> None:
    assert cached.headline("news")["section"] == "news"
    assert cached.headline("sport")["section"] == "sport"
    assert cached.headline("news", page=2)["page"] == 2
    assert probe.count("headline") == 3


def test_fifty_callers_on_a_stale_key_enqueue_exactly_one_refill(
    redis_cache: Any, celery_worker: Any
) -> None:
    make_stale(cached.headline, "news", value={"section": "news", "page": 1, "data": "stale"})
    probe.data = "refilled"
    probe.delay = 0.2
    results = concurrently(lambda: cached.headline("news"))
    assert [result["data"] for result in results] == ["stale"] * 50
    assert counter("swr.stale") == 50
    assert wait_for_refills()
    assert counter("swr.refill.enqueued") == 1
    assert counter("swr.refill.suppressed") == 49
    wait_until(lambda: counter("swr.refill.succeeded") == 1, "the refill")
    assert cached.headline("news")["data"] == "refilled"
    assert probe.count("headline") == 1  # run once, on the worker
    assert counter("swr.refill.failed") == 0


def test_fifty_callers_on_a_cold_key_compute_once(redis_cache: Any) -> None:
    probe.delay = 0.2
    results = concurrently(lambda: cached.headline("cold"))
    assert all(result["data"] == "v1" for result in results)
    assert probe.count("headline") == 1
    assert counter("swr.wait") >= 1


def _written_between_the_miss_and_the_claim(
    function: Any, args: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race the fifty cold callers can lose on a loaded machine: this caller misses, the
    # caller holding the claim writes and lets the claim go, then this caller's claim succeeds.
    store = store_for(function._django_scale_engine.alias())
    claim = store.claim

    def claim_after_another_caller_wrote(key: str, token: str, timeout: float, cold: bool) -> Any:
        now = time.time()
        envelope = Envelope(MARKER, "written by the other caller", now, now + 60, now + 600)
        assert store.write(key, envelope, 600, store.generation(key), "")
        # A waiter took the write's wake-up, as one blocked on it does at once: nothing but
        # the value itself tells this caller that it came.
        assert store.wait(key, 1.0)
        return claim(key, token, timeout, cold)

    monkeypatch.setattr(store, "claim", claim_after_another_caller_wrote)
    assert function(*args) == "written by the other caller"
    assert probe.count("headline") + probe.count("on_locmem") == 0
    monkeypatch.undo()
    # The claim was let go: the key's next cold miss is computed at once, not after a wait.
    key = function.key(*args)
    store.invalidate(key, 60)
    assert store.claim(key, "next", 10, cold=True) is not None


def test_a_value_written_between_a_miss_and_the_claim_is_not_computed_again(
    redis_cache: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _written_between_the_miss_and_the_claim(cached.headline, ("raced",), monkeypatch)


def test_locmem_a_value_written_between_a_miss_and_the_claim_is_not_computed_again(
    locmem: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _written_between_the_miss_and_the_claim(cached.on_locmem, (7,), monkeypatch)


def test_cold_waiters_compute_themselves_past_their_deadline(redis_cache: Any) -> None:
    @stale_while_revalidate(fresh=60, stale=600, wait=0.05)
    def slow(n: int) -> int:
        probe.record("slow", n)
        return n

    probe.hold = True
    holder = threading.Thread(target=slow, args=(1,))
    holder.start()
    try:
        assert probe.holding.wait(10)
        probe.hold = False
        # The first caller holds the claim and hangs: the next one waits 50 ms, then computes.
        assert slow(1) == 1
        assert probe.count("slow") == 2
    finally:
        probe.release.set()
        holder.join(10)


def test_invalidate_during_a_slow_refill_discards_the_refill(redis_cache: Any, celery_worker: Any) -> None:
    make_stale(cached.headline, "politics", value={"section": "politics", "page": 1, "data": "stale"})
    probe.data = "before the write"
    probe.hold = True
    assert cached.headline("politics")["data"] == "stale"
    assert probe.holding.wait(20), "the refill did not start"
    # The refill read "before the write"; now the data changes and the key is invalidated.
    probe.hold = False
    probe.data = "after the write"
    cached.headline.invalidate("politics")
    assert cached.headline("politics")["data"] == "after the write"
    probe.release.set()
    wait_until(lambda: counter("swr.refill.discarded") == 1, "the old refill to finish")
    assert cached.headline("politics")["data"] == "after the write"
    assert counter("swr.refill.succeeded") == 0


def test_a_failing_refill_keeps_serving_stale_and_backs_off(redis_cache: Any, celery_worker: Any) -> None:
    key = make_stale(cached.headline, "weather", value={"section": "weather", "page": 1, "data": "stale"})
    probe.fail = True
    assert cached.headline("weather")["data"] == "stale"
    wait_until(lambda: counter("swr.refill.failed") == 1, "the refill to fail")
    client = redis_cache.client.get_client()
    claim_ttl = client.pttl(redis_cache.client.make_key(f"{key}:claim"))
    assert 0 < claim_ttl <= 1000  # re-armed for the first backoff
    for _ in range(3):
        assert cached.headline("weather")["data"] == "stale"
    assert counter("swr.refill.enqueued") == 1
    assert counter("swr.refill.suppressed") == 3


def test_stale_if_error_serves_past_stale_when_recomputing_fails(redis_cache: Any) -> None:
    make_stale(cached.forgiving, 1, value="old:1", past_stale=True)
    probe.fail = True
    assert cached.forgiving(1) == "old:1"
    assert counter("swr.stale_if_error") == 1
    probe.fail = False
    assert cached.forgiving(1) == "v1:1"


def test_without_stale_if_error_a_failure_past_stale_raises(redis_cache: Any) -> None:
    make_stale(cached.headline, "x", value={"data": "old"}, past_stale=True)
    probe.fail = True
    with pytest.raises(RuntimeError, match="the cached function failed"):
        cached.headline("x")


def test_an_undecodable_value_is_a_miss(redis_cache: Any) -> None:
    key = cached.headline.key("deploy")
    redis_cache.client.get_client().set(redis_cache.client.make_key(key), b"\x80\x04\x95garbage")
    assert cached.headline("deploy")["data"] == "v1"
    # Counted on each read that found it (the miss looks again once it holds the claim).
    assert counter("swr.undecodable") >= 1
    assert cached.headline("deploy")["data"] == "v1"  # the recomputed value replaced it
    assert probe.count("headline") == 1


def test_refresh_recomputes_now(redis_cache: Any) -> None:
    assert cached.headline("tech")["data"] == "v1"
    probe.data = "v2"
    assert cached.headline.refresh("tech")["data"] == "v2"
    assert cached.headline("tech")["data"] == "v2"
    assert probe.count("headline") == 2


def test_jitter_spreads_fresh_lifetimes(redis_cache: Any) -> None:
    engine = cached.headline._django_scale_engine
    now = time.time()
    ends = {round(engine.envelope(None, now)[0].fresh_until - now, 3) for _ in range(20)}
    assert len(ends) > 1
    assert all(54 <= end <= 60 for end in ends)


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_a_stale_refill_after_a_write_reads_from_the_primary(
    redis_cache: Any, celery_worker: Any, replica: Any
) -> None:
    make_stale(cached.author_names, value=["stale"])
    with routing_state() as state:
        state.wrote = True
        assert cached.author_names() == ["stale"]
    wait_until(lambda: counter("swr.refill.succeeded") == 1, "the refill")
    make_stale(cached.author_names, value=["stale"])
    with routing_state():
        assert cached.author_names() == ["stale"]
    wait_until(lambda: counter("swr.refill.succeeded") == 2, "the second refill")
    assert probe.read_aliases == ["default", "replica"]


def test_the_refill_of_a_write_in_a_transaction_is_sent_on_commit(
    redis_cache: Any, celery_worker: Any, transactional_db: None
) -> None:
    from django.db import transaction

    make_stale(cached.headline, "tx", value={"data": "stale"})
    with transaction.atomic():
        assert cached.headline("tx")["data"] == "stale"
        assert wait_for_refills()
        assert counter("swr.refill.enqueued") == 0
    assert wait_for_refills()
    assert counter("swr.refill.enqueued") == 1


# -- async ---------------------------------------------------------------------------------------------


def test_async_function_miss_hit_and_refill(redis_cache: Any, celery_worker: Any) -> None:
    async def scenario() -> list[str]:
        first = await cached.async_headline("a")
        probe.data = "v2"
        second = await cached.async_headline("a")
        make_stale(cached.async_headline, "a", value="stale:a")
        third = await cached.async_headline("a")
        return [first, second, third]

    assert asyncio.run(scenario()) == ["v1:a", "v1:a", "stale:a"]
    wait_until(lambda: counter("swr.refill.succeeded") == 1, "the refill")
    assert asyncio.run(cached.async_headline("a")) == "v2:a"  # type: ignore[arg-type]
    assert probe.count("async_headline") == 2


def test_async_cold_miss_is_computed_once(redis_cache: Any) -> None:
    probe.delay = 0.1

    async def scenario() -> list[str]:
        return list(await asyncio.gather(*(cached.async_headline("b") for _ in range(20))))

    assert asyncio.run(scenario()) == ["v1:b"] * 20
    assert probe.count("async_headline") == 1


# -- failure: broker down, Redis down --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def dead_broker(celery_app: Any) -> Iterator[None]:
    """Make the current and default Celery app one whose broker refuses connections.

    Default too: shared_task resolves the app per thread, and the refill publisher's thread
    has no current app of its own.
    """
    from celery import Celery, _state

    app = Celery("dead-broker", broker=f"redis://127.0.0.1:{_free_port()}/0", set_as_current=False)
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    app.loader.import_module("django_scale.tasks")
    previous = _state.default_app
    app.set_current()
    app.set_default()
    try:
        yield
    finally:
        assert wait_for_refills()
        celery_app.set_current()
        _state.set_default_app(previous)
        app.pool.force_close_all()
        app.close()


def test_broker_down_only_the_claim_holder_recomputes(redis_cache: Any, dead_broker: None) -> None:
    make_stale(cached.headline, "down", value={"data": "stale"})
    probe.data = "recomputed"
    # Hold the recomputation until every caller has its answer, so that none can see it early.
    probe.hold = True
    # The claim holder gets the stale value at once; the refill is computed off the request.
    results = concurrently(lambda: cached.headline("down")["data"], callers=10)
    assert results == ["stale"] * 10
    probe.release.set()
    assert wait_for_refills()
    assert [cached.headline("down")["data"] for _ in range(3)] == ["recomputed"] * 3
    assert probe.count("headline") == 1
    assert counter("swr.broker_down") == 1
    assert counter("swr.refill.inline") == 1


def test_broker_down_can_serve_stale_instead(redis_cache: Any, dead_broker: None) -> None:
    make_stale(cached.patient, 1, value="stale:1")
    assert [cached.patient(1) for _ in range(5)] == ["stale:1"] * 5
    assert wait_for_refills()
    assert cached.patient(1) == "stale:1"
    assert probe.count("patient") == 0
    assert counter("swr.broker_down") == 1


@pytest.fixture
def private_redis(redis_cache: Any, tmp_path: Any) -> Iterator[Callable[[bool], None]]:
    """A Redis server of this test's own as the ``swr-private`` cache; yields ``set_running(bool)``.

    Nothing else uses it (CACHE_ALIAS stays on the suite's Redis, where the replica monitors
    share their state), so its command counts are the test's own. Needs the services backend,
    as its dependency on ``redis_cache`` says.
    """
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []

    def set_running(running: bool, frozen: bool = False) -> None:
        """Start or stop the server; *frozen*: SIGSTOP it (connections open, nothing answers),
        and ``set_running(True)`` after that thaws it."""
        if frozen or (running and processes):
            for process in processes:
                process.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)
            return
        if not running:
            for process in processes:
                process.send_signal(signal.SIGCONT)  # a stopped process ends only once continued
                process.terminate()
                process.wait(10)
            processes.clear()
            return
        # An append-only file, so a restarted server has its data back, as a real one would.
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
        command += ["--appendonly", "yes", "--appendfsync", "always"]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import redis

        def answers() -> bool:
            # Up once it answers: while it loads its append-only file it refuses commands.
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False
            finally:
                client.close()

        wait_until(answers, "the private redis-server answering", timeout=10, interval=0.02)

    private = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{port}/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 2},
    }
    set_running(True)
    try:
        with override_settings(CACHES={**_caches(), "swr-private": private}):
            yield set_running
            from django_redis import get_redis_connection

            get_redis_connection("swr-private").connection_pool.disconnect()
    finally:
        set_running(False)


@pytest.fixture
def cache_on_private_redis(private_redis: Callable[[bool], None]) -> Iterator[Callable[[bool], None]]:
    """The private Redis as CACHE_ALIAS (where ``cached.on_private_redis`` caches)."""
    with override_scale_settings(CACHE_ALIAS="swr-private"):
        yield private_redis


def test_redis_down_serves_computed_values_with_a_circuit_breaker(
    cache_on_private_redis: Callable[[bool], None],
) -> None:
    assert cached.on_private_redis(1) == "v1:1"
    cache_on_private_redis(False)
    probe.data = "v2"
    with override_scale_settings(CACHE_RETRY_AFTER=60):
        results = [cached.on_private_redis(n) for n in (1, 1, 2, 2, 1)]
    assert results == ["v2:1", "v2:1", "v2:2", "v2:2", "v2:1"]
    # Computed once per key in this process, and only the first call tried the dead server.
    assert probe.count("on_private_redis") == 3
    assert counter("swr.cache_down") == 1


def test_redis_back_after_an_outage_replays_invalidations(
    cache_on_private_redis: Callable[[bool], None],
) -> None:
    assert cached.on_private_redis(5) == "v1:5"
    cache_on_private_redis(False)
    with override_scale_settings(CACHE_RETRY_AFTER=0.05):
        probe.data = "v2"
        cached.on_private_redis.invalidate(5)  # Redis is down: kept for later
        assert cached.on_private_redis(5) == "v2:5"
        cache_on_private_redis(True)
        # Once the retry time is up, a background probe finds the cache back and closes the
        # breaker; no call has been made to it since the outage.
        wait_until(lambda: not breakers.is_open("cache 'swr-private'"), "the probe finding the cache back")
        # The restarted server has the old "v1" entry back; the replayed invalidation drops it.
        raw = caches["swr-private"].client.get_client()
        assert raw.exists(caches["swr-private"].client.make_key(cached.on_private_redis.key(5)))
        assert cached.on_private_redis(5) == "v2:5"
        assert breakers.is_open("cache 'swr-private'") is False


def test_a_hung_redis_holds_one_request_and_a_background_probe_finds_it_back(
    cache_on_private_redis: Callable[..., None],
) -> None:
    # A Redis that hangs (SIGSTOP: connections accepted, nothing answered) costs the first
    # call its socket timeout; after CACHE_RETRY_AFTER the retry is a background probe, so no
    # later call waits on it, and the probe closes the breaker once Redis answers again.
    name = "cache 'swr-private'"
    assert cached.on_private_redis(7) == "v1:7"
    probe.data = "v2"
    with override_scale_settings(CACHE_RETRY_AFTER=0.1):
        cache_on_private_redis(True, frozen=True)
        try:
            assert cached.on_private_redis(7) == "v2:7"  # waited SOCKET_TIMEOUT, then computed
            assert counter("swr.cache_down") == 1
            for _ in range(3):
                # Past CACHE_RETRY_AFTER: the call starts the probe and goes on without the
                # cache (the per-process fallback) instead of trying the hung server itself.
                wait_until(lambda: breakers.open_until(name) <= time.monotonic(), "the retry time")
                assert cached.on_private_redis(7) == "v2:7"
                assert breakers.is_open(name)
            assert counter("swr.cache_down") == 1  # no call failed on it again
        finally:
            cache_on_private_redis(True)  # thawed
        wait_until(lambda: not breakers.is_open(name), "the probe finding the cache back", timeout=10)
        # The cache serves again: the entry written before the hang.
        assert cached.on_private_redis(7) == "v1:7"
    assert probe.count("on_private_redis") == 2


#: Process A of the outage tests: with Redis down it invalidates, then exits.
INVALIDATE_AND_EXIT = """
import json, sys
import django
django.setup()
from django.conf import settings
from django.test.utils import override_settings
from django_scale.testing import override_scale_settings
private = json.loads(sys.argv[1])
with override_settings(CACHES={**settings.CACHES, "swr-private": private}), override_scale_settings(
    CACHE_ALIAS="swr-private"
):
    from testapp.cached import on_private_redis

    for n in json.loads(sys.argv[2]):
        on_private_redis.invalidate(n)
"""


def invalidate_in_another_process(*numbers: int) -> None:
    """Run process A: a worker of the same project that invalidates *numbers*, then exits."""

    def url(alias: str) -> str:
        db = connections[alias].settings_dict  # the test database's name, as the suite uses it
        credentials = f"{quote(db['USER'])}:{quote(db['PASSWORD'] or '')}"
        return f"postgres://{credentials}@{db['HOST']}:{db['PORT']}/{db['NAME']}"

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "settings",
        "DJANGO_SCALE_TEST_PRIMARY_URL": url("default"),
        "DJANGO_SCALE_TEST_REPLICA_URL": url("replica"),
        "DJANGO_SCALE_TEST_REDIS_URL": settings.CACHES["default"]["LOCATION"],
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    private = json.dumps(settings.CACHES["swr-private"])
    result = subprocess.run(
        [sys.executable, "-c", INVALIDATE_AND_EXIT, private, json.dumps(numbers)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"process A failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("process_b", ["A's successor", "a process that never saw the outage"])
@pytest.mark.django_db(transaction=True)
def test_an_invalidation_outlives_the_process_that_made_it_while_redis_was_down(
    cache_on_private_redis: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch, process_b: str
) -> None:
    if process_b != "A's successor":
        monkeypatch.setattr(invalidations, "CHECK_INTERVAL", 0.0)  # its next check is due
    assert cached.on_private_redis(5) == "v1:5"  # this process (B) reads it, fresh
    cache_on_private_redis(False)
    probe.data = "v2"
    invalidate_in_another_process(5)  # A changes the data, invalidates with Redis down, exits
    assert PendingInvalidation.objects.filter(key=cached.on_private_redis.key(5)).exists()
    cache_on_private_redis(True)
    # The restarted server has the old "v1" entry back.
    raw = caches["swr-private"].client.get_client()
    assert raw.exists(caches["swr-private"].client.make_key(cached.on_private_redis.key(5)))
    if process_b == "A's successor":
        reset_state()  # B starts now: nothing in memory, and it checks before its first read
    else:
        cached.on_private_redis(5)  # B's periodic check runs off the request
        assert wait_for_refills()
    assert [cached.on_private_redis(5) for _ in range(3)] == ["v2:5"] * 3
    assert not PendingInvalidation.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_many_invalidations_while_redis_is_down_collapse_into_their_function(
    private_redis: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(invalidations, "KEYS_PER_GROUP", 5)
    prefixed = {**settings.CACHES["swr-private"], "KEY_PREFIX": "a[site]*"}
    with (
        override_settings(CACHES={**settings.CACHES, "swr-private": prefixed}),
        override_scale_settings(CACHE_ALIAS="swr-private"),
    ):
        assert [cached.outage(n) for n in range(12)] == [f"v1:{n}" for n in range(12)]
        assert cached.bare(3) == 6  # another function, which nothing invalidates
        # A refill of an entry that expired, still running, read the data before the change.
        store = store_for("swr-private")
        expired = cached.outage.key(99)
        claimed = store.claim(expired, "in flight", 60, cold=True)
        assert claimed is not None
        generation = claimed.generation
        private_redis(False)
        for n in [*range(12), 99]:
            cached.outage.invalidate(n)
        # Thirteen keys of one function are one row: the function.
        assert list(PendingInvalidation.objects.values_list("key", flat=True)) == [""]
        assert invalidations.pending_in_memory("swr-private") == 0
        private_redis(True)
        reset_state()
        probe.data = "v2"
        assert [cached.outage(n) for n in range(12)] == [f"v2:{n}" for n in range(12)]
        assert cached.bare(3) == 6
        assert probe.count("bare") == 1
        envelope = Envelope(MARKER, "v1:99", time.time(), time.time() + 60, time.time() + 3600)
        assert store.write(expired, envelope, 3600, generation, "in flight") is False
        assert not PendingInvalidation.objects.exists()
        # Once replayed, a fresh hit is one GET again, and no query.
        before = redis_commands(caches["swr-private"])
        with CaptureQueriesContext(connections["default"]) as queries:
            assert [cached.outage(0) for _ in range(5)] == ["v2:0"] * 5
        assert redis_commands(caches["swr-private"]) - before == {"cmdstat_get": 5}
        assert queries.captured_queries == []


# -- views ------------------------------------------------------------------------------------------------


def test_cached_page_headers_and_hits(redis_cache: Any) -> None:
    client = Client()
    first = client.get("/swr/page/?q=a")
    second = client.get("/swr/page/?q=a")
    assert first.content == second.content == b"page v1 q=a"
    assert probe.count("page") == 1
    control = {part.strip() for part in second["Cache-Control"].split(",")}
    assert "stale-while-revalidate=3540" in control
    assert "stale-if-error=30" in control
    assert "public" in control
    max_age = next(int(part.split("=")[1]) for part in control if part.startswith("max-age="))
    assert 50 <= max_age <= 60
    assert client.get("/swr/page/?q=b").content == b"page v1 q=b"
    assert probe.count("page") == 2
    assert "Set-Cookie" not in second


def test_a_stale_page_is_served_and_refilled_by_celery(redis_cache: Any, celery_worker: Any) -> None:
    client = Client()
    assert client.get("/swr/page/?q=z").content == b"page v1 q=z"
    # Age the entry: rewrite its envelope with a past fresh time.
    store = store_for("default")
    key = next(k for k in cached_page_keys(redis_cache))
    envelope = store.get(key)
    assert envelope is not None
    now = time.time()
    store.write(key, envelope._replace(fresh_until=now - 1), 3600, store.generation(key), "")
    probe.data = "v2"
    stale = client.get("/swr/page/?q=z")
    assert stale.content == b"page v1 q=z"
    assert "max-age=0" in stale["Cache-Control"]
    wait_until(lambda: counter("swr.refill.succeeded") == 1, "the page refill")
    assert client.get("/swr/page/?q=z").content == b"page v2 q=z"


def cached_page_keys(redis_cache: Any) -> list[str]:
    client = redis_cache.client.get_client()
    prefix = redis_cache.client.make_key("")
    keys = [raw.decode()[len(prefix) :] for raw in client.scan_iter(f"{prefix}swr:{{testapp.cached.page:*")]
    return [key for key in keys if key.endswith("}")]


@pytest.mark.django_db
def test_pages_that_set_cookies_or_read_the_user_are_not_cached(redis_cache: Any) -> None:
    client = Client()
    for _ in range(2):
        assert client.get("/swr/cookie/").cookies["seen"].value == "1"
        assert client.get("/swr/user/").content == b"hello anonymous"
    assert probe.count("page_with_cookie") == 2
    assert probe.count("page_for_user") == 2


@pytest.mark.django_db
def test_a_page_varying_on_the_user_is_private_per_user(redis_cache: Any) -> None:
    from django.contrib.auth import get_user_model

    alice = get_user_model().objects.create_user("alice")
    bob = get_user_model().objects.create_user("bob")
    as_alice, as_bob = Client(), Client()
    as_alice.force_login(alice)
    as_bob.force_login(bob)
    assert as_alice.get("/swr/per-user/").content == b"hello alice"
    assert as_bob.get("/swr/per-user/").content == b"hello bob"
    again = as_alice.get("/swr/per-user/")
    assert again.content == b"hello alice"
    assert "private" in again["Cache-Control"]
    assert "Cookie" in again["Vary"]
    assert probe.count("page_per_user") == 2


def test_a_page_varies_on_the_headers_it_names(redis_cache: Any) -> None:
    client = Client()
    assert client.get("/swr/language/", headers={"Accept-Language": "fr"}).json()["language"] == "fr"
    assert client.get("/swr/language/", headers={"Accept-Language": "de"}).json()["language"] == "de"
    response = client.get("/swr/language/", headers={"Accept-Language": "fr"})
    assert response.json()["language"] == "fr"
    assert "Accept-Language" in response["Vary"]
    assert probe.count("page_by_language") == 2


def test_async_view_is_cached(redis_cache: Any) -> None:
    async def scenario() -> list[bytes]:
        client = AsyncClient()
        return [(await client.get("/swr/async/")).content for _ in range(3)]

    assert asyncio.run(scenario()) == [b"async page v1"] * 3
    assert probe.count("async_page") == 1


def test_posts_are_never_cached(redis_cache: Any) -> None:
    client = Client()
    client.post("/swr/page/")
    client.post("/swr/page/")
    assert probe.count("page") == 2


# -- system checks -----------------------------------------------------------------------------------------


@pytest.fixture
def lazy_celery(celery_app: Any) -> Iterator[Any]:
    """The suite's Celery app with eager execution switched off for the test."""
    eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = False
    try:
        yield celery_app
    finally:
        celery_app.conf.task_always_eager = eager


def check_ids() -> list[str]:
    from django_scale.cache.checks import check_cache

    return [message.id for message in check_cache()]


def test_check_cache_is_registered() -> None:
    from django.core import checks

    from django_scale.cache.checks import check_cache, check_cache_timeouts

    assert check_cache in checks.registry.registry.get_checks()
    assert check_cache_timeouts in checks.registry.registry.get_checks()


def test_e201_unknown_cache_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    from django_scale.cache.engine import Engine, registry

    monkeypatch.setitem(registry, "somewhere.prices", Engine(path="somewhere.prices", cache="prices"))
    from django_scale.cache.checks import check_cache

    [message] = [m for m in check_cache() if m.id == "django_scale.E201"]
    assert "somewhere.prices is cached with stale_while_revalidate(cache='prices')" in message.msg
    assert "Add 'prices' to CACHES" in message.hint


def test_w202_process_local_cache_with_celery_refill(lazy_celery: Any) -> None:
    with override_settings(CACHES={**_caches(), "default": LOCMEM}):
        from django_scale.cache.checks import check_cache

        [message] = [m for m in check_cache() if m.id == "django_scale.W202"]
    assert "The cache 'default' is a LocMemCache" in message.msg
    assert "testapp.cached." in message.msg
    lazy_celery.conf.task_always_eager = True
    with override_settings(CACHES={**_caches(), "default": LOCMEM}):
        assert "django_scale.W202" not in check_ids()


def test_no_cache_warnings_with_a_shared_cache(lazy_celery: Any) -> None:
    with override_settings(
        CACHES={
            **_caches(),
            "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"},
        }
    ):
        assert [i for i in check_ids() if i in ("django_scale.W202", "django_scale.E201")] == []


def test_w212_a_redis_cache_without_a_socket_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that hangs would hold each request for good: the caches django-scale uses need a
    socket timeout (CACHE_ALIAS, and the caches cached functions name)."""
    from django_scale.cache.checks import check_cache_timeouts
    from django_scale.cache.engine import Engine, registry

    def warned(**caches: dict[str, Any]) -> list[str]:
        with override_settings(CACHES={"default": LOCMEM, **caches}):
            return [str(message.obj) for message in check_cache_timeouts()]

    redis = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
    django_redis = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1",
    }
    assert warned(default=redis) == ["CACHES['default']"]
    assert warned(default=django_redis) == ["CACHES['default']"]
    assert warned(default={**redis, "OPTIONS": {"SOCKET_TIMEOUT": 1}}) == []
    assert warned(default={**django_redis, "OPTIONS": {"socket_timeout": 1}}) == []
    # The other backend's spelling is not this backend's timeout.
    assert warned(default={**redis, "OPTIONS": {"socket_timeout": 1}}) == ["CACHES['default']"]
    # A Redis cache django-scale does not use is the project's business.
    assert warned(sessions=redis) == []
    monkeypatch.setitem(registry, "somewhere.prices", Engine(path="somewhere.prices", cache="prices"))
    assert warned(prices=redis) == ["CACHES['prices']"]
    with override_settings(CACHES={"default": redis}):
        [message] = [m for m in check_cache_timeouts() if m.id == "django_scale.W212"]
    assert "no OPTIONS['SOCKET_TIMEOUT']" in message.msg
    assert """CACHES['default']["OPTIONS"]['SOCKET_TIMEOUT'] = 1""" in message.hint


def test_e203_celery_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "celery", None)  # what an uninstalled package looks like to import
    assert "django_scale.E203" in check_ids()


def _check_ids_in_a_fresh_process(code: str) -> list[str]:
    """Run *code* after django.setup() in a new process; return the lines it printed."""
    import os
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    prelude = (
        "import django; django.setup()\n"
        "from django_scale.cache.checks import check_cache\n"
        "def ids(): return sorted({m.id for m in check_cache()})\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "settings", "DJANGO_SCALE_TEST_BACKEND": "sqlite"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", prelude + code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_w205_the_default_celery_app_then_w204_refresh_task_not_registered() -> None:
    """A process that never loaded a Celery app: W205; an app without django_scale's task: W204."""
    default, bare, with_task = _check_ids_in_a_fresh_process(
        "import testapp.cached\n"
        "print(ids())\n"
        "from celery import Celery, current_app\n"
        "app = Celery('proj', broker='memory://')\n"
        "print(ids())\n"
        "current_app.loader.import_module('django_scale.tasks')\n"
        "print(ids())\n"
    )[-3:]
    assert "django_scale.W205" in default and "django_scale.W204" not in default
    assert "django_scale.W205" not in bare and "django_scale.W204" in bare
    assert "django_scale.W205" not in with_task and "django_scale.W204" not in with_task


def test_functions_cached_in_task_modules_are_checked() -> None:
    """A cached function only Celery's autodiscovery imports is checked all the same."""
    [ids] = _check_ids_in_a_fresh_process(
        "from celery import Celery\n"
        "app = Celery('proj', broker='memory://')\n"
        "app.autodiscover_tasks(['taskonly'])\n"
        "print(ids())\n"
    )[-1:]
    assert "django_scale.E201" in ids


def test_w206_broker_transport_cannot_be_imported_and_the_log_says_misconfigured() -> None:
    """kombu's Redis transport imports packaging: without it a worker dies and refills never leave."""
    blocked, error_kind, installed = _check_ids_in_a_fresh_process(
        "import sys\n"
        "import testapp.cached\n"
        "from celery import Celery\n"
        "sys.modules['packaging'] = None  # what an uninstalled package looks like to import\n"
        "app = Celery('proj', broker='redis://127.0.0.1:1/0')\n"
        "app.autodiscover_tasks(['django_scale'])\n"
        "print(ids())\n"
        "from django_scale.breakers import is_configuration_error\n"
        "try:\n"
        "    app.send_task('django_scale.refresh', retry=False)\n"
        "except Exception as error:\n"
        "    print('misconfigured' if is_configuration_error(error) else 'unreachable')\n"
        "del sys.modules['packaging']\n"
        "print(ids())\n"
    )[-3:]
    assert "django_scale.W206" in blocked
    assert error_kind == "misconfigured"
    assert "django_scale.W206" not in installed


def test_the_breaker_logs_an_import_error_as_misconfigured(caplog: pytest.LogCaptureFixture) -> None:
    from django_scale.breakers import Breakers

    breakers = Breakers(logging.getLogger("django_scale.cache"))
    with caplog.at_level(logging.WARNING, "django_scale.cache"):
        try:
            raise ConnectionError("refused")
        except ConnectionError as refused:
            breakers.trip("the broker", refused, 5.0)
        try:
            try:
                import_module("a_module_nobody_installed")
            except ImportError as missing:
                raise RuntimeError("sending failed") from missing
        except RuntimeError as wrapped:
            breakers.trip("the other broker", wrapped, 5.0)
    assert "the broker is unreachable (refused)" in caplog.text
    assert "the other broker is misconfigured (sending failed)" in caplog.text


@pytest.mark.parametrize(
    ("client_class", "store_class"),
    [
        ("django_redis.client.DefaultClient", RedisStore),
        ("django_redis.client.SentinelClient", RedisStore),
        ("django_redis.client.ShardClient", Store),
        ("django_redis.client.HerdClient", Store),
    ],
)
def test_the_lua_store_is_used_only_where_every_key_lives_on_one_server(
    client_class: str, store_class: type[Store]
) -> None:
    location = "redis://127.0.0.1:1/0"  # never connected to: choosing a store does no I/O
    options: dict[str, Any] = {"CLIENT_CLASS": client_class}
    if client_class.endswith("SentinelClient"):
        location = "redis://mymaster/0"
        options["SENTINELS"] = [("127.0.0.1", 1)]
        options["CONNECTION_POOL_CLASS"] = "redis.sentinel.SentinelConnectionPool"
    backend = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": location, "OPTIONS": options}
    with override_settings(CACHES={**settings.CACHES, "swr-kind": backend}):
        assert type(store_for("swr-kind")) is store_class
