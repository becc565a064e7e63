"""approx_count(): exact when small, estimated when big, never a full COUNT(*) of a big table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from django_scale.counting import ApproxCount, _table_estimate, approx_count
from django_scale.exceptions import ArgumentError

from testapp.models import Author

pytestmark = pytest.mark.django_db


def make_authors(n: int, name: str = "author") -> None:
    Author.objects.bulk_create(Author(name=f"{name} {i}") for i in range(n))


def analyze() -> None:
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE testapp_author")


def counts(queries: CaptureQueriesContext) -> list[str]:
    return [query["sql"] for query in queries.captured_queries if "COUNT(" in query["sql"].upper()]


def test_display():
    assert str(ApproxCount(12_345, "exact")) == "12,345"
    assert str(ApproxCount(12_345_678, "estimate")) == "≈ 12.3 million"
    assert str(ApproxCount(3_456, "estimate")) == "≈ 3,460"
    assert str(ApproxCount(10_000, "capped")) == "10,000+"
    assert f"{ApproxCount(1_500_000_000, 'estimate')}" == "≈ 1.5 billion"
    assert ApproxCount(-1, "estimate") == 0
    assert ApproxCount(5).is_exact and not ApproxCount(5, "capped").is_exact


def test_bad_arguments_are_refused():
    with pytest.raises(ArgumentError, match="threshold >= 1") as raised:
        approx_count(Author.objects.all(), threshold=0)
    assert isinstance(raised.value, ValueError)
    assert "threshold=0" in str(raised.value)


def test_small_tables_are_counted_exactly_without_counting_past_the_threshold():
    make_authors(30)
    if connection.vendor == "postgresql":
        analyze()  # statistics left by another test's rolled-back rows would say "big"
    with CaptureQueriesContext(connection) as queries:
        result = approx_count(Author.objects.all(), threshold=100)
    assert result == 30 and result.is_exact
    [count] = counts(queries)
    assert "LIMIT 101" in count.upper()


def test_filtered_small_result_is_exact():
    make_authors(40, "a")
    make_authors(10, "b")
    assert approx_count(Author.objects.filter(name__startswith="b"), threshold=100) == 10


@pytest.mark.postgres
def test_big_unfiltered_table_is_estimated_without_a_count():
    make_authors(600)
    analyze()
    with CaptureQueriesContext(connection) as queries:
        result = approx_count(Author.objects.all(), threshold=100)
    assert result.method == "estimate"
    assert 500 <= result <= 700
    assert counts(queries) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_stale_statistics_are_scaled_by_the_table_size():
    with connection.cursor() as cursor:
        # Start from an empty file: earlier tests' rolled-back rows leave free space behind.
        cursor.execute("TRUNCATE testapp_author CASCADE")
    make_authors(300)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) testapp_author")
    make_authors(900)  # after ANALYZE: reltuples still says 300
    result = approx_count(Author.objects.using("default"), threshold=100)
    assert result.method == "estimate"
    assert 1000 <= result <= 1400, result


@pytest.mark.postgres
def test_equality_filter_is_estimated_from_the_plan_without_a_count():
    make_authors(400, "same")
    Author.objects.filter(name__startswith="same").update(name="same")
    make_authors(200, "other")
    analyze()
    with CaptureQueriesContext(connection) as queries:
        result = approx_count(Author.objects.filter(name="same"), threshold=100)
    assert result.method == "estimate"
    assert 300 <= result <= 500
    assert counts(queries) == []


@pytest.mark.postgres
def test_substring_search_is_a_capped_count():
    make_authors(500, "needle")
    make_authors(100, "hay")
    analyze()
    with CaptureQueriesContext(connection) as queries:
        capped = approx_count(Author.objects.filter(name__icontains="EEDL"), threshold=50, cap=100)
    assert (int(capped), capped.method, str(capped)) == (100, "capped", "100+")
    assert all("LIMIT 101" in sql.upper() for sql in counts(queries))
    exact = approx_count(Author.objects.filter(name__icontains="eedl"), threshold=50, cap=1000)
    assert (int(exact), exact.method) == (500, "exact")
    # The time budget was put back: the session's statement_timeout is unchanged.
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == "0"


@pytest.mark.postgres
def test_never_analysed_table_never_gets_a_full_count():
    make_authors(700)
    with connection.cursor() as cursor:
        # What the statistics of a table never analysed say (PostgreSQL 14+).
        cursor.execute(
            "UPDATE pg_class SET reltuples = -1, relpages = 0 WHERE oid = 'testapp_author'::regclass"
        )
    with CaptureQueriesContext(connection) as queries:
        result = approx_count(Author.objects.all(), threshold=100)
    assert result > 100
    assert all("LIMIT" in sql.upper() for sql in counts(queries)), counts(queries)


@pytest.mark.postgres
def test_partitioned_tables_sum_their_partitions():
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE scale_parts (id int) PARTITION BY RANGE (id)")
        cursor.execute("CREATE TABLE scale_parts_a PARTITION OF scale_parts FOR VALUES FROM (0) TO (1000)")
        cursor.execute("CREATE TABLE scale_parts_b PARTITION OF scale_parts FOR VALUES FROM (1000) TO (5000)")
        cursor.execute("INSERT INTO scale_parts SELECT generate_series(0, 2999)")
        cursor.execute("ANALYZE scale_parts")
    fake = SimpleNamespace(_meta=SimpleNamespace(db_table="scale_parts"))
    estimate = _table_estimate("default", fake)  # type: ignore[arg-type]
    assert estimate is not None and 2500 <= estimate <= 3500


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_counts_run_on_the_querysets_own_alias(replica):
    make_authors(20)
    analyze()
    replica.wait_for_replay()
    with (
        CaptureQueriesContext(connections["replica"]) as on_replica,
        CaptureQueriesContext(connections["default"]) as on_primary,
    ):
        assert approx_count(Author.objects.using("replica"), threshold=100) == 20
    assert on_replica.captured_queries and not on_primary.captured_queries


@pytest.mark.postgres
def test_a_distinct_queryset_is_never_counted_in_full():
    # The admin makes a search across a many-to-many relation DISTINCT.
    make_authors(600)
    analyze()
    with CaptureQueriesContext(connection) as queries:
        result = approx_count(Author.objects.filter(name__startswith="author").distinct(), threshold=100)
    assert result > 100
    assert all("LIMIT" in sql.upper() for sql in counts(queries)), counts(queries)
