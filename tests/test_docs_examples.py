"""Each docs page's marked example runs, as written, against the docs' news site (tests/news).

A page marks a copy-paste example with a MyST comment on the line above its fence, which
Sphinx renders as nothing::

    % example: <name>
    ```python
    ...
    ```

Code examples run with the names the page's prose assumes (``name``, ``section``, ...) given
by the test, which then asserts what the example did: rows, values, query counts, which alias
served a read. A settings example runs on top of a project that does not use django-scale yet
(the suite's settings without django-scale's entries), and django-scale's system checks must
find nothing in the result. Every marked example has a test here, and every feature page has
a marked example.
"""

from __future__ import annotations

import csv
import datetime
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.admin import AdminSite
from django.contrib.auth.models import User
from django.db import connections
from django.test import Client, RequestFactory, override_settings
from django.test.utils import CaptureQueriesContext

from django_scale import metrics
from django_scale.checks import check_ops, check_routing, check_settings
from django_scale.contrib.backfill.runner import run_backfill
from django_scale.exceptions import NPlusOneError
from django_scale.paginator import ApproxCountPaginator
from django_scale.replicas import routing_state, use_primary
from django_scale.testing import capture_reads, override_scale_settings

from news.models import Article, Author, Comment, Section, Tag

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: A marked example: the marker line, then a fenced Python block.
MARKED = re.compile(r"^% example: (?P<name>[\w-]+)\n```python\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)
#: The pages a newcomer reads in order after installing, each with at least one tested example.
FEATURE_PAGES = ["quickstart", "routing", "admin", "querysets", "caching", "querycache", "ops"]
IN_2024 = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)


def marked_examples() -> dict[tuple[str, str], str]:
    """Return every marked example of the docs, by (page, name)."""
    found: dict[tuple[str, str], str] = {}
    for page in sorted(DOCS.glob("*.md")):
        for match in MARKED.finditer(page.read_text(encoding="utf-8")):
            key = (page.stem, match["name"])
            assert key not in found, f"two examples named {key}"
            found[key] = match["code"]
    return found


def run_example(page: str, example: str, /, **given: Any) -> dict[str, Any]:
    """Run the example *example* of *page* with the names in *given*; return its namespace."""
    code = marked_examples()[(page, example)]
    namespace: dict[str, Any] = {"__name__": f"docs_examples.{page}", **given}
    exec(compile(code, f"docs/{page}.md (example {example})", "exec"), namespace)  # noqa: S102
    return namespace


def project_settings() -> dict[str, Any]:
    """Return the settings of a project before django-scale: the suite's, without its parts."""
    return {
        "INSTALLED_APPS": [app for app in settings.INSTALLED_APPS if not app.startswith("django_scale")],
        "MIDDLEWARE": [entry for entry in settings.MIDDLEWARE if not entry.startswith("django_scale.")],
        "DATABASE_ROUTERS": [],
        "DATABASES": settings.DATABASES,
        "CACHES": settings.CACHES,
    }


def settings_problems(page: str, example: str, before: dict[str, Any]) -> list[str]:
    """Apply a settings example to the settings *before*; return what the checks report."""
    namespace = run_example(page, example, **before)
    # The settings the example set or changed. INSTALLED_APPS is checked by the caller: the
    # suite lists django_scale already, and overriding it would only reload the apps.
    changed = {
        key: value
        for key, value in namespace.items()
        if key.isupper() and key != "INSTALLED_APPS" and (key not in before or value != before[key])
    }
    changed.setdefault("DJANGO_SCALE", {})
    with override_settings(**changed):
        messages = [*check_settings(), *check_routing(), *check_ops()]
    return [f"{message.id}: {message.msg}" for message in messages]


# Every example marked in the docs, and the test that runs it.
TESTED = {
    ("quickstart", "settings"),
    ("routing", "use-primary"),
    ("routing", "routing-state"),
    ("routing", "mark-write"),
    ("admin", "use-it"),
    ("admin", "paginator"),
    ("querysets", "list-page"),
    ("querysets", "forbid-n-plus-one"),
    ("caching", "use-it"),
    ("querycache", "use-it"),
    ("ops", "sniper-settings"),
    ("ops", "bulk"),
    ("ops", "backfill"),
}


def test_every_marked_example_is_tested():
    assert set(marked_examples()) == TESTED


@pytest.mark.parametrize("page", FEATURE_PAGES)
def test_every_feature_page_has_a_tested_example(page):
    assert any(marked_page == page for marked_page, _ in TESTED)


def test_every_marker_marks_a_python_block():
    # A marker is a MyST comment (rendered as nothing) only when "%" starts the line, and it
    # marks the fence right below it: a marker anywhere else would leave an example untested.
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        markers = re.findall(r"^.*% example:.*$", text, re.MULTILINE)
        assert len(markers) == len(MARKED.findall(text)), f"{page.name}: {markers}"


# -- Settings examples: django-scale's system checks find nothing -------------------------------


def test_quickstart_settings_pass_the_checks():
    before = project_settings()
    assert settings_problems("quickstart", "settings", before) == []
    assert "django_scale" in run_example("quickstart", "settings", **project_settings())["INSTALLED_APPS"]


def test_the_settings_check_catches_a_missing_middleware():
    # The check above is not vacuous: the router without the middleware is W102.
    namespace = run_example("quickstart", "settings", **project_settings())
    with override_settings(
        MIDDLEWARE=namespace["MIDDLEWARE"][1:], DATABASE_ROUTERS=namespace["DATABASE_ROUTERS"]
    ):
        assert [message.id for message in check_routing()] == ["django_scale.W102"]


def test_ops_sniper_settings_pass_the_checks():
    # The example mails ADMINS, so it sets them (without, W503).
    before = {"INSTALLED_APPS": list(settings.INSTALLED_APPS), "DJANGO_SCALE": {}}
    assert settings_problems("ops", "sniper-settings", before) == []


# -- Code examples, against the news site -------------------------------------------------------


#: The replica aliases of the suite: none on SQLite, the real standby on PostgreSQL.
REPLICAS = list(settings.DJANGO_SCALE.get("REPLICAS", []))
#: Routing examples run on committed rows, outside any transaction: inside one, every read is
#: on the primary whatever the example does.
COMMITTED = pytest.mark.django_db(transaction=True, databases=["default", *REPLICAS])


@contextmanager
def queries_per_alias() -> Iterator[dict[str, CaptureQueriesContext]]:
    """Capture the queries of the primary and of each replica, by alias."""
    with ExitStack() as stack:
        yield {
            alias: stack.enter_context(CaptureQueriesContext(connections[alias]))
            for alias in ["default", *REPLICAS]
        }


@COMMITTED
def test_routing_use_primary_reads_on_the_primary():
    User.objects.create_user("ada")
    with queries_per_alias() as queries, capture_reads() as reads:
        namespace = run_example("routing", "use-primary", User=User, name="ada")
    assert namespace["taken"] is True
    assert ["auth_user" in query["sql"] for query in queries["default"].captured_queries] == [True]
    assert all(not queries[alias].captured_queries for alias in REPLICAS)
    if REPLICAS:  # the router counts its decisions when it has replicas to choose from
        assert reads == {"default": 1}
    assert callable(namespace["monthly_report"]) and callable(namespace["confirm"])


@COMMITTED
def test_routing_state_reads_its_own_write():
    with queries_per_alias() as queries:
        namespace = run_example("routing", "routing-state", Article=Article)
    state = namespace["state"]
    assert state.wrote
    with use_primary():  # a replica may not have replayed the insert yet
        assert Article.objects.filter(title="Breaking").count() == 1
    # The insert and the count after it both ran on the primary; no replica saw a query.
    sql = [query["sql"] for query in queries["default"].captured_queries]
    assert [statement.split()[0] for statement in sql] == ["INSERT", "SELECT"]
    assert "COUNT(" in sql[1].upper()
    assert all(not queries[alias].captured_queries for alias in REPLICAS)
    if REPLICAS:
        assert state.pinned and state.reads == Counter({"default": 1})


@COMMITTED
def test_routing_mark_write_pins_the_reads_after_raw_sql():
    article = Article.objects.create(title="Counted")
    with routing_state() as state:
        run_example("routing", "mark-write", pk=article.pk)
        assert state.wrote
        with queries_per_alias() as queries:
            assert Article.objects.get(pk=article.pk).views == 1
    assert len(queries["default"].captured_queries) == 1
    assert all(not queries[alias].captured_queries for alias in REPLICAS)


@pytest.fixture
def admin_request(db) -> Any:
    request = RequestFactory().get("/admin/news/article/")
    request.user = User.objects.create_superuser("chief", "chief@example.com", "pw")
    return request


def test_admin_example_serves_a_changelist(admin_request):
    from django.contrib import admin

    section = Section.objects.create(name="News")
    Article.objects.bulk_create(Article(title=f"Story {i}", section=section) for i in range(3))
    namespace = run_example("admin", "use-it")
    try:
        assert admin.site.is_registered(Article)
        changelist = namespace["ArticleAdmin"](Article, admin.site).get_changelist_instance(admin_request)
        assert isinstance(changelist.paginator, ApproxCountPaginator)
        assert changelist.result_count == 3 and changelist.result_count.is_exact
        assert sorted(article.title for article in changelist.result_list) == [
            "Story 0",
            "Story 1",
            "Story 2",
        ]
    finally:
        admin.site.unregister(Article)


def test_admin_paginator_example_tunes_the_counts(admin_request):
    Article.objects.bulk_create(Article(title=f"Story {i}") for i in range(3))
    namespace = run_example("admin", "paginator")
    changelist = namespace["EventAdmin"](Article, AdminSite()).get_changelist_instance(admin_request)
    assert type(changelist.paginator) is namespace["EventPaginator"]
    assert (changelist.paginator.count_threshold, changelist.paginator.count_budget) == (1_000, 0.05)
    assert changelist.result_count == 3


def make_news(articles: int = 20) -> Section:
    """Make a section of *articles* articles, each with an author, 1-3 tags and 0-3 comments."""
    section = Section.objects.create(name="News")
    tags = [Tag.objects.create(slug=f"t{i}", name=f"Tag {i}") for i in range(3)]
    for i in range(articles):
        author = Author.objects.create(name=f"A{i}")
        article = Article.objects.create(title=f"Story {i}", section=section, author=author)
        article.tags.set(tags[: i % 3 + 1])
        Comment.objects.bulk_create(Comment(article=article, author_name="r", body="b") for _ in range(i % 4))
    return section


@pytest.mark.django_db
def test_querysets_list_page_takes_four_queries():
    section = make_news()
    with CaptureQueriesContext(connections["default"]) as queries:
        namespace = run_example("querysets", "list-page", Article=Article, section=section)
    # The articles, their authors, their tags, one grouped COUNT of comments: 4, not 1 + 3 * 20.
    assert len(queries) == 4, [query["sql"] for query in queries.captured_queries]
    assert len(namespace["articles"]) == 20


@pytest.mark.django_db
def test_querysets_forbid_n_plus_one_passes_the_list_page():
    make_news()
    namespace = run_example("querysets", "forbid-n-plus-one")
    with (
        override_settings(ROOT_URLCONF="news.urls"),
        CaptureQueriesContext(connections["default"]) as queries,
    ):
        namespace["test_article_list"](Client())
    assert len(queries) == 4, [query["sql"] for query in queries.captured_queries]


@pytest.mark.django_db
def test_querysets_forbid_n_plus_one_fails_a_page_loading_row_by_row():
    make_news()
    namespace = run_example("querysets", "forbid-n-plus-one")
    with override_settings(ROOT_URLCONF="news.urls_one_by_one"), pytest.raises(NPlusOneError):
        namespace["test_article_list"](Client())


@pytest.mark.django_db
def test_caching_example_caches_and_refreshes():
    from django_scale.cache import reset_state

    reset_state()
    metrics.reset()
    namespace = run_example("caching", "use-it")
    leaderboard = namespace["leaderboard"]
    ran = metrics.snapshot()
    # The first call computed (a miss); refresh() computed and stored again.
    assert ran.get("swr.miss") == 1 and not ran.get("swr.hit")
    assert "leaderboard" in leaderboard.key("eu")
    leaderboard("eu")
    assert metrics.snapshot().get("swr.hit") == 1
    leaderboard.invalidate("eu")
    leaderboard("eu")
    assert metrics.snapshot().get("swr.miss") == 2


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_querycache_example_hits_then_sees_the_write(redis_cache):
    from django_scale.cache import reset_state
    from django_scale.replicas import use_primary

    reset_state()
    metrics.reset()
    Section.objects.create(name="Sport")
    with override_scale_settings(QUERY_CACHE=True), use_primary():
        namespace = run_example("querycache", "use-it")
    assert namespace["sections"] == ["Sports"]
    ran = metrics.snapshot()
    assert (ran.get("querycache.miss"), ran.get("querycache.hit")) == (2, 1)


@pytest.mark.django_db
def test_ops_bulk_example_loads_upserts_updates_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = Article.objects.create(title="One"), Article.objects.create(title="Two")
    Tag.objects.create(slug="django", name="Old name")
    first.views, second.views = 10, 20
    given = {
        "Article": Article,
        "Comment": Comment,
        "Tag": Tag,
        "comments": [Comment(article=first, author_name="ann", body="first!", created_at=IN_2024)],
        "rows": [(second.pk, "bob", "second"), (second.pk, "cy", "third")],
        "now": IN_2024,
        "tags": [("django", "Django"), ("python", "Python")],
        "articles": [first, second],
    }
    run_example("ops", "bulk", **given)
    assert sorted(Comment.objects.values_list("author_name", "body")) == [
        ("ann", "first!"),
        ("bob", "second"),
        ("cy", "third"),
    ]
    assert dict(Article.objects.values_list("title", "views")) == {"One": 10, "Two": 20}
    assert dict(Tag.objects.values_list("slug", "name")) == {"django": "Django", "python": "Python"}
    with open(tmp_path / "comments.csv", newline="") as file:
        exported = list(csv.reader(file))
    assert exported[0] == ["id", "body"]
    assert sorted(body for _, body in exported[1:]) == ["first!", "second", "third"]


@pytest.mark.django_db
def test_ops_backfill_example_fills_every_row_once():
    Article.objects.bulk_create(Article(title=f"Story {i}", body="word " * i) for i in range(2_500))
    Article.objects.create(title="Counted already", body="one two", word_count=99)
    backfill = run_example("ops", "backfill")["FillWordCounts"]()
    checkpoint = run_backfill(backfill)
    # 2,500 rows in batches of 1,000; the row counted already is not in the queryset.
    assert (checkpoint.rows_done, checkpoint.batches_done) == (2_500, 3)
    assert checkpoint.finished_at is not None
    assert not Article.objects.filter(word_count__isnull=True).exists()
    assert Article.objects.get(title="Story 7").word_count == 7
    assert Article.objects.get(title="Counted already").word_count == 99


def test_readme_links_every_page():
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    # The index is docs/ itself; the changelog page includes CHANGELOG.md, which README links.
    pages = [page.name for page in sorted(DOCS.glob("*.md")) if page.stem not in {"index", "changelog"}]
    assert [page for page in pages if f"(docs/{page})" not in readme] == []
    assert "(CHANGELOG.md)" in readme
