"""``bench admin``: changelist latency of stock ``ModelAdmin`` and ``ScaleModelAdmin`` by table size.

Both admins have the example project's ``ArticleAdmin`` options (filters, search, date
hierarchy, ``list_select_related``) and are served side by side from two admin sites, on the
same rows, through Django's test client. Rows are generated in the database with
``generate_series`` and analysed, as a production table would be.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any, TextIO

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import override_settings
from django.urls import path

from benchmarks import print_table, wait_for_replicas
from news.admin import ArticleAdmin
from news.models import Article, Author, Section

stock_site = admin.AdminSite(name="bench_stock")
scale_site = admin.AdminSite(name="bench_scale")


class StockArticleAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Django's ModelAdmin with the example's ArticleAdmin options."""

    list_display = ArticleAdmin.list_display
    list_filter = ArticleAdmin.list_filter
    list_select_related = ArticleAdmin.list_select_related
    search_fields = ArticleAdmin.search_fields
    date_hierarchy = ArticleAdmin.date_hierarchy


class BenchScaleArticleAdmin(ArticleAdmin):
    autocomplete_fields: list[str] = []  # the related admins are not on this site


stock_site.register(Article, StockArticleAdmin)
scale_site.register(Article, BenchScaleArticleAdmin)
urlpatterns = [path("stock/", stock_site.urls), path("scale/", scale_site.urls)]

SCENARIOS = {
    "unfiltered": "",
    "filtered (status)": "?status__exact=published",
    "filtered (section)": "?section__id__exact={section}",
    "searched (rare word)": "?q=zebra",
    "deep page (half way)": "?p={middle}",
    # What a user clicking "next" gets: django-scale's link carries a keyset cursor.
    "deep page via next link": "",
    "date hierarchy (year)": "?published_at__year={year}",
}


def fill(rows: int) -> None:
    """Make the article table hold exactly *rows* generated rows, then ANALYZE it."""
    section = Section.objects.using("default").get_or_create(slug="bench", defaults={"name": "Bench"})[0]
    author = Author.objects.using("default").get_or_create(name="Bench author")[0]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM news_article WHERE slug LIKE 'bench-admin-%%'")
        have = cursor.fetchone()[0]
        if have < rows:
            cursor.execute(
                """
                INSERT INTO news_article (section_id, author_id, title, slug, body, published_at, status, views)
                SELECT %s, %s, 'Article ' || n || ' ' || md5(n::text), 'bench-admin-' || n, '',
                       now() - (n %% 1000) * interval '1 day', CASE WHEN n %% 10 = 0 THEN 'draft' ELSE 'published' END, 0
                  FROM generate_series(%s, %s) AS n
                """,
                [section.pk, author.pk, have + 1, rows],
            )
        cursor.execute("ANALYZE news_article")
    # The admin pages read from the replicas: wait until they have the rows and statistics.
    wait_for_replicas("the generated rows", 120)


def next_link(client: Client, name: str, page: int) -> str:
    """The changelist's own link from page *page* - 1 to *page* (with its cursor, if any)."""
    # Reaching page - 1 takes an OFFSET that may outlast the admin's statement timeout on a
    # big table; the hop measured is the next one.
    limit = BenchScaleArticleAdmin.statement_timeout
    BenchScaleArticleAdmin.statement_timeout = None
    try:
        html = client.get(f"/{name}/news/article/?p={page - 1}").content.decode()
    finally:
        BenchScaleArticleAdmin.statement_timeout = limit
    found = re.search(rf'href="(\?[^"]*\bp={page}\b[^"]*)"', html)
    assert found, f"no link to page {page} on the {name} changelist"
    return f"/{name}/news/article/" + found.group(1).replace("&amp;", "&")


#: What ScaleModelAdmin shows when a list ran out of its statement timeout.
STOPPED = "took longer than"


def timed(client: Client, url: str, repeats: int) -> float:
    """The median seconds of *repeats* GETs of *url*; negative if the list was stopped."""
    samples = []
    stopped = False
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.get(url)
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, response.status_code)
        stopped = stopped or STOPPED in response.content.decode()
    return -statistics.median(samples) if stopped else statistics.median(samples)


def run(out: TextIO, quick: bool = False, sizes: list[int] | None = None) -> None:
    if connection.vendor != "postgresql":
        out.write("bench admin needs PostgreSQL: set DATABASE_URL or DJANGO_SCALE_EXAMPLE_HARNESS=1.\n")
        raise SystemExit(2)
    sizes = sizes or ([20_000, 100_000] if quick else [100_000, 1_000_000])
    user = get_user_model().objects.filter(
        is_superuser=True
    ).first() or get_user_model().objects.create_superuser("bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(user)
    results: dict[tuple[str, str], dict[int, float]] = {}
    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], DEBUG=False):
        for rows in sizes:
            fill(rows)
            out.write(f"  {rows:,} rows ready\n")
            section = Section.objects.using("default").get(slug="bench").pk
            year = (
                Article.objects.order_by("-published_at").values_list("published_at", flat=True).first().year
            )  # type: ignore[union-attr]
            for scenario, query in SCENARIOS.items():
                for name in ("stock", "scale"):
                    if scenario == "deep page via next link":
                        url = next_link(client, name, rows // 100 // 2)
                        results.setdefault((scenario, name), {})[rows] = timed(client, url, 3)
                        continue
                    url = f"/{name}/news/article/" + query.format(
                        section=section, year=year, middle=rows // 100 // 2
                    )
                    client.get(url)  # warm caches
                    results.setdefault((scenario, name), {})[rows] = timed(
                        client, url, 1 if rows >= 1_000_000 and name == "stock" else 3
                    )
    header = [
        "scenario",
        "admin",
        *(f"{rows:,} rows (ms)" for rows in sizes),
        f"t({sizes[-1]:,})/t({sizes[0]:,})",
    ]
    table: list[list[Any]] = []
    for scenario in SCENARIOS:
        for name, label in (("stock", "stock ModelAdmin"), ("scale", "ScaleModelAdmin")):
            timings = results[(scenario, name)]
            table.append(
                [
                    scenario,
                    label,
                    *(
                        f"{timings[rows] * 1000:.0f}"
                        if timings[rows] > 0
                        else f"stopped ({-timings[rows] * 1000:.0f})"
                        for rows in sizes
                    ),
                    f"{abs(timings[sizes[-1]]) / abs(timings[sizes[0]]):.1f}x",
                ]
            )
    print_table(out, "Changelist latency (median of 3; 1 run for stock at 1M rows and more)", header, table)
    out.write(
        "  stopped (t): ScaleModelAdmin's statement timeout cancelled the list's query and the page\n"
        "  showed a message instead of the rows, after t ms.\n"
    )
