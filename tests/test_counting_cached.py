"""``approx_count(cached=True)``: counts through the query cache, never stale, never shared.

The rows a count reads (their primary keys, up to the threshold or cap) go through
``.cached()``: shown again while the table did not change, a count costs no query; after a
write to the table it is counted again. Each filter is its own entry, so a user whose
queryset hides rows never gets another user's count.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_querycache
from django.contrib.auth.models import Group
from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_scale.counting import approx_count
from django_scale.exceptions import ArgumentError
from django_scale.paginator import ApproxCountPaginator
from django_scale.replicas import use_primary

from testapp.models import Reporter

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])
# test_querycache's fixtures: a clean state around each test, and the query cache on.
_clean = test_querycache._clean
querycache = test_querycache.querycache


def counted(queryset: Any, **options: Any) -> tuple[int, str, int]:
    """``approx_count(queryset, cached=True)``: its value, method and the queries that read
    rows of the table (the count's own; the estimates read the statistics or EXPLAIN)."""
    with CaptureQueriesContext(connections["default"]) as captured:
        count = approx_count(queryset, cached=True, **options)
    table = Reporter._meta.db_table
    reads = [
        q["sql"] for q in captured.captured_queries if f'FROM "{table}"' in q["sql"] and "LIMIT" in q["sql"]
    ]
    return int(count), count.method, len(reads)


@REPLICA
def test_a_cached_count_is_served_again_without_a_query_and_counted_again_after_a_write(
    querycache: Any,
) -> None:
    Reporter.objects.bulk_create(Reporter(name=f"r{n}") for n in range(5))
    with use_primary():
        assert counted(Reporter.objects.all()) == (5, "exact", 1)
        assert counted(Reporter.objects.all()) == (5, "exact", 0)  # from the query cache
        Reporter.objects.create(name="r5")
        assert counted(Reporter.objects.all()) == (6, "exact", 1)  # the write: counted again
        # A capped count (a substring filter) is cached as well, up to its cap.
        substring = Reporter.objects.filter(name__icontains="r")
        assert counted(substring, cap=3, threshold=3) == (3, "capped", 1)
        assert counted(substring, cap=3, threshold=3) == (3, "capped", 0)
        # Without cached=True nothing comes from the cache.
        with CaptureQueriesContext(connections["default"]) as captured:
            assert int(approx_count(Reporter.objects.all())) == 6
        assert any(f'FROM "{Reporter._meta.db_table}"' in q["sql"] for q in captured.captured_queries)


@REPLICA
def test_each_filter_is_its_own_count(querycache: Any) -> None:
    # What one user's queryset hides is another query, another entry: never another's count.
    Reporter.objects.bulk_create(Reporter(name=name) for name in ("ann", "bob", "ann2"))
    with use_primary():
        assert int(approx_count(Reporter.objects.all(), cached=True)) == 3
        assert int(approx_count(Reporter.objects.filter(name__startswith="ann"), cached=True)) == 2
        assert int(approx_count(Reporter.objects.exclude(name__startswith="ann"), cached=True)) == 1
        assert int(approx_count(Reporter.objects.all(), cached=True)) == 3


@pytest.mark.django_db
def test_a_cached_count_needs_a_queryset_with_cached() -> None:
    with pytest.raises(ArgumentError, match=r"cached\(\) \(a ScaleQuerySet\), not QuerySet of Group"):
        approx_count(Group.objects.all(), cached=True)

    class CachedPaginator(ApproxCountPaginator):
        count_cached = True

    with pytest.raises(ArgumentError):
        _ = CachedPaginator(Group.objects.order_by("pk"), 10).count
    assert int(CachedPaginator(Reporter.objects.order_by("pk"), 10).count) == Reporter.objects.count()
