"""``bench prefetch``: a list page of articles (author, 3 tags, comment count) six ways.

Side by side on the same rows: Django loading lazily (naive), ``select_related``, the
hand-written optimum (``select_related`` + ``prefetch_related`` + a ``Count`` annotation),
Django 6.1's ``fetch_mode(FETCH_PEERS)`` where installed, django-auto-prefetch (a copy of the
tables on its model base class) and django-scale's prefetch-aware ``Article.objects``, which
has no hand-written lookups. Reads run on the primary.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any, TextIO

import django
from django.db import connection, models
from django.db.models import Count
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from django_scale.replicas import use_primary

from benchmarks import print_table, time_per_call
from news.models import Article, Author, Comment, Section, Tag

SECTION = "bench-prefetch"
TAGS_PER_ARTICLE = 3
COMMENTS_PER_ARTICLE = 5

Row = tuple[str, str, list[str], int]


def fill(articles: int) -> Section:
    """Make the bench section hold *articles* articles with authors, tags and comments."""
    section, _ = Section.objects.get_or_create(slug=SECTION, defaults={"name": "Bench prefetch"})
    have = Article._base_manager.filter(section=section).count()
    if have >= articles:
        return section
    authors = list(Author._base_manager.filter(name__startswith="Bench author ").order_by("pk"))
    if not authors:
        authors = Author.objects.bulk_create(Author(name=f"Bench author {i}") for i in range(100))
    tags = list(Tag._base_manager.filter(slug__startswith="bench-").order_by("pk"))
    if not tags:
        tags = Tag.objects.bulk_create(Tag(name=f"bench-{i}", slug=f"bench-{i}") for i in range(50))
    now = timezone.now()
    created = Article.objects.bulk_create(
        Article(
            section=section,
            author=authors[i % len(authors)],
            title=f"Bench article {i}",
            slug=f"bench-prefetch-{i}",
            body="",
            published_at=now - timezone.timedelta(minutes=i),
            status=Article.Status.PUBLISHED,
        )
        for i in range(have, articles)
    )
    through = Article.tags.through
    through.objects.bulk_create(
        through(article_id=article.pk, tag_id=tags[(n + k * 7) % len(tags)].pk)
        for n, article in enumerate(created)
        for k in range(TAGS_PER_ARTICLE)
    )
    Comment.objects.bulk_create(
        Comment(article=article, author_name="reader", body="!", created_at=now)
        for article in created
        for _ in range(COMMENTS_PER_ARTICLE)
    )
    return section


# -- django-auto-prefetch: the same rows in tables of its model base class -------------------


def auto_prefetch_models() -> tuple[type[models.Model], ...] | None:
    """Declare django-auto-prefetch copies of the tables (once), or ``None`` if not installed."""
    try:
        import auto_prefetch
    except ImportError:
        return None
    cached = globals().get("_AUTO_PREFETCH_MODELS")
    if cached is not None:
        return cached  # type: ignore[no-any-return]

    class APAuthor(auto_prefetch.Model):  # type: ignore[misc]
        name = models.CharField(max_length=200)

        class Meta(auto_prefetch.Model.Meta):  # type: ignore[misc]
            app_label = "news"
            db_table = "bench_prefetch_ap_author"

    class APTag(auto_prefetch.Model):  # type: ignore[misc]
        name = models.CharField(max_length=60)

        class Meta(auto_prefetch.Model.Meta):  # type: ignore[misc]
            app_label = "news"
            db_table = "bench_prefetch_ap_tag"

    class APArticle(auto_prefetch.Model):  # type: ignore[misc]
        author = auto_prefetch.ForeignKey(APAuthor, models.CASCADE)
        title = models.CharField(max_length=200)
        published_at = models.DateTimeField()
        tags = models.ManyToManyField(APTag, db_table="bench_prefetch_ap_article_tags")

        class Meta(auto_prefetch.Model.Meta):  # type: ignore[misc]
            app_label = "news"
            db_table = "bench_prefetch_ap_article"

    class APComment(auto_prefetch.Model):  # type: ignore[misc]
        article = auto_prefetch.ForeignKey(APArticle, models.CASCADE, related_name="comments")

        class Meta(auto_prefetch.Model.Meta):  # type: ignore[misc]
            app_label = "news"
            db_table = "bench_prefetch_ap_comment"

    found = (APAuthor, APTag, APArticle, APComment)
    globals()["_AUTO_PREFETCH_MODELS"] = found
    return found


def fill_auto_prefetch(section: Section, found: tuple[type[models.Model], ...]) -> None:
    """Copy the bench section's rows into the django-auto-prefetch tables."""
    ap_author, ap_tag, ap_article, ap_comment = found
    with connection.schema_editor() as editor:
        for model in found:
            if model._meta.db_table not in connection.introspection.table_names():
                editor.create_model(model)
    articles = list(Article._base_manager.filter(section=section).order_by("pk"))
    if ap_article._base_manager.count() == len(articles):
        return
    for model in (ap_comment, ap_article, ap_tag, ap_author):
        model._base_manager.all().delete()
    ap_author._base_manager.bulk_create(ap_author(pk=a.pk, name=a.name) for a in Author._base_manager.all())
    ap_tag._base_manager.bulk_create(ap_tag(pk=t.pk, name=t.name) for t in Tag._base_manager.all())
    ap_article._base_manager.bulk_create(
        ap_article(pk=a.pk, author_id=a.author_id, title=a.title, published_at=a.published_at)
        for a in articles
    )
    through, ap_through = Article.tags.through, ap_article.tags.through  # type: ignore[attr-defined]
    ap_through._base_manager.bulk_create(
        ap_through(aparticle_id=row.article_id, aptag_id=row.tag_id)
        for row in through._base_manager.filter(article__section=section)
    )
    ap_comment._base_manager.bulk_create(
        ap_comment(pk=c.pk, article_id=c.article_id)
        for c in Comment._base_manager.filter(article__section=section)
    )


# -- The page, six ways ----------------------------------------------------------------------


def page(articles: Any) -> list[Row]:
    """The list page: title, author, tag names and comment count of each article."""
    return [
        (
            article.title,
            article.author.name,
            [tag.name for tag in article.tags.all()],
            article.comments.count(),
        )
        for article in articles
    ]


def optimum_page(articles: Any) -> list[Row]:
    return [
        (article.title, article.author.name, [tag.name for tag in article.tags.all()], article.n_comments)
        for article in articles
    ]


def variants(section: Section, size: int) -> list[tuple[str, Callable[[], list[Row]]]]:
    def stock() -> Any:
        return Article._base_manager.filter(section=section).order_by("-published_at")[:size]

    found: list[tuple[str, Callable[[], list[Row]]]] = [
        ("naive (stock Django)", lambda: page(stock())),
        ("select_related", lambda: page(stock().select_related("author"))),
        (
            "hand-written optimum",
            lambda: optimum_page(
                stock()
                .select_related("author")
                .prefetch_related("tags")
                .annotate(n_comments=Count("comments"))
            ),
        ),
    ]
    if django.VERSION >= (6, 1):
        from django.db.models import FETCH_PEERS  # type: ignore[attr-defined,unused-ignore]

        found.append(("Django 6.1 FETCH_PEERS", lambda: page(stock().fetch_mode(FETCH_PEERS))))  # type: ignore[attr-defined,unused-ignore]
    ap = auto_prefetch_models()
    if ap is not None:
        fill_auto_prefetch(section, ap)
        ap_article = ap[2]
        ap_ids = list(stock().values_list("pk", flat=True))
        found.append(
            (
                "django-auto-prefetch",
                lambda: page(ap_article.objects.filter(pk__in=ap_ids).order_by("-published_at")),
            )
        )
    found.append(
        (
            "django-scale (no lookups)",
            lambda: page(Article.objects.filter(section=section).order_by("-published_at")[:size]),
        )
    )
    return found


def normalized(rows: list[Row]) -> list[Row]:
    """The page's rows in a comparable form (tag order is each model's own)."""
    return sorted((title, author, sorted(tags), comments) for title, author, tags, comments in rows)


def measure_memory(function: Callable[[], object]) -> int:
    """Return the peak memory (bytes) of one call of *function*."""
    gc.collect()
    tracemalloc.start()
    function()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def per_row_overhead(section: Section, size: int) -> float:
    """Bytes per row that peer tracking adds to a loaded result set."""

    def held(queryset: Any) -> int:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        rows = list(queryset)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del rows
        return after - before

    plain = min(held(Article._base_manager.filter(section=section)[:size]) for _ in range(3))
    aware = min(held(Article.objects.filter(section=section)[:size]) for _ in range(3))
    return (aware - plain) / size


ITER_SECTION = "bench-prefetch-iterator"


def fill_iterator(rows: int) -> Section:
    """Make the iterator section hold *rows* bare articles (sharing the bench authors)."""
    section, _ = Section.objects.get_or_create(slug=ITER_SECTION, defaults={"name": "Bench iterator"})
    have = Article._base_manager.filter(section=section).count()
    authors = list(Author._base_manager.filter(name__startswith="Bench author ").order_by("pk"))
    now = timezone.now()
    for start in range(have, rows, 20_000):
        Article.objects.bulk_create(
            Article(
                section=section,
                author=authors[i % len(authors)],
                title=f"Iterated {i}",
                slug=f"bench-iterator-{i}",
                body="",
                published_at=now,
                status=Article.Status.PUBLISHED,
            )
            for i in range(start, min(rows, start + 20_000))
        )
    return section


def iterator_peak(section: Section, rows: int) -> tuple[int, int]:
    """Return (queries, peak bytes) of iterating *rows* articles and reading each one's author."""
    queryset = Article.objects.filter(section=section).order_by("pk")[:rows]
    connection.queries_log.clear()
    with CaptureQueriesContext(connection) as queries:
        for article in queryset.iterator(chunk_size=2000):
            article.author  # noqa: B018 - read the relation, as an export would
    count = len(queries)
    with override_settings(DEBUG=False):
        gc.collect()
        tracemalloc.start()
        for article in queryset.iterator(chunk_size=2000):
            article.author  # noqa: B018
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return count, peak


def run(out: TextIO, quick: bool = False) -> None:
    size = 200 if quick else 1000
    repeats = 2 if quick else 5
    with use_primary():
        section = fill(size)
        table = variants(section, size)
        expected = table[2][1]()
        rows = []
        results: dict[str, tuple[int, float, int]] = {}
        for name, function in table:
            connection.queries_log.clear()  # DEBUG's log holds 9,000 queries; start empty
            with CaptureQueriesContext(connection) as queries:
                produced = function()
            if normalized(produced) != normalized(expected):
                raise AssertionError(f"{name} built a different page than the hand-written optimum")
            # Timed and measured without DEBUG's query log, which would dominate both.
            with override_settings(DEBUG=False):
                seconds = time_per_call(function, calls=1, repeats=repeats)
                peak = measure_memory(function)
            results[name] = (len(queries), seconds, peak)
        base_seconds, base_peak = results["hand-written optimum"][1:]
        for name, (count, seconds, peak) in results.items():
            rows.append(
                (
                    name,
                    count,
                    f"{seconds * 1000:.1f}",
                    f"{seconds / base_seconds:.2f}x",
                    f"{peak / 1024:.0f}",
                    f"{peak / base_peak:.2f}x",
                )
            )
        print_table(
            out,
            f"List page of {size:,} articles (author, {TAGS_PER_ARTICLE} tags, comment count), {connection.vendor}",
            ["variant", "queries", "ms", "vs optimum", "peak KiB", "vs optimum"],
            rows,
        )
        with override_settings(DEBUG=False):
            overhead = per_row_overhead(section, size)
        print_table(
            out,
            "Peer tracking cost (rows loaded, no relation read)",
            ["measure", "value", "goal"],
            [("bytes per row", f"{overhead:.1f}", "<= 64")],
        )
        sizes = [5_000, 20_000] if quick else [50_000, 200_000]
        section = fill_iterator(sizes[-1])
        measured = [(rows, *iterator_peak(section, rows)) for rows in sizes]
        print_table(
            out,
            "iterator(chunk_size=2000) reading each row's author: peers per chunk",
            ["rows", "queries", "peak KiB", "vs smallest"],
            [
                (f"{rows:,}", count, f"{peak / 1024:.0f}", f"{peak / measured[0][2]:.2f}x")
                for rows, count, peak in measured
            ],
        )
