"""django_scale.keyset: the rows after a row, whatever the ordering, NULLs and ties."""

from __future__ import annotations

import datetime

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_scale import keyset
from django_scale.paginator import ApproxCountPaginator

from testapp.models import Article, Author, BulkRecord

pytestmark = pytest.mark.django_db

DAY = datetime.datetime(2024, 3, 5, 10, tzinfo=datetime.timezone.utc)


@pytest.fixture
def articles() -> list[Article]:
    """Rows that tie on title and on published, with NULL published among them."""
    author = Author.objects.create(name="writer")
    return Article.objects.bulk_create(
        Article(
            author=author,
            title=f"title {n % 4}",
            published=None if n % 5 == 0 else DAY + datetime.timedelta(days=n % 3),
        )
        for n in range(23)
    )


def walk(ordering: list[str], size: int = 3) -> list[int]:
    """Read every row of the ordering in pages of *size*, each from the last row before it."""
    queryset = Article.objects.order_by(*ordering)
    keys = keyset.ordering_keys(queryset)
    assert keys is not None
    seen: list[int] = []
    last = None
    for _ in range(Article.objects.count() + 1):  # a wrong condition repeats rows: stop
        page = list(keyset.rows_after(queryset, keys, last)[:size])
        if not page:
            return seen
        seen += [row.pk for row in page]
        last = keyset.values_of(keys, page[-1])
    raise AssertionError(f"the walk does not end: {seen}")


@pytest.mark.parametrize(
    "ordering",
    [
        ["title"],  # ties on every key: broken by the primary key ordering_keys adds
        ["-title"],
        ["published"],  # NULLs where the database sorts them
        ["-published"],
        ["published", "-title"],  # mixed directions through a nullable field
        ["-published", "-title"],
        ["title", "published"],
        ["-title", "-id"],  # one direction, not nullable: a row comparison
        ["title", "-id"],
    ],
)
def test_walking_by_keyset_reads_every_row_once_in_the_databases_order(articles, ordering):
    expected = [row.pk for row in Article.objects.order_by(*ordering, "pk")]
    assert sorted(expected) == sorted(a.pk for a in articles)
    assert walk(ordering) == expected


def test_the_primary_key_breaks_ties_unless_a_key_is_unique():
    keys = keyset.ordering_keys(Article.objects.order_by("-title"))
    assert [(k.name, k.descending) for k in keys] == [("title", True), ("id", False)]
    keys = keyset.ordering_keys(Article.objects.order_by("title", "-pk"))
    assert [(k.name, k.descending) for k in keys] == [("title", False), ("id", True)]


def test_an_ordering_without_a_keyset():
    assert keyset.ordering_keys(Article.objects.all()) is None  # no explicit ordering
    assert keyset.ordering_keys(Article.objects.order_by("author__name")) is None
    assert keyset.ordering_keys(Article.objects.order_by("?")) is None
    assert keyset.ordering_keys(Article.objects.order_by("published"), nullable=False) is None


def test_one_direction_throughout_is_one_row_comparison(articles):
    queryset = Article.objects.order_by("-title", "-id")
    keys = keyset.ordering_keys(queryset)
    with CaptureQueriesContext(connection) as queries:
        list(keyset.rows_after(queryset, keys, ["title 2", articles[10].pk]))
    [sql] = [q["sql"] for q in queries.captured_queries]
    assert ") < (" in sql and " OR " not in sql


def test_after_a_null_in_each_direction(articles):
    queryset = Article.objects.order_by("published", "pk")
    keys = keyset.ordering_keys(queryset)
    nulls = [a.pk for a in articles if a.published is None]
    expected = [row.pk for row in queryset]
    position = expected.index(nulls[0])
    after = [row.pk for row in keyset.rows_after(queryset, keys, [None, nulls[0]])]
    assert after == expected[position + 1 :]
    largest = connection.features.nulls_order_largest
    # Ascending: NULLs last where they are largest (PostgreSQL), first where smallest (SQLite).
    assert (expected[-len(nulls) :] if largest else expected[: len(nulls)]) == nulls


def test_values_are_converted_and_checked():
    keys = keyset.ordering_keys(Article.objects.order_by("published"))
    assert keyset.after(keys, ["2024-03-05T10:00:00+00:00", "7"], using="default")
    with pytest.raises(ValidationError):
        keyset.after(keys, ["not a date", "7"], using="default")
    with pytest.raises(ValueError, match="one value per key"):
        keyset.after(keys, ["2024-03-05T10:00:00+00:00"], using="default")


def test_the_paginator_reads_a_page_after_the_last_row_of_the_previous(articles):
    queryset = Article.objects.order_by("title", "-pk")
    paginator = ApproxCountPaginator(queryset, 5)
    first = paginator.page(1)
    keys = keyset.ordering_keys(queryset)
    after = keyset.values_of(keys, list(first.object_list)[-1])
    with CaptureQueriesContext(connection) as queries:
        second = paginator.page(2, after=after)
    assert [row.pk for row in second.object_list] == [row.pk for row in paginator.page(2).object_list]
    [sql] = [q["sql"].upper() for q in queries.captured_queries]
    assert "OFFSET" not in sql and "LIMIT 6" in sql


@pytest.mark.parametrize("ordering", [["-created", "-id"], ["created", "id"]])
def test_a_row_comparison_of_datetimes_converts_them_as_the_field_does(ordering):
    BulkRecord.objects.bulk_create(BulkRecord(name=f"r{n}") for n in range(9))
    for n, record in enumerate(BulkRecord.objects.order_by("pk")):
        # Ties on created, broken by id.
        BulkRecord.objects.filter(pk=record.pk).update(created=DAY + datetime.timedelta(hours=n % 4))
    queryset = BulkRecord.objects.order_by(*ordering)
    keys = keyset.ordering_keys(queryset)
    seen: list[int] = []
    last = None
    for _ in range(10):  # a wrong condition repeats rows: stop
        page = list(keyset.rows_after(queryset, keys, last)[:2])
        if not page:
            break
        seen += [row.pk for row in page]
        last = keyset.values_of(keys, page[-1])
    assert seen == [row.pk for row in queryset]
