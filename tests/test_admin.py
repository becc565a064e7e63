"""ScaleModelAdmin: GET pages on a replica, POSTs on the primary."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connections
from django.test import Client
from django.test.utils import CaptureQueriesContext

from django_scale.replicas import monitor, parse_lsn
from django_scale.testing import capture_reads, simulate_lag

from testapp.models import Article, Author

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])
PUBLISHED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


@pytest.fixture
def admin_client(replica) -> Client:
    user = User.objects.create_superuser("boss", "boss@example.com", "pw")
    client = Client()
    client.force_login(user)
    replica.wait_for_replay()
    # The user and the session are on the replica, and this process's monitor knows it.
    assert monitor("replica").wait_for(parse_lsn(replica.primary_lsn()), 10)
    return client


@REPLICA
def test_changelist_and_change_form_read_from_the_replica(admin_client, paused_replica):
    author = Author.objects.create(name="Ursula")
    # Committed on the primary while replay is paused: the replica does not have it.
    with capture_reads() as reads:
        response = admin_client.get("/admin/testapp/author/")
    assert response.status_code == 200
    assert "Ursula" not in response.content.decode()
    assert set(reads) == {"replica"}
    assert Author.objects.using("default").filter(pk=author.pk).exists()


@REPLICA
def test_a_post_loads_the_object_from_the_primary_and_keeps_newer_columns(admin_client, replica):
    author = Author.objects.create(name="Octavia")
    article = Article.objects.create(author=author, title="Draft")
    replica.wait_for_replay()
    assert monitor("replica").wait_for(parse_lsn(replica.primary_lsn()), 10)

    with capture_reads() as reads:
        page = admin_client.get(f"/admin/testapp/article/{article.pk}/change/")
    assert page.status_code == 200 and "Draft" in page.content.decode()
    assert set(reads) == {"replica"}

    with simulate_lag("replica"):
        # Newer values on the primary that the paused replica does not have.
        Article.objects.filter(pk=article.pk).update(published=PUBLISHED)
        with CaptureQueriesContext(connections["replica"]) as on_replica:
            response = admin_client.post(
                f"/admin/testapp/article/{article.pk}/change/", {"title": "Final", "author": author.pk}
            )
        assert response.status_code == 302, response.content.decode()[:2000]
        # Only the session and user lookups, before the view, ran on the replica; the article
        # (and the author the form validates) were read from the primary.
        replica_sql = " ".join(query["sql"] for query in on_replica.captured_queries)
        assert "testapp_article" not in replica_sql and "testapp_author" not in replica_sql
        saved = Article.objects.using("default").get(pk=article.pk)
        assert (saved.title, saved.published) == ("Final", PUBLISHED)

        # The redirect's page is the user's next request: it shows their own write.
        with capture_reads() as reads:
            listing = admin_client.get(response["Location"])
        assert "Final" in listing.content.decode()
        assert set(reads) == {"default"}


# -- The changelist of a big table -------------------------------------------------------------


@pytest.fixture
def superuser_client(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("chief", "chief@example.com", "pw"))
    return client


def _analyze() -> None:
    if connections["default"].vendor == "postgresql":
        with connections["default"].cursor() as cursor:
            cursor.execute("ANALYZE testapp_author")


def _count_queries(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]


@pytest.mark.postgres
def test_a_big_changelist_runs_no_count(superuser_client):
    Author.objects.bulk_create(Author(name=f"writer {i}") for i in range(300))
    _analyze()
    with CaptureQueriesContext(connections["default"]) as queries:
        response = superuser_client.get("/admin/testapp/author/")
    assert response.status_code == 200
    assert _count_queries(queries) == []
    page_sql = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('SELECT "testapp_author"')]
    assert page_sql and all("LIMIT 21" in sql.upper() for sql in page_sql), page_sql
    html = response.content.decode()
    assert "≈ 300 authors" in html
    assert html.count('class="action-checkbox"') == 20


@pytest.mark.postgres
def test_an_equality_filtered_changelist_runs_no_count(superuser_client):
    Author.objects.bulk_create(Author(name="same") for _ in range(200))
    _analyze()
    with CaptureQueriesContext(connections["default"]) as queries:
        response = superuser_client.get("/admin/testapp/author/?name=same")
    assert response.status_code == 200
    assert _count_queries(queries) == []


def test_a_small_changelist_counts_exactly_once(superuser_client):
    Author.objects.bulk_create(Author(name=f"writer {i}") for i in range(30))
    _analyze()
    with CaptureQueriesContext(connections["default"]) as queries:
        response = superuser_client.get("/admin/testapp/author/")
    assert response.status_code == 200
    [count] = _count_queries(queries)
    assert "LIMIT 51" in count.upper()
    assert "30 authors" in response.content.decode()


@pytest.mark.postgres
@pytest.mark.parametrize("reltuples", [-1, 0])
def test_a_wrong_estimate_never_drops_the_limit(superuser_client, reltuples):
    Author.objects.bulk_create(Author(name=f"writer {i}") for i in range(300))
    with connections["default"].cursor() as cursor:
        # What a never-analysed (-1) or freshly truncated (0) table's statistics say.
        cursor.execute(
            "UPDATE pg_class SET reltuples = %s, relpages = 0 WHERE oid = 'testapp_author'::regclass",
            [reltuples],
        )
    with CaptureQueriesContext(connections["default"]) as queries:
        response = superuser_client.get("/admin/testapp/author/")
    assert response.status_code == 200
    page_sql = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('SELECT "testapp_author"')]
    assert page_sql and all("LIMIT" in sql.upper() for sql in page_sql), page_sql
    assert response.content.decode().count('class="action-checkbox"') == 20


def test_following_next_in_the_admin_reaches_the_last_author(superuser_client):
    Author.objects.bulk_create(Author(name=f"writer {i:03}") for i in range(65))
    _analyze()
    seen = 0
    page = 1
    while True:
        html = superuser_client.get(f"/admin/testapp/author/?o=1&p={page}").content.decode()
        rows = html.count('class="action-checkbox"')
        assert rows > 0
        seen += rows
        # The link to the next page (it carries a keyset cursor too, which this walk, by
        # page numbers alone, leaves out to exercise the OFFSET path).
        if f"p={page + 1}" not in html:
            break
        page += 1
    assert seen == 65


# -- Filters and checks -----------------------------------------------------------------------


def _admin(**options):
    return _admin_for(Author, **options)


@contextmanager
def _changelist(model_admin, query: str = "") -> Iterator[tuple[Any, Any, CaptureQueriesContext]]:
    """A changelist of *model_admin* for the superuser, with the queries it runs captured."""
    from django.test import RequestFactory

    request = RequestFactory().get(f"/admin/{query}")
    request.user = User.objects.get(username="chief")
    with CaptureQueriesContext(connections["default"]) as queries:
        yield model_admin.get_changelist_instance(request), request, queries


def _ids(model_admin) -> list[str]:
    return [message.id for message in model_admin.check() if message.id.startswith("django_scale.")]


def test_w301_full_result_count():
    assert "django_scale.W301" in _ids(_admin(show_full_result_count=True))
    assert "django_scale.W301" not in _ids(_admin())


def test_w302_distinct_filters():
    from django.contrib.admin import AllValuesFieldListFilter

    assert "django_scale.W302" in _ids(_admin(list_filter=[("name", AllValuesFieldListFilter)]))
    assert "django_scale.W302" not in _ids(_admin(list_filter=["name"]))


@pytest.mark.postgres
def test_w303_substring_search_without_trigram_index():
    assert "django_scale.W303" in _ids(_admin(search_fields=["name"]))
    assert "django_scale.W303" in _ids(_admin(search_fields=["name__icontains"]))
    assert "django_scale.W303" not in _ids(_admin(search_fields=["^name"]))
    # "=name" is name__iexact, UPPER(name) = UPPER(...): no plain index serves it either.
    assert "django_scale.W303" in _ids(_admin(search_fields=["=name"]))


def test_w304_unindexed_sortable_columns():
    assert "django_scale.W304" in _ids(_admin(list_display=["id", "name"]))
    assert "django_scale.W304" not in _ids(_admin(list_display=["id", "name"], sortable_by=["id"]))


def test_plain_field_filter_takes_its_choices_without_a_full_distinct(superuser_client):
    Author.objects.bulk_create(Author(name=name) for name in ["Ada"] * 150 + ["Grace"] * 100 + ["Hedy"] * 50)
    _analyze()
    with _changelist(_admin(list_filter=["name"])) as (changelist, request, queries):
        [name_filter] = changelist.get_filters(request)[0]
        shown = [choice["display"] for choice in name_filter.choices(changelist)]
    assert shown == ["All", "Ada", "Grace", "Hedy"]
    distinct = [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]
    if connections["default"].vendor == "postgresql":
        assert distinct == []  # from pg_stats
    else:
        assert distinct and all("LIMIT" in sql.upper() for sql in distinct)


@pytest.mark.postgres
def test_a_search_count_out_of_time_under_atomic_requests_falls_back(superuser_client, monkeypatch):
    from testapp.admin import SmallThresholdPaginator

    Author.objects.bulk_create(Author(name=f"needle {i}") for i in range(20_000))
    _analyze()
    connection = connections["default"]
    # A budget no count of 20,000 rows meets, and a request wrapped in a transaction.
    monkeypatch.setattr(SmallThresholdPaginator, "count_budget", 0.0005)
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '7s'")
    with CaptureQueriesContext(connection) as queries:
        response = superuser_client.get("/admin/testapp/author/?q=eedl")
    assert response.status_code == 200
    html = response.content.decode()
    assert "≈" in html  # the estimate, because the count ran out of time
    assert html.count('class="action-checkbox"') == 20
    # The capped count ran in a savepoint of its own, so the request's transaction survived it.
    assert any(q["sql"].startswith("SAVEPOINT") for q in queries.captured_queries)
    with connection.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == "7s"
        cursor.execute("RESET statement_timeout")


def test_filter_choices_of_a_column_without_common_values_fall_back_to_a_bounded_distinct(db):
    from django_scale.admin import distinct_values

    Author.objects.bulk_create(Author(name=f"unique {i:04}") for i in range(400))
    _analyze()  # every name differs: the statistics keep no most common values
    with CaptureQueriesContext(connections["default"]) as queries:
        values = distinct_values(Author.objects.all(), "name", limit=100)
    assert values == [f"unique {i:04}" for i in range(100)]
    distinct = [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]
    assert distinct and all("LIMIT 100" in sql.upper() for sql in distinct)


def test_date_hierarchy_lists_periods_by_probes_not_a_distinct_scan(superuser_client):
    import datetime as dt

    from django_scale.admin.date_hierarchy import date_hierarchy

    author = Author.objects.create(name="Chronicler")
    moments = [
        dt.datetime(2024, 3, 5, 10, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 3, 9, 23, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 7, 1, 12, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 1, 2, 3, tzinfo=dt.timezone.utc),
    ]
    Article.objects.bulk_create(
        Article(author=author, title=f"t{n}", published=m) for n, m in enumerate(moments)
    )
    from django_scale.paginator import ApproxCountPaginator

    class TinyThresholdPaginator(ApproxCountPaginator):
        count_threshold = 2  # more than two rows is "many": the probing path

    model_admin = _admin_for(
        Article,
        date_hierarchy="published",
        list_display=["title"],
        paginator=TinyThresholdPaginator,
        list_per_page=2,
    )

    def hierarchy(query: str) -> tuple[list[str], list[str]]:
        with _changelist(model_admin, query) as (changelist, _, queries):
            titles = [choice["title"] for choice in date_hierarchy(changelist)["choices"]]
        bounds.append(sum("MIN(" in q["sql"].upper() for q in queries.captured_queries))
        return titles, [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]

    bounds: list[int] = []
    years, distinct = hierarchy("")
    assert (years, distinct) == (["2024", "2026"], [])
    assert bounds == [1]  # the tag's own first/last query, reused by the probes
    months, distinct = hierarchy("?published__year=2024")
    assert (months, distinct) == (["March 2024", "July 2024"], [])
    days, distinct = hierarchy("?published__year=2024&published__month=3")
    assert (days, distinct) == (["March 5", "March 9"], [])
    # The same answer as Django's own DISTINCT.
    expected = [d.year for d in Article.objects.datetimes("published", "year")]
    assert [int(year) for year in years] == expected


def test_date_hierarchy_of_few_rows_reads_their_dates_instead_of_min_max(superuser_client):
    import datetime as dt

    from django_scale.admin.date_hierarchy import date_hierarchy

    author = Author.objects.create(name="Chronicler")
    moments = [
        dt.datetime(2024, 3, 5, 10, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 1, 2, 3, tzinfo=dt.timezone.utc),
    ]
    Article.objects.bulk_create(
        Article(author=author, title=f"zebra {n}", published=m) for n, m in enumerate(moments)
    )
    Article.objects.bulk_create(
        Article(author=author, title=f"other {n}", published=moments[0]) for n in range(5)
    )
    model_admin = _admin_for(
        Article, date_hierarchy="published", list_display=["title"], search_fields=["title"]
    )
    # A search for a rare word on a big table: MIN(published) WHERE title LIKE '%zebra%' walks
    # the published index until a row matches, which for a rare word is the whole table.
    with _changelist(model_admin, "?q=zebra") as (changelist, _, queries):
        titles = [choice["title"] for choice in date_hierarchy(changelist)["choices"]]
    assert titles == ["2024", "2026"]
    sql = [q["sql"].upper() for q in queries.captured_queries]
    assert not any("MIN(" in q or "EXISTS" in q or "SELECT 1 AS" in q for q in sql), sql


def _admin_for(model, **options):
    from django.contrib import admin as django_admin

    from django_scale.admin import ScaleModelAdmin

    return type(f"Probe{model.__name__}Admin", (ScaleModelAdmin,), options)(model, django_admin.site)


def test_a_search_whose_first_page_is_the_last_counts_nothing(superuser_client):
    Author.objects.bulk_create(Author(name=f"writer {i}") for i in range(300))
    Author.objects.bulk_create(Author(name=f"zebra {i}") for i in range(7))
    _analyze()
    with CaptureQueriesContext(connections["default"]) as queries:
        response = superuser_client.get("/admin/testapp/author/?q=zebra")
    assert response.status_code == 200
    assert _count_queries(queries) == []
    html = response.content.decode()
    assert html.count('class="action-checkbox"') == 7
    assert "7 results" in html


def test_a_relation_filter_lists_at_most_a_hundred_rows_and_keeps_the_chosen_one(superuser_client):

    authors = Author.objects.bulk_create(Author(name=f"writer {i:03}") for i in range(250))
    chosen = authors[-1]
    model_admin = _admin_for(Article, list_filter=["author"], list_display=["id"])

    def shown(query: str) -> tuple[list[str], list[str]]:
        with _changelist(model_admin, query) as (changelist, request, queries):
            [author_filter] = changelist.get_filters(request)[0]
            labels = [choice["display"] for choice in author_filter.choices(changelist)]
        author_sql = [
            q["sql"] for q in queries.captured_queries if q["sql"].startswith('SELECT "testapp_author"')
        ]
        return labels, author_sql

    labels, author_sql = shown("")
    assert labels[0] == "All" and len(labels) == 101
    assert author_sql and all("LIMIT 100" in sql.upper() for sql in author_sql)
    labels, _ = shown(f"?author__id__exact={chosen.pk}")
    assert "writer 249" in labels


def test_next_links_carry_a_keyset_cursor_and_deep_pages_need_no_offset(superuser_client):
    import re

    Author.objects.bulk_create(Author(name=f"writer {i:03}") for i in range(65))
    _analyze()
    seen: list[str] = []
    url = "/admin/testapp/author/"
    offsets = []
    while url:
        with CaptureQueriesContext(connections["default"]) as queries:
            html = superuser_client.get(url).content.decode()
        page_sql = [
            q["sql"] for q in queries.captured_queries if q["sql"].startswith('SELECT "testapp_author"')
        ]
        offsets += [sql for sql in page_sql if "OFFSET" in sql.upper()]
        seen += re.findall(r'<a href="/admin/testapp/author/\d+/change/[^"]*">(writer \d+)</a>', html)
        # A search from this page starts afresh: the form carries no cursor.
        assert 'name="_after"' not in html
        following = re.search(r'href="(\?[^"]*_after=[^"]*)"', html)
        url = "/admin/testapp/author/" + following.group(1).replace("&amp;", "&") if following else ""
    assert sorted(seen) == [f"writer {i:03}" for i in range(65)]
    assert offsets == []  # every page after the first was read with WHERE id < last, no OFFSET


def test_a_forged_or_stale_cursor_falls_back_to_the_offset(superuser_client):
    import re

    Author.objects.bulk_create(Author(name=f"writer {i:03}") for i in range(45))
    _analyze()
    html = superuser_client.get("/admin/testapp/author/").content.decode()
    cursor = re.search(r"_after=([^&\"]+)", html).group(1)
    for query in (f"?p=2&_after={cursor}x", f"?p=3&_after={cursor}", f"?p=2&q=writer&_after={cursor}"):
        response = superuser_client.get("/admin/testapp/author/" + query)
        assert response.status_code == 200, query
        assert response.content.decode().count('class="action-checkbox"') > 0, query


@pytest.mark.parametrize(("ordering", "expect"), [(["-name"], ") < ("), (["name"], " OR ")])
def test_keyset_pages_equal_offset_pages_for_any_ordering(superuser_client, ordering, expect):

    # Duplicated names: the primary key the admin adds must break the ties.
    Author.objects.bulk_create(Author(name=f"writer {i % 23:02}") for i in range(70))
    model_admin = _admin_for(Author, ordering=ordering, list_per_page=20)

    def page(query: str):
        with _changelist(model_admin, query) as (changelist, _, queries):
            pass
        return changelist, [q["sql"] for q in queries.captured_queries]

    first, _ = page("")
    cursor = first._next_cursor
    assert cursor
    for number in (2, 3, 4):
        by_offset, _ = page(f"?p={number}")
        by_keyset, sql = page(f"?p={number}&_after={cursor}")
        assert [a.pk for a in by_keyset.result_list] == [a.pk for a in by_offset.result_list]
        assert any(expect in q for q in sql if q.startswith('SELECT "testapp_author"')), sql
        cursor = by_keyset._next_cursor
    assert cursor is None  # page 4 is the last


def _show_timeout(alias: str) -> str:
    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        return str(cursor.fetchone()[0])


def test_every_query_of_an_admin_page_runs_under_its_statement_timeout(superuser_client, monkeypatch):
    from testapp.admin import AuthorAdmin

    Author.objects.create(name="someone")
    seen: list[tuple[str, str | None]] = []

    def search(self, request, queryset, term):
        from django_scale.timeouts import current_statement_timeout

        alias = queryset.db
        shown = _show_timeout(alias) if connections[alias].vendor == "postgresql" else None
        seen.append((str(current_statement_timeout(alias)), shown))
        return queryset, False

    monkeypatch.setattr(AuthorAdmin, "statement_timeout", 2.5)
    monkeypatch.setattr(AuthorAdmin, "get_search_results", search)
    assert superuser_client.get("/admin/testapp/author/?q=some").status_code == 200
    postgres = connections["default"].vendor == "postgresql"
    assert seen and all(limit == "2.5" for limit, _ in seen)
    assert all(shown == ("2500ms" if postgres else None) for _, shown in seen)
    monkeypatch.setattr(AuthorAdmin, "statement_timeout", None)
    seen.clear()
    assert superuser_client.get("/admin/testapp/author/?q=some").status_code == 200
    assert seen and all(limit == "None" for limit, _ in seen)


@pytest.mark.postgres
def test_a_page_out_of_time_under_atomic_requests_shows_a_message_and_the_request_succeeds(
    superuser_client, monkeypatch
):
    from testapp.admin import AuthorAdmin

    Author.objects.bulk_create(Author(name=f"author {i}") for i in range(30))
    connection = connections["default"]
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    monkeypatch.setattr(AuthorAdmin, "statement_timeout", 0.1)

    def slow_search(self, request, queryset, term):
        # One sleep per statement (an InitPlan): every query of the list runs out of time.
        return queryset.extra(where=["(SELECT pg_sleep(1)::text) = ''"]), False

    monkeypatch.setattr(AuthorAdmin, "get_search_results", slow_search)
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '7s'")
    response = superuser_client.get("/admin/testapp/author/?q=author")
    assert response.status_code == 200
    html = response.content.decode()
    assert "took longer than 0.1 seconds and was stopped" in html
    assert 'class="action-checkbox"' not in html
    # The rest of the request's transaction was usable: the page rendered the user's name
    # from the session, and the session is still there.
    assert superuser_client.get("/admin/testapp/author/").status_code == 200
    assert _show_timeout("default") == "7s"
    with connection.cursor() as cursor:
        cursor.execute("RESET statement_timeout")


@pytest.mark.postgres  # W303 is checked only when a database is PostgreSQL
def test_w303_is_quiet_for_a_trigram_index_of_the_searched_expression():
    from django.contrib.postgres.indexes import GinIndex, OpClass
    from django.db.models.functions import Upper

    from django_scale.indexes import TrigramIndex

    assert "django_scale.W303" not in _ids(_admin_for(Article, search_fields=["title", "=title"]))
    # A trigram index of the plain column serves contains and regex, but not icontains,
    # which PostgreSQL runs as UPPER(column) LIKE UPPER(...).
    plain = GinIndex(fields=["name"], opclasses=["gin_trgm_ops"], name="plain_trgm")
    upper = GinIndex(OpClass(Upper("name"), name="gin_trgm_ops"), name="upper_trgm")
    indexes = Author._meta.indexes
    try:
        Author._meta.indexes = [plain]
        assert "django_scale.W303" in _ids(_admin(search_fields=["name"]))
        assert "django_scale.W303" not in _ids(_admin(search_fields=["name__contains"]))
        Author._meta.indexes = [upper]
        assert "django_scale.W303" not in _ids(_admin(search_fields=["name"]))
    finally:
        Author._meta.indexes = indexes
    with pytest.raises(ValueError, match="list of field names"):
        TrigramIndex(fields="title", name="x")


@pytest.mark.postgres
def test_the_trigram_index_serves_the_admins_icontains_search(db):
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'testapp_article_title_trgm'")
        assert "gin_trgm_ops" in cursor.fetchone()[0]
        sql, params = Article.objects.filter(title__icontains="needle").values("pk").query.sql_with_params()
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "testapp_article_title_trgm" in plan


def _page_queries(client: Client, url: str) -> tuple[str, list[str], Any]:
    with CaptureQueriesContext(connections["default"]) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return response.content.decode(), [q["sql"].upper() for q in queries.captured_queries], response


@pytest.mark.urls("testapp.owned_admin")
@pytest.mark.parametrize(
    ("query", "rows", "choices", "expected"),
    [
        # Many rows: MIN/MAX once, then one EXISTS per year between them.
        ("", 60, ["2024", "2026"], {"min": 1, "exists": 3, "distinct": 0}),
        # Many rows in one year: the same bounds open that year's months.
        ("?published__year=2024", 60, ["March 2024", "July 2024"], {"min": 1, "exists": 5, "distinct": 0}),
        # Few rows (an exact count under the threshold): their dates are read, nothing probed.
        ("", 10, ["2024", "2026"], {"min": 0, "exists": 0, "distinct": 0}),
    ],
)
def test_the_changelist_page_renders_its_date_hierarchy_by_probes(
    superuser_client, query, rows, choices, expected
):
    author = Author.objects.create(name="Chronicler")
    moments = [
        datetime.datetime(2024, 3, 5, 10, tzinfo=datetime.timezone.utc),
        datetime.datetime(2024, 7, 1, 12, tzinfo=datetime.timezone.utc),
        datetime.datetime(2026, 1, 2, 3, tzinfo=datetime.timezone.utc),
    ]
    Article.objects.bulk_create(
        Article(author=author, title=f"t{n}", published=moments[n % (2 if query else 3)]) for n in range(rows)
    )
    _analyze()
    html, sql, response = _page_queries(superuser_client, f"/whole/testapp/article/{query}")
    # The page is rendered by our changelist template, which extends Django's.
    names = [template.name for template in response.templates]
    assert names[:2] == ["django_scale/admin/change_list.html", "admin/change_list.html"], names
    assert "admin/date_hierarchy.html" in names
    nav = html[html.index('class="toplinks"') : html.index("</nav>", html.index('class="toplinks"'))]
    assert [title.strip() for title in re.findall(r'<a href="[^"]*">([^<]+)</a>', nav)] == choices
    counted = {
        "min": sum("MIN(" in q for q in sql),
        "exists": sum("LIMIT 1" in q and '"PUBLISHED" >=' in q for q in sql),
        "distinct": sum("DISTINCT" in q and "PUBLISHED" in q for q in sql),
    }
    assert counted == expected, sql
