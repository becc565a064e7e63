"""``approx_count(cached=True)``: counts through the query cache, never stale, never shared.

The rows a count reads (their primary keys, up to the threshold or cap) go through
``.cached()``: shown again while the table did not change, a count costs no query; after a
write to the table it is counted again. Each filter is its own entry, so a user whose
queryset hides rows never gets another user's count.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import test_querycache
from django.contrib.auth.models import Group
from django.db import connections
from django.test.utils import CaptureQueriesContext
from support import counter
from test_querycache import replayed_past_positions

from django_scale.cache.queries.storing import writer
from django_scale.counting import approx_count
from django_scale.exceptions import ArgumentError
from django_scale.paginator import ApproxCountPaginator
from django_scale.replicas import use_primary

from testapp.models import Post, Reporter

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


@REPLICA
@pytest.mark.urls("testapp.owned_admin")
def test_a_restricted_admin_counting_through_the_cache_never_shows_another_users_count(
    querycache: Any, replica: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From the attacker's side: alice and bob each see only their own posts. With the
    # counts cached, bob's changelist and search, loaded after alice's (and again, from the
    # cache), count bob's rows, never alice's.
    from django.contrib.auth.models import Permission, User
    from django.test import Client

    from testapp.owned_admin import OwnPostAdmin

    monkeypatch.setattr(ApproxCountPaginator, "count_cached", True)
    monkeypatch.setattr(OwnPostAdmin, "search_fields", ["title"])
    # Pages of two: a changelist whose page is full counts its rows (one that is not full
    # knows its count from the page).
    monkeypatch.setattr(OwnPostAdmin, "list_per_page", 2)
    alice, bob = Reporter.objects.create(name="alice"), Reporter.objects.create(name="bob")
    Post.objects.bulk_create(Post(reporter=alice, title="alice memo") for _ in range(40))
    Post.objects.bulk_create(Post(reporter=bob, title="bob memo") for _ in range(3))
    replica.wait_for_replay()

    def staff(name: str) -> Client:
        user = User.objects.create_user(name, f"{name}@example.com", "pw", is_staff=True)
        user.user_permissions.add(*Permission.objects.filter(codename="view_post"))
        client = Client()
        client.force_login(user)
        return client

    clients = {"alice": staff("alice"), "bob": staff("bob")}
    # Entries read on the replica are valid once it has replayed past the tables' positions.
    replayed_past_positions(querycache, replica, ("testapp_post", "testapp_reporter"))
    for _ in range(2):  # the second round is served from the query cache
        for name, expected in (("alice", 40), ("bob", 3)):
            for url in ("/owned/testapp/post/", "/owned/testapp/post/?q=memo"):
                response = clients[name].get(url)
                assert response.status_code == 200
                assert int(response.context["cl"].result_count) == expected, (name, url)
                assert not re.search(r"\balice\b" if name == "bob" else r"\bbob\b", response.content.decode())
        assert writer.flush()  # the entries stored (the writer's outbox sends them within 50 ms)
    assert counter("querycache.hit") >= 4  # the second round's four counts
