"""The refill task never trusts its message, and ``@stale_while_revalidate`` keeps users apart.

Someone with write access to the broker can send ``django_scale.refresh`` any arguments. The
worker must recompute the key from the registered function and the arguments (a forged key
would put one user's result under another user's key), write to the engine's own cache only,
and import nothing but modules of installed apps (a forged path must not import a module with
side effects). Legitimate refills still write exactly once.

The tests that call the task in the test process run on both backends; the ones with a real
Celery worker on the services backend.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import caches
from django.test import RequestFactory
from django.test.utils import override_settings
from support import counter, swr_cache, wait_until

from django_scale import metrics
from django_scale.cache import reset_state, wait_for_refills
from django_scale.cache.engine import Engine, registry
from django_scale.cache.keys import build_key, encode_key_parts
from django_scale.cache.store import MARKER, Envelope, store_for
from django_scale.cache.task import run_refill_task

from testapp import cached, userdata
from testapp.cached import probe

LOCMEM = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "refill-tests"}
ALICE, BOB = 101, 202


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    probe.reset()
    metrics.reset()
    reset_state()
    os.environ.pop("DJANGO_SCALE_TEST_TRAP", None)
    yield
    probe.release.set()
    assert wait_for_refills()
    reset_state()


@pytest.fixture(params=["locmem", pytest.param("redis", marks=pytest.mark.redis)])
def cache_alias(request: pytest.FixtureRequest) -> Iterator[str]:
    """Where the functions cache: local memory, and Redis on the services backend."""
    with swr_cache(request.param, "refill-tests") as alias:
        yield alias


def make_stale(function: Any, *args: Any, value: Any) -> str:
    """Store *value* as the stale entry of *function(*args)*; return its key."""
    key: str = function.key(*args)
    store = store_for(function._django_scale_engine.alias())
    now = time.time()
    envelope = Envelope(MARKER, value, now - 4000, now - 100, now + 3000)
    assert store.write(key, envelope, 3600, store.generation(key), "")
    return key


def cached_value(function: Any, *args: Any) -> Any:
    envelope = store_for(function._django_scale_engine.alias()).get(function.key(*args))
    return None if envelope is None else envelope.value


def message(path: str, key: str, arguments: Any, alias: str | None = None) -> tuple[Any, ...]:
    """The arguments of one ``django_scale.refresh`` task."""
    engine = registry.get(path)
    alias = alias or (engine.alias() if engine is not None else "default")
    generation = store_for(alias).generation(key) if isinstance(key, str) else 0
    return (path, alias, key, "forged-token", generation, arguments, False)


def of(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


BALANCE = "testapp.userdata.balance"


# -- a forged key ------------------------------------------------------------------------------------


def test_a_forged_key_never_gets_another_users_value(
    cache_alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    alices_key = make_stale(userdata.balance, ALICE, value="alice's stale balance")
    # Bob's arguments, Alice's key: on a trusting worker Alice would be served Bob's balance.
    with caplog.at_level(logging.ERROR, logger="django_scale.cache"):
        assert run_refill_task(*message(BALANCE, alices_key, of(BOB))) is False
    assert cached_value(userdata.balance, ALICE) == "alice's stale balance"
    assert probe.count("balance") == 0
    assert any("key" in r.getMessage() and alices_key in r.getMessage() for r in caplog.records)
    assert counter("swr.refill.rejected") == 1


def test_a_key_that_is_not_the_functions_is_rejected(cache_alias: str) -> None:
    # Keys of another function, of no function, or not a key at all.
    key = make_stale(userdata.balance, ALICE, value="stale")
    headline_key = cached.headline.key("news")
    for forged in (headline_key, "swr:{anything}", key + "x", None, 7):
        assert run_refill_task(*message(BALANCE, forged, of(ALICE))) is False  # type: ignore[arg-type]
    assert cached_value(userdata.balance, ALICE) == "stale"
    assert probe.count("balance") == 0


@pytest.mark.parametrize(
    "arguments",
    [None, "x", [ALICE], {"args": ALICE}, {"args": [ALICE]}, {"args": [ALICE], "kwargs": {"other": 1}}],
)
def test_malformed_arguments_are_rejected(cache_alias: str, arguments: Any) -> None:
    key = make_stale(userdata.balance, ALICE, value="stale")
    assert run_refill_task(*message(BALANCE, key, arguments)) is False
    assert cached_value(userdata.balance, ALICE) == "stale"
    assert probe.count("balance") == 0


def test_a_message_for_another_cache_is_rejected(cache_alias: str) -> None:
    key = make_stale(userdata.balance, ALICE, value="stale")
    with override_settings(CACHES={**settings.CACHES, "elsewhere": {**LOCMEM, "LOCATION": "elsewhere"}}):
        assert run_refill_task(*message(BALANCE, key, of(ALICE), alias="elsewhere")) is False
        assert caches["elsewhere"].get(key) is None
    assert probe.count("balance") == 0


def test_an_engine_without_key_of_is_rejected(cache_alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    computed: list[Any] = []

    def rebuild(arguments: Any) -> Callable[[], Any]:
        return lambda: computed.append(arguments) or "written"

    monkeypatch.setitem(registry, "somewhere.opaque", Engine(path="somewhere.opaque", rebuild=rebuild))
    key = build_key("somewhere.opaque", 1, encode_key_parts({"n": 1}))
    assert run_refill_task(*message("somewhere.opaque", key, of(1), alias=cache_alias)) is False
    assert computed == []
    assert store_for(cache_alias).get(key) is None


@pytest.mark.django_db
def test_a_forged_key_of_a_cached_page_is_rejected(cache_alias: str) -> None:
    from django.test import Client

    engine = registry["testapp.cached.page"]
    assert Client().get("/swr/page/", {"q": "alice-secret"}).content == b"page v1 q=alice-secret"
    # The refill arguments the read path makes for each visitor's request (the page's own parts).
    view = cached.page._django_scale_page  # type: ignore[attr-defined]
    alices = view.parts(RequestFactory().get("/swr/page/", {"q": "alice-secret"}), (), {})
    bobs = view.parts(RequestFactory().get("/swr/page/", {"q": "bob"}), (), {})
    alices_key = engine.key_of(alices)
    assert store_for(cache_alias).get(alices_key) is not None  # the key the read path wrote
    assert run_refill_task(*message("testapp.cached.page", alices_key, bobs)) is False
    assert Client().get("/swr/page/", {"q": "alice-secret"}).content == b"page v1 q=alice-secret"
    assert probe.count("page") == 1


# -- a forged path -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "os.system",
        "subprocess.run",
        "refill_trap.anything",
        "outsider.trap.anything",
        "outsider.trap",
        "testapp",
        "",
        "testapp..balance",
        "testapp.userdata.<locals>.balance",
        "django_scale.cache.engine.registry.clear",
    ],
)
def test_a_forged_path_imports_nothing_outside_installed_apps(
    cache_alias: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The URLconf is the one module the task may import for any path (once per process).
    importlib.import_module(settings.ROOT_URLCONF)
    modules = set(sys.modules)
    with caplog.at_level(logging.ERROR, logger="django_scale.cache"):
        assert run_refill_task(*message(path, "swr:{x}", ["echo forged"], alias=cache_alias)) is False
    assert "refill_trap" not in sys.modules
    assert "outsider.trap" not in sys.modules
    assert "DJANGO_SCALE_TEST_TRAP" not in os.environ
    assert set(sys.modules) - modules == set()
    assert caplog.records, "the rejection was not logged"
    assert BALANCE in registry  # nothing was cleared


def test_a_registered_function_of_an_installed_app_is_imported_and_refilled(cache_alias: str) -> None:
    path = "testapp.refill_lazy.doubled"
    sys.modules.pop("testapp.refill_lazy", None)
    registry.pop(path, None)
    key = build_key(path, 1, encode_key_parts({"n": 21}))
    assert run_refill_task(*message(path, key, of(21), alias=cache_alias)) is True
    assert "testapp.refill_lazy" in sys.modules
    envelope = store_for(cache_alias).get(key)
    assert envelope is not None
    assert envelope.value == 42


# -- key_of: the read path's key, from a refill's arguments --------------------------------------------------


def test_key_of_is_the_read_paths_key() -> None:
    balance = userdata.balance._django_scale_engine.key_of
    statement = userdata.statement._django_scale_engine.key_of
    report = userdata.report._django_scale_engine.key_of
    headline = cached.headline._django_scale_engine.key_of
    assert balance(of(ALICE)) == userdata.balance.key(ALICE)
    assert balance(of(user_id=ALICE)) == userdata.balance.key(ALICE)
    assert balance(of(BOB)) != userdata.balance.key(ALICE)
    assert statement(of(ALICE, "x")) == userdata.statement.key(ALICE) == statement(of(ALICE, "y"))
    assert report(of(ALICE, year=2023, kind="a")) == userdata.report.key(ALICE, year=2023, kind="a")
    assert report(of(ALICE, kind="a")) != userdata.report.key(ALICE, kind="b")
    assert headline(of("news", 1)) == cached.headline.key("news") == headline(of("news"))


# -- with a real worker --------------------------------------------------------------------------------------


def run_on_worker(arguments: tuple[Any, ...]) -> None:
    """Send one refresh message and wait until the worker has handled it."""
    from django_scale.tasks import refresh

    from testapp.tasks import add

    refresh.apply_async(args=arguments)
    # The worker runs one task at a time, in order: once this one is done, so is the refresh.
    assert add.delay(1, 2).get(timeout=30) == 3


def test_the_worker_rejects_a_forged_key(redis_cache: Any, celery_worker: Any) -> None:
    alices_key = make_stale(userdata.balance, ALICE, value="alice's stale balance")
    run_on_worker(message(BALANCE, alices_key, of(BOB)))
    assert cached_value(userdata.balance, ALICE) == "alice's stale balance"
    assert probe.count("balance") == 0
    assert counter("swr.refill.rejected") == 1
    assert userdata.balance(ALICE) == "alice's stale balance"


def test_the_worker_imports_nothing_for_a_forged_path(redis_cache: Any, celery_worker: Any) -> None:
    run_on_worker(message("refill_trap.anything", "swr:{x}", of(), alias="default"))
    run_on_worker(message("outsider.trap.anything", "swr:{x}", of(), alias="default"))
    run_on_worker(message("os.system", "swr:{x}", ["echo forged"], alias="default"))
    assert "refill_trap" not in sys.modules
    assert "outsider.trap" not in sys.modules
    assert "DJANGO_SCALE_TEST_TRAP" not in os.environ
    assert counter("swr.refill.rejected") == 3


def test_two_users_never_get_each_others_values_through_a_celery_refill(
    redis_cache: Any, celery_worker: Any
) -> None:
    assert userdata.balance(ALICE) == f"v1:balance-of-{ALICE}"
    assert userdata.balance(BOB) == f"v1:balance-of-{BOB}"
    make_stale(userdata.balance, ALICE, value="alice's stale balance")
    make_stale(userdata.balance, BOB, value="bob's stale balance")
    probe.data = "v2"
    assert userdata.balance(ALICE) == "alice's stale balance"
    assert userdata.balance(BOB) == "bob's stale balance"
    assert wait_for_refills()
    wait_until(lambda: counter("swr.refill.succeeded") == 2, "both refills")
    assert userdata.balance(ALICE) == f"v2:balance-of-{ALICE}"
    assert userdata.balance(BOB) == f"v2:balance-of-{BOB}"
    # Each refill ran once, for its own user; then a forged message changes nothing.
    assert sorted(arg for name, arg in probe.calls if name == "balance") == [ALICE, ALICE, BOB, BOB]
    run_on_worker(message(BALANCE, userdata.balance.key(ALICE), of(BOB)))
    assert userdata.balance(ALICE) == f"v2:balance-of-{ALICE}"
    assert counter("swr.refill.succeeded") == 2
    assert counter("swr.refill.enqueued") == 2


def test_a_legitimate_refill_writes_exactly_once(redis_cache: Any, celery_worker: Any) -> None:
    make_stale(userdata.report, ALICE, value="stale")
    probe.data = "fresh"
    assert userdata.report(ALICE) == "stale"
    assert wait_for_refills()
    wait_until(lambda: counter("swr.refill.succeeded") == 1, "the refill")
    assert userdata.report(ALICE) == f"fresh:report-of-{ALICE}-2024-[]"
    assert probe.count("report") == 1
    assert counter("swr.refill.rejected") == 0
