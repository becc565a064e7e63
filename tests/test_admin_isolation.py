"""A restricted ``get_queryset()`` shows nothing of the rows it hides, from any statistics.

Two staff users, alice and bob, each see only the articles of the author named like them
(``testapp.owned_admin``). Nothing of alice's rows may reach bob's changelist: not in the
choices of a filter on a plain field, a relation or a field through a relation, not in the
date hierarchy, not in the count. The unrestricted admin still takes its choices and its count
from the statistics.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connections
from django.db.models import Count, F, Q
from django.test import Client
from django.test.utils import CaptureQueriesContext

from testapp.models import Article, Author, Post, Reply, Reporter, Tag

pytestmark = pytest.mark.urls("testapp.owned_admin")

ALICE_ROWS = 5_000
BOB_ROWS = 30
ALICE_DAY = datetime.datetime(2019, 5, 5, 12, tzinfo=datetime.timezone.utc)
BOB_DAY = datetime.datetime(2024, 2, 2, 12, tzinfo=datetime.timezone.utc)


def _analyze() -> None:
    """Make real statistics (pg_stats, pg_class) of the tables, as autovacuum would."""
    if connections["default"].vendor == "postgresql":
        with connections["default"].cursor() as cursor:
            cursor.execute("ANALYZE testapp_author")
            cursor.execute("ANALYZE testapp_article")


def _staff(name: str) -> Client:
    user = User.objects.create_user(name, f"{name}@example.com", "pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_article", "view_post"]))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def articles(db: None) -> dict[str, Author]:
    """Many articles of alice's, a few of bob's, and statistics of both tables."""
    alice, bob = Author.objects.create(name="alice"), Author.objects.create(name="bob")
    Article.objects.bulk_create(
        Article(author=alice, title="alice secret", published=ALICE_DAY) for _ in range(ALICE_ROWS)
    )
    Article.objects.bulk_create(
        Article(author=bob, title="bob memo" if i % 3 else "bob note", published=BOB_DAY)
        for i in range(BOB_ROWS)
    )
    _analyze()
    return {"alice": alice, "bob": bob}


def _statistics_sql(queries: CaptureQueriesContext) -> list[str]:
    """The queries that read the planner's statistics of a table."""
    return [
        q["sql"]
        for q in queries.captured_queries
        if re.search(r"\bpg_stats\b|\bpg_class\b|^\s*EXPLAIN\b", q["sql"], re.IGNORECASE)
    ]


def _get(client: Client, url: str) -> tuple[str, CaptureQueriesContext]:
    with CaptureQueriesContext(connections["default"]) as queries:
        response = client.get(url)
    assert response.status_code == 200, response.content.decode()[:2000]
    return response.content.decode(), queries


def _mentions(html: str, name: str) -> bool:
    """Whether *html* names *name* as a word (a random CSRF token or signed cursor may hold
    the letters "bob" by chance, never as a word of its own)."""
    return re.search(rf"\b{re.escape(name)}\b", html, re.IGNORECASE) is not None


# -- From the attacker's side ------------------------------------------------------------------


def test_a_restricted_changelist_offers_nothing_of_another_users_rows(articles):
    bob = _staff("bob")
    html, queries = _get(bob, "/owned/testapp/article/")
    # Bob's own rows and values are there ...
    assert "bob memo" in html and "bob note" in html
    assert "?published__year=2024" in html
    # ... and nothing of alice's: not her title (a plain-field filter), not her author (a
    # relation filter, and a filter on author__name), not her year (the date hierarchy).
    assert not _mentions(html, "alice")
    assert "published__year=2019" not in html
    assert _statistics_sql(queries) == []


def test_a_restricted_changelist_counts_its_own_rows_never_the_tables(articles):
    # An estimate made from the whole table's statistics (the plan of bob's join said about
    # 2,500 rows) tells bob how many rows alice has.
    html, queries = _get(_staff("bob"), "/owned/testapp/article/")
    assert f"{BOB_ROWS} articles" in html
    assert "≈" not in html
    assert _statistics_sql(queries) == []


def test_a_restricted_changelist_names_no_hidden_row_chosen_in_the_url(articles):
    # Choosing alice's author by its primary key must not make the filter name it.
    bob = _staff("bob")
    html, _ = _get(bob, f"/owned/testapp/article/?author__id__exact={articles['alice'].pk}")
    assert not _mentions(html, "alice")
    html, _ = _get(bob, "/owned/testapp/article/?author__name=alice")
    assert "alice secret" not in html


def test_each_user_sees_their_own_values_and_never_the_others(articles):
    alice, bob = _staff("alice"), _staff("bob")
    alice_html, _ = _get(alice, "/owned/testapp/article/")
    bob_html, _ = _get(bob, "/owned/testapp/article/")
    assert "alice secret" in alice_html and not _mentions(alice_html, "bob")
    assert "?published__year=2019" in alice_html and "published__year=2024" not in alice_html
    assert "bob memo" in bob_html and not _mentions(bob_html, "alice")


def test_a_restricted_changelist_of_many_rows_probes_only_its_own_periods(articles):
    # More of bob's rows than the paginator counts exactly: the date hierarchy probes periods
    # (MIN/MAX, then one EXISTS per year) instead of reading the few rows' dates.
    bob = articles["bob"]
    Article.objects.bulk_create(
        Article(author=bob, title="bob memo", published=BOB_DAY.replace(year=2023)) for _ in range(40)
    )
    _analyze()
    html, queries = _get(_staff("bob"), "/owned/testapp/article/")
    years = re.findall(r"\?published__year=(\d+)", html)
    assert years == ["2023", "2024"]
    assert any("MIN(" in q["sql"].upper() for q in queries.captured_queries)
    assert not _mentions(html, "alice")
    assert "50+ articles" in html and "≈" not in html  # counted up to the threshold, no estimate
    assert _statistics_sql(queries) == []


@pytest.mark.postgres
def test_a_restricted_search_count_out_of_budget_shows_a_lower_bound_not_an_estimate(articles, monkeypatch):
    from testapp.admin import SmallThresholdPaginator

    # A budget no count meets, under ATOMIC_REQUESTS: the capped count is cancelled.
    monkeypatch.setattr(SmallThresholdPaginator, "count_budget", 0.000_5)
    monkeypatch.setitem(connections["default"].settings_dict, "ATOMIC_REQUESTS", True)
    bob = articles["bob"]
    Article.objects.bulk_create(Article(author=bob, title=f"bob memo {i}") for i in range(20_000))
    _analyze()
    html, queries = _get(_staff("bob"), "/owned/testapp/article/?q=memo")
    assert html.count('<td class="field-title">') + html.count('<th class="field-title">') == 20
    assert "20+ results" in html and "≈" not in html
    assert _statistics_sql(queries) == []


def test_relation_filters_of_a_restricted_changelist_list_only_rows_its_own_refer_to(db):
    alice, bob = Reporter.objects.create(name="alice"), Reporter.objects.create(name="bob")
    alice_tag, bob_tag = Tag.objects.create(name="alice tag"), Tag.objects.create(name="bob tag")
    for reporter, tag in ((alice, alice_tag), (bob, bob_tag)):
        editor = Reporter.objects.create(name=f"{reporter.name} editor")
        post = Post.objects.create(reporter=reporter, editor=editor, title=f"{reporter.name} post")
        post.tags.add(tag)
        Reply.objects.create(post=post, body=f"{reporter.name} reply")
    _analyze()
    client = _staff("bob")
    html, _ = _get(client, "/owned/testapp/post/")
    for shown in ("bob tag", "bob reply", "bob editor"):
        assert shown in html
    assert not _mentions(html, "alice")
    # Nor when alice's rows are chosen in the URL.
    alice_post = Post.objects.get(reporter=alice)
    reply = alice_post.replies.get()
    chosen = f"?tags__id__exact={alice_tag.pk}&replies__id__exact={reply.pk}&editor__id__exact={alice_post.editor_id}"
    html, _ = _get(client, f"/owned/testapp/post/{chosen}")
    assert not _mentions(html, "alice")


def test_the_unrestricted_changelist_still_takes_choices_and_count_from_statistics(articles):
    boss = Client()
    boss.force_login(User.objects.create_superuser("boss", "boss@example.com", "pw"))
    html, queries = _get(boss, "/whole/testapp/article/")
    assert "alice secret" in html and "bob memo" in html and "bob note" in html
    assert "?published__year=2019" in html and "?published__year=2024" in html
    distinct = [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]
    if connections["default"].vendor == "postgresql":
        assert distinct == []  # the choices came from pg_stats
        assert "≈ 5,030 articles" in html  # the count from pg_class
        assert any("pg_stats" in sql for sql in _statistics_sql(queries))
    else:
        assert distinct and all("LIMIT 100" in sql.upper() for sql in distinct)
        assert "50+ articles" in html


def test_a_restricted_changelist_reads_its_values_with_a_bounded_distinct(articles):
    bob = _staff("bob")
    _, queries = _get(bob, "/owned/testapp/article/")
    distinct = [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]
    assert distinct and all("LIMIT 100" in sql.upper() for sql in distinct), distinct
    # Every one of them is bounded by bob's restriction.
    assert all("'bob'" in sql for sql in distinct), distinct


# -- The one decision: does a queryset select its whole table? ---------------------------------


def _whole_table_cases() -> list[tuple[str, Any, bool]]:
    return [
        ("all", lambda: Article.objects.all(), True),
        ("select_related", lambda: Article.objects.select_related("author"), True),
        ("order_by", lambda: Article.objects.order_by("-title"), True),
        ("only", lambda: Article.objects.only("title"), True),
        ("defer", lambda: Article.objects.defer("title"), True),
        ("prefetch_related", lambda: Author.objects.prefetch_related("articles"), True),
        ("annotate", lambda: Article.objects.annotate(upper=F("title")), True),
        ("aggregate annotation", lambda: Author.objects.annotate(n=Count("articles")), True),
        ("distinct", lambda: Article.objects.distinct(), True),
        ("empty Q", lambda: Article.objects.filter(Q()), True),
        ("filter", lambda: Article.objects.filter(title="x"), False),
        ("exclude", lambda: Article.objects.exclude(title="x"), False),
        ("filter through a relation", lambda: Article.objects.filter(author__name="bob"), False),
        ("none", lambda: Article.objects.none(), False),
        ("extra where", lambda: Article.objects.extra(where=["1 = 1"]), False),
        ("extra tables", lambda: Article.objects.extra(tables=["testapp_author"]), False),
        ("having", lambda: Author.objects.annotate(n=Count("articles")).filter(n__gt=1), False),
        ("sliced", lambda: Article.objects.all()[:10], False),
        ("offset", lambda: Article.objects.all()[5:], False),
        ("union", lambda: Article.objects.all().union(Article.objects.all()), False),
        ("distinct on", lambda: Article.objects.order_by("author").distinct("author"), False),
    ]


@pytest.mark.parametrize(
    ("make", "expected"),
    [(make, expected) for _, make, expected in _whole_table_cases()],
    ids=[name for name, _, _ in _whole_table_cases()],
)
def test_selects_whole_table(db, make, expected):
    from django_scale.admin import selects_whole_table

    # Pins the parts of Django's Query it reads, on every Django of the matrix.
    assert selects_whole_table(make()) is expected


def test_distinct_values_of_a_restricted_queryset_never_come_from_statistics(articles):
    from django_scale.admin import distinct_values

    with CaptureQueriesContext(connections["default"]) as queries:
        titles = distinct_values(Article.objects.filter(author=articles["bob"]), "title")
        names = distinct_values(Article.objects.filter(author=articles["bob"]), "author__name")
    assert titles == ["bob memo", "bob note"]
    assert names == ["bob"]
    assert _statistics_sql(queries) == []
    with CaptureQueriesContext(connections["default"]) as queries:
        assert distinct_values(Article.objects.all(), "title") == ["alice secret", "bob memo", "bob note"]
    if connections["default"].vendor == "postgresql":
        assert _statistics_sql(queries) and "DISTINCT" not in queries.captured_queries[-1]["sql"].upper()


@pytest.mark.postgres
def test_approx_count_without_statistics_counts_the_rows_themselves(articles):
    from django_scale.counting import approx_count

    restricted = Article.objects.filter(author__name="bob")
    with CaptureQueriesContext(connections["default"]) as queries:
        count = approx_count(restricted, threshold=10, statistics=False)
    assert (int(count), count.method) == (10, "capped")
    assert _statistics_sql(queries) == []
    with CaptureQueriesContext(connections["default"]) as queries:
        count = approx_count(restricted, threshold=50, statistics=False)
    assert (int(count), count.method) == (BOB_ROWS, "exact")
    with CaptureQueriesContext(connections["default"]) as queries:
        count = approx_count(restricted.filter(title__icontains="memo"), threshold=5, statistics=False)
    assert (int(count), count.method) == (20, "exact")  # a capped count: up to cap + 1 rows
    assert _statistics_sql(queries) == []
