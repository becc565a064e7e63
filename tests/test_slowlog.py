"""The slow-query log: fingerprints, parameters, routes, bounded size, merging, redaction."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from django.core.cache import caches
from django.db import connection
from django.test import Client, override_settings

from django_scale import slowlog
from django_scale.slowlog import store
from django_scale.testing import override_scale_settings

from testapp.models import Author, Ticket


@pytest.fixture(autouse=True)
def _empty_log() -> Iterator[None]:
    slowlog.reset()
    yield
    slowlog.uninstall()
    slowlog.reset()


def _raw_cache_value() -> str:
    return json.dumps(caches["default"].get(store.TABLE_KEY))


def test_fingerprint_strips_literals_and_collapses_lists() -> None:
    one = slowlog.fingerprint("SELECT * FROM t WHERE a IN (%s, %s) AND b = 'x''s' AND c > 12.5 AND t2.c3 = 7")
    two = slowlog.fingerprint(
        "select * from t where a in (%s, %s, %s, %s) and b = 'y' and c > 3 and t2.c3 = 1"
    )
    assert one == "SELECT * FROM t WHERE a IN (...) AND b = ? AND c > ? AND t2.c3 = ?"
    assert one.lower() == two.lower()
    assert slowlog.fingerprint("INSERT INTO t VALUES (%s, %s), (%s, %s)") == "INSERT INTO t VALUES (...)"
    assert slowlog.fingerprint('WHERE "t"."col2" = $1 LIMIT 21') == 'WHERE "t"."col2" = ? LIMIT ?'


@pytest.mark.django_db
def test_one_entry_per_fingerprint_with_its_real_parameters() -> None:
    with slowlog.recording(threshold_ms=0):
        list(Author.objects.filter(pk__in=[1, 2]))
        list(Author.objects.filter(pk__in=[3, 4, 5, 6]))
    records = [r for r in slowlog.slow_queries() if "testapp_author" in r.fingerprint]
    assert len(records) == 1
    record = records[0]
    assert record.count == 2
    assert "IN (...)" in record.fingerprint
    assert record.routes == {"-": 2}
    assert record.total_ms >= record.max_ms >= record.p99_ms > 0
    # The example is one run's statement with that run's own parameters.
    assert record.example_params in ([1, 2], [3, 4, 5, 6])
    assert record.example_sql.count("%s") == len(record.example_params)


@pytest.mark.django_db
def test_fast_statements_are_not_recorded() -> None:
    with slowlog.recording(threshold_ms=60_000):
        list(Author.objects.all())
    assert slowlog.slow_queries() == []


@pytest.mark.django_db
def test_route_is_the_view_name_not_the_path() -> None:
    author = Author.objects.create(name="a")
    middleware = [
        "django_scale.slowlog.SlowQueryMiddleware",
        *__import__("django.conf").conf.settings.MIDDLEWARE,
    ]
    with override_scale_settings(SLOW_QUERY_MS=0), override_settings(MIDDLEWARE=middleware):
        client = Client()
        assert client.get(f"/authors/{author.pk}/").status_code == 200
        assert client.get("/authors/999999/").status_code == 200
        assert client.get(f"/async/authors/{author.pk}/").status_code == 200
        assert client.get("/no/such/path/").status_code == 404
    routes: dict[str, int] = {}
    for record in slowlog.slow_queries():
        for route, count in record.routes.items():
            routes[route] = routes.get(route, 0) + count
    assert routes.get("testapp.views.show_author") == 2  # two paths, one route
    assert routes.get("testapp.views.async_show_author") == 1
    assert not any("no/such" in route or "authors/" in route for route in routes)


@pytest.mark.django_db
def test_size_is_bounded_by_total_time() -> None:
    with override_scale_settings(SLOW_QUERY_TOP=3), slowlog.recording(threshold_ms=0) as wrapper:
        for number in range(12):
            wrapper.record(f"SELECT {number} FROM t{number}", None, False, elapsed=number / 1000)
        records = slowlog.slow_queries()
        assert len(store._pending) == 0
    assert [r.fingerprint for r in records] == ["SELECT ? FROM t11", "SELECT ? FROM t10", "SELECT ? FROM t9"]


@pytest.mark.django_db
def test_workers_records_merge_in_the_cache() -> None:
    wrapper = slowlog.SlowQueryWrapper("default", 0)
    wrapper.record("SELECT * FROM t WHERE a = %s", [1], False, elapsed=0.010)
    assert store.flush()
    store.reset(cache=False)  # another worker: nothing of the first one's in its memory
    wrapper.record("SELECT * FROM t WHERE a = %s", [2], False, elapsed=0.030)
    wrapper.record("SELECT * FROM t WHERE a = %s", [3], False, elapsed=0.020)
    (record,) = slowlog.slow_queries()
    assert record.count == 3
    assert record.total_ms == pytest.approx(60.0)
    assert record.max_ms == pytest.approx(30.0)
    assert record.p99_ms == pytest.approx(30.0, rel=0.02)
    assert record.example_params == [2]


@pytest.mark.django_db
def test_two_users_parameters_never_mix_and_can_be_redacted() -> None:
    wrapper = slowlog.SlowQueryWrapper("default", 0)
    sql = "SELECT * FROM testapp_customer WHERE email = %s AND token = %s"
    wrapper.record(sql, ["alice@example.com", "alice-token"], False, elapsed=0.050)
    wrapper.record(sql, ["bob@example.com", "bob-token"], False, elapsed=0.040)
    (record,) = slowlog.slow_queries()
    # The slowest run's parameters, both of one user: never Alice's e-mail with Bob's token.
    assert record.example_params == ["alice@example.com", "alice-token"]
    slowlog.reset()
    with override_scale_settings(SLOW_QUERY_REDACT=True):
        wrapper.record(sql, ["carol@example.com", "carol-token"], False, elapsed=0.050)
        (record,) = slowlog.slow_queries()
    assert record.example_params is None
    assert "carol" not in _raw_cache_value()
    assert "carol" not in json.dumps(record.__dict__)


@pytest.mark.django_db
def test_install_times_new_connections_of_the_configured_aliases() -> None:
    with override_scale_settings(SLOW_QUERY_MS=0, SLOW_QUERY_DATABASES=["default"]):
        slowlog.install()
        slowlog.install()  # idempotent: one wrapper
        wrappers = [w for w in connection.execute_wrappers if isinstance(w, slowlog.SlowQueryWrapper)]
        assert len(wrappers) == 1
        Ticket.objects.filter(status="open").exists()
    assert any("testapp_ticket" in r.fingerprint for r in slowlog.slow_queries())
    slowlog.uninstall()
    assert not [w for w in connection.execute_wrappers if isinstance(w, slowlog.SlowQueryWrapper)]


@pytest.mark.django_db
def test_unreachable_cache_keeps_the_records_in_the_process() -> None:
    dead = {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"}
    caches_setting = {**__import__("django.conf").conf.settings.CACHES, "dead": dead}
    with override_settings(CACHES=caches_setting), override_scale_settings(CACHE_ALIAS="dead"):
        wrapper = slowlog.SlowQueryWrapper("default", 0)
        wrapper.record("SELECT 1", None, False, elapsed=0.5)
        assert store.flush() is False
        (record,) = slowlog.slow_queries()
    assert record.count == 1


@pytest.mark.django_db
def test_a_hung_cache_never_holds_a_query() -> None:
    from support import SilentServer

    server = SilentServer()
    hung = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://127.0.0.1:{server.port}/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.3, "SOCKET_TIMEOUT": 0.3},
    }
    caches_setting = {**__import__("django.conf").conf.settings.CACHES, "hung": hung}
    try:
        with override_settings(CACHES=caches_setting), override_scale_settings(CACHE_ALIAS="hung"):
            # Recording does no I/O: the statement returns while the cache answers nothing.
            with slowlog.recording(threshold_ms=0):
                assert Author.objects.filter(name="nobody").count() == 0
            assert any("testapp_author" in entry.fingerprint for entry in store._pending.values())
            assert store.flush() is False  # the merge waited for the socket timeout, then gave up
            assert server.accepted  # it did reach the hung server
            # The breaker is open: reading skips the cache and shows this process's records.
            (record,) = [r for r in slowlog.slow_queries() if "testapp_author" in r.fingerprint]
            assert record.count == 1
    finally:
        server.close()


def test_p99_of_merged_records_is_within_two_percent_of_the_exact_one() -> None:
    import math
    import random

    from django_scale.slowlog.records import Entry

    generator = random.Random(17)
    durations = [generator.lognormvariate(math.log(150), 0.8) for _ in range(5000)]
    workers = [Entry("f", "default") for _ in range(4)]
    for number, ms in enumerate(durations):
        workers[number % 4].add(ms, "-", "SELECT 1", None)
    merged = Entry.from_dict(workers[0].to_dict())
    for worker in workers[1:]:
        merged.merge(Entry.from_dict(worker.to_dict()))
    exact = sorted(durations)
    for q in (0.5, 0.99, 0.999):
        truth = exact[max(1, math.ceil(q * len(exact))) - 1]
        assert merged.quantile(q) == pytest.approx(truth, rel=0.02), q
    assert merged.count == 5000
    assert merged.total_ms == pytest.approx(sum(durations))
