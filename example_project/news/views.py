"""The public front: the latest articles per section, and one article with its tags and comments."""

from __future__ import annotations

from typing import Any

from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from django_scale.cache import stale_while_revalidate

from news.models import Article, Section, Tag

#: How many articles the front page shows per section.
LATEST_PER_SECTION = 5
#: How many articles the article list shows.
ARTICLE_LIST_SIZE = 100
#: How many tags the sidebar lists.
SIDEBAR_TAGS = 10


@stale_while_revalidate(fresh=60, stale=24 * 3600)
def latest_by_section(per_section: int = LATEST_PER_SECTION) -> list[dict[str, Any]]:
    """Return the latest published articles of each section, as plain data for the cache.

    Fresh for a minute; after that, readers get the cached front page at once while one
    Celery task rebuilds it. Saving an article invalidates it (see ``news.signals``).
    """
    return [
        {
            "name": section.name,
            "articles": [
                {
                    "title": article.title,
                    "url": article.get_absolute_url(),
                    "author": article.author.name,
                    "published_at": article.published_at.isoformat() if article.published_at else None,
                }
                for article in Article.objects.published()
                .filter(section=section)
                .select_related("author")
                .order_by("-published_at")[:per_section]
            ],
        }
        for section in Section.objects.order_by("name")
    ]


def front_page(request: HttpRequest) -> HttpResponse:
    """List the latest published articles of each section, and the most used tags."""
    return render(request, "news/front_page.html", {"sections": latest_by_section(), **sidebar()})


def sidebar() -> dict[str, Any]:
    """The sidebar's context: a lazy queryset, evaluated only when its fragment is rendered."""
    tags = Tag.objects.annotate(uses=Count("articles")).order_by("-uses", "name")[:SIDEBAR_TAGS]
    return {"sidebar_tags": tags}


def article_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """Show one published article with its tags and comments."""
    article = get_object_or_404(
        Article.objects.published().select_related("section", "author").prefetch_related("tags", "comments"),
        slug=slug,
    )
    return render(request, "news/article_detail.html", {"article": article, **sidebar()})


def article_list(request: HttpRequest) -> HttpResponse:
    """List the latest published articles with author, tags and comment count.

    No ``select_related`` or ``prefetch_related``: ``Article.objects`` is prefetch-aware, so
    the page takes four queries (articles, authors, tags, comment counts) for any length.
    """
    articles = Article.objects.published().order_by("-published_at")[:ARTICLE_LIST_SIZE]
    return render(request, "news/article_list.html", {"articles": articles})
