"""ApproxCountPaginator: pages sized by an estimate, rows always fetched with LIMIT."""

from __future__ import annotations

import pytest
from django.core.paginator import EmptyPage, PageNotAnInteger
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_scale.counting import ApproxCount
from django_scale.paginator import ApproxCountPaginator

from testapp.models import Author

pytestmark = pytest.mark.django_db


def with_count(queryset, per_page: int, count: ApproxCount) -> ApproxCountPaginator:
    paginator = ApproxCountPaginator(queryset, per_page)
    paginator.__dict__["count"] = count  # what approx_count() would have said
    return paginator


def follow_next(paginator: ApproxCountPaginator) -> list[int]:
    """Read every page by following "next", checking each fetch and each page link."""
    seen: list[int] = []
    number = 1
    while True:
        with CaptureQueriesContext(connection) as queries:
            page = paginator.page(number)
        selects = [
            q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")
        ]
        assert selects and all(f"LIMIT {paginator.per_page + 1}" in sql.upper() for sql in selects), selects
        assert len(page) > 0, f"page {number} is empty"
        seen += [author.pk for author in page]
        for link in paginator.get_elided_page_range(number):
            if isinstance(link, int):
                assert len(paginator.page(link)) > 0, f"page {number} links to empty page {link}"
        if not page.has_next():
            return seen
        number = page.next_page_number()


@pytest.mark.parametrize("estimate", [-1, 0, 3, 10, 41, 123, 369, 5000])
def test_every_row_is_reachable_whatever_the_estimate(estimate):
    Author.objects.bulk_create(Author(name=f"a{i}") for i in range(123))
    queryset = Author.objects.order_by("pk")
    paginator = with_count(queryset, 10, ApproxCount(estimate, "estimate"))
    assert follow_next(paginator) == list(queryset.values_list("pk", flat=True))
    # Past the last row there is no page, whatever the estimate promised.
    with pytest.raises(EmptyPage):
        paginator.page(14)


def test_an_estimate_that_was_too_high_is_corrected_on_the_last_page():
    Author.objects.bulk_create(Author(name=f"a{i}") for i in range(25))
    paginator = with_count(Author.objects.order_by("pk"), 10, ApproxCount(300, "estimate"))
    assert paginator.num_pages == 30
    last = paginator.page(3)
    assert not last.has_next() and len(last) == 5
    assert (paginator.count, paginator.count.method, paginator.num_pages) == (25, "exact", 3)


def test_an_estimate_that_was_too_low_still_serves_later_pages():
    Author.objects.bulk_create(Author(name=f"a{i}") for i in range(45))
    paginator = with_count(Author.objects.order_by("pk"), 10, ApproxCount(12, "estimate"))
    assert paginator.num_pages == 2
    page = paginator.page(4)
    assert page.has_next() and paginator.num_pages >= 5
    assert str(page.end_index()) == "40"


def test_empty_first_page_and_bad_numbers():
    paginator = ApproxCountPaginator(Author.objects.order_by("pk"), 10)
    first = paginator.page(1)
    assert list(first) == [] and not first.has_next() and paginator.count == 0
    with pytest.raises(EmptyPage):
        paginator.page(2)
    with pytest.raises(EmptyPage):
        paginator.page(0)
    with pytest.raises(PageNotAnInteger):
        paginator.page("x")


def test_the_page_is_a_queryset_that_does_not_query_again():
    Author.objects.bulk_create(Author(name=f"a{i}") for i in range(15))
    paginator = ApproxCountPaginator(Author.objects.order_by("pk"), 10)
    page = paginator.page(1)
    with CaptureQueriesContext(connection) as queries:
        names = [author.name for author in page.object_list]
        assert page.object_list.count() == 10
    assert len(names) == 10 and queries.captured_queries == []


def test_lists_work_too():
    paginator = ApproxCountPaginator(list(range(25)), 10)
    assert paginator.count == 25 and paginator.count.is_exact and paginator.num_pages == 3
    assert list(paginator.page(3)) == [20, 21, 22, 23, 24]
