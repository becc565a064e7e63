"""The public front: the latest articles per section, a section's articles, one article with its
tags and comments, and a reader's comment on it.

Each page is written three ways, one per configuration of ``bench site`` (``news.configs``):
the same page and data, built the stock way (Django's managers, relations loaded lazily), the
hand-tuned way (``select_related``/``prefetch_related``, a TTL cache) and django-scale's.
Unconfigured, the project serves django-scale's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.cache import cache_page
from django.views.decorators.http import require_POST

from django_scale.cache import stale_while_revalidate

from news.configs import site_config
from news.models import Article, Comment, Section, Tag

#: How many articles the front page shows per section.
LATEST_PER_SECTION = 5
#: How many articles the article list shows.
ARTICLE_LIST_SIZE = 100
#: How many articles a section's page shows.
SECTION_PAGE_SIZE = 20
#: How many tags the sidebar lists.
SIDEBAR_TAGS = 10
#: Seconds the cached pages are fresh for: the hand-tuned configuration's TTL, and django-scale's
#: ``fresh`` (``bench site`` shortens it for its phase through cache expiry).
PAGE_TTL: int = settings.NEWSROOM_PAGE_TTL
#: The same for the sidebar fragment (``{% cache %}`` / ``{% swrcache %}`` in base.html).
FRAGMENT_TTL: int = settings.NEWSROOM_FRAGMENT_TTL


def _published(config: str) -> QuerySet[Article]:
    """Published articles: django-scale's queryset, or (stock, tuned) Django's own manager."""
    if config == "scale":
        return Article.objects.published()
    return Article._base_manager.filter(status=Article.Status.PUBLISHED, published_at__lte=timezone.now())


def _sections(config: str) -> QuerySet[Section]:
    return Section.objects.all() if config == "scale" else Section._base_manager.all()


def _section_rows(section: Section, articles: Iterable[Article]) -> dict[str, Any]:
    return {
        "name": section.name,
        "articles": [
            {
                "title": article.title,
                "url": article.get_absolute_url(),
                "author": article.author.name,
                "published_at": article.published_at.isoformat() if article.published_at else None,
            }
            for article in articles
        ],
    }


def _latest(per_section: int, *, config: str) -> list[dict[str, Any]]:
    published = _published(config)
    if config != "stock":
        published = published.select_related("author")
    return [
        _section_rows(section, published.filter(section=section).order_by("-published_at")[:per_section])
        for section in _sections(config).order_by("name")
    ]


@stale_while_revalidate(fresh=PAGE_TTL, stale=24 * 3600)
def latest_by_section(per_section: int = LATEST_PER_SECTION) -> list[dict[str, Any]]:
    """Return the latest published articles of each section, as plain data for the cache.

    Fresh for a minute (``PAGE_TTL``); after that, readers get the cached front page at once while one
    Celery task rebuilds it. Saving an article invalidates it (see ``news.signals``).
    """
    return _latest(per_section, config="scale")


def front_page(request: HttpRequest) -> HttpResponse:
    """List the latest published articles of each section, and the most used tags."""
    config = site_config()
    if config == "stock":
        sections = _latest(LATEST_PER_SECTION, config="stock")
    elif config == "tuned":
        sections = cache.get_or_set(
            "newsroom:front", lambda: _latest(LATEST_PER_SECTION, config="tuned"), PAGE_TTL
        )
    else:
        sections = latest_by_section()
    return render(request, "news/front_page.html", {"sections": sections, **sidebar()})


def _top_tags(config: str) -> QuerySet[Tag]:
    """The most used tags, each with ``uses``: a count over every article's tags."""
    manager = Tag.objects if config == "scale" else Tag._base_manager
    return manager.annotate(uses=Count("articles")).order_by("-uses", "name")[:SIDEBAR_TAGS]


@stale_while_revalidate(fresh=FRAGMENT_TTL, stale=24 * 3600)
def popular_tags() -> list[dict[str, Any]]:
    """Return the most used tags as plain data for the cache.

    Stale, it is served while one Celery task counts again: no reader's request pays for the
    count over every article's tags, where a fragment cache has the request that finds it
    expired (or, with ``{% swrcache %}``, stale) render it, queries included.
    """
    return [{"name": tag.name, "uses": tag.uses} for tag in _top_tags("scale")]


def sidebar() -> dict[str, Any]:
    """The sidebar's context: its tags, looked up only when its fragment is rendered.

    A lazy queryset (stock, tuned) or :func:`popular_tags` itself (django-scale: the template
    calls it). ``sidebar_cache`` says how base.html caches the fragment: not at all (stock),
    with Django's ``{% cache %}`` tag (tuned) or ``{% swrcache %}`` (django-scale).
    """
    config = site_config()
    tags = popular_tags if config == "scale" else _top_tags(config)
    return {
        "sidebar_tags": tags,
        "sidebar_cache": {"stock": "", "tuned": "ttl"}.get(config, "swr"),
        "sidebar_ttl": FRAGMENT_TTL,
    }


def _section_articles(section: Section, *, config: str) -> list[dict[str, Any]]:
    articles = _published(config)
    if config == "tuned":
        articles = articles.select_related("author").prefetch_related("tags")
    page = list(articles.filter(section=section).order_by("-published_at")[:SECTION_PAGE_SIZE])
    counts: dict[int, int] = {}
    if config == "tuned":
        # The page's comment counts in one query (an annotation would count every article of
        # the section before the LIMIT).
        counts = dict(
            Comment._base_manager.filter(article__in=page)
            .values("article")
            .annotate(n=Count("pk"))
            .values_list("article", "n")
        )
    # django-scale's queryset is prefetch-aware: authors, tags and comment counts load once
    # for the page, unasked. Stock's load row by row.
    return [
        {
            "title": article.title,
            "url": article.get_absolute_url(),
            "author": article.author.name,
            "published_at": article.published_at,
            "comments": counts.get(article.pk, 0) if config == "tuned" else article.comments.count(),
            "tags": [tag.name for tag in article.tags.all()],
        }
        for article in page
    ]


@stale_while_revalidate(fresh=PAGE_TTL, stale=24 * 3600)
def section_articles(slug: str) -> list[dict[str, Any]]:
    """Return the latest published articles of section *slug*, as plain data for the cache."""
    return _section_articles(_sections("scale").get(slug=slug), config="scale")


def _render_section(request: HttpRequest, slug: str) -> HttpResponse:
    config = site_config()
    section = get_object_or_404(_sections(config), slug=slug)
    articles = section_articles(slug) if config == "scale" else _section_articles(section, config=config)
    return render(request, "news/section.html", {"section": section, "articles": articles, **sidebar()})


_tuned_section = cache_page(PAGE_TTL, key_prefix="newsroom-section")(_render_section)


def section_page(request: HttpRequest, slug: str) -> HttpResponse:
    """List the latest published articles of one section with author, tags and comment count."""
    if site_config() == "tuned":
        return _tuned_section(request, slug)
    return _render_section(request, slug)


def article_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """Show one published article with its tags and comments."""
    config = site_config()
    articles = _published(config)
    if config != "stock":
        articles = articles.select_related("section", "author").prefetch_related("tags", "comments")
    article = get_object_or_404(articles, slug=slug)
    return render(request, "news/article_detail.html", {"article": article, **sidebar()})


@require_POST
def add_comment(request: HttpRequest, slug: str) -> HttpResponse:
    """Add a reader's comment (``author_name``, ``body``) to an article; back to the article."""
    article = get_object_or_404(_published(site_config()).only("pk", "slug"), slug=slug)
    author_name = request.POST.get("author_name", "").strip()[:100]
    body = request.POST.get("body", "").strip()
    if not author_name or not body:
        return HttpResponse("author_name and body are required", status=400)
    Comment.objects.create(article=article, author_name=author_name, body=body)
    return HttpResponseRedirect(article.get_absolute_url(), status=303)


def article_list(request: HttpRequest) -> HttpResponse:
    """List the latest published articles with author, tags and comment count.

    No ``select_related`` or ``prefetch_related``: ``Article.objects`` is prefetch-aware, so
    the page takes four queries (articles, authors, tags, comment counts) for any length.
    """
    articles = Article.objects.published().order_by("-published_at")[:ARTICLE_LIST_SIZE]
    return render(request, "news/article_list.html", {"articles": articles})
