"""The public front: the latest articles per section, and one article with its tags and comments."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from news.models import Article, Section

#: How many articles the front page shows per section.
LATEST_PER_SECTION = 5
#: How many articles the article list shows.
ARTICLE_LIST_SIZE = 100


def front_page(request: HttpRequest) -> HttpResponse:
    """List the latest published articles of each section."""
    sections = [
        (
            section,
            Article.objects.published()
            .filter(section=section)
            .select_related("author")
            .order_by("-published_at")[:LATEST_PER_SECTION],
        )
        for section in Section.objects.all()
    ]
    return render(request, "news/front_page.html", {"sections": sections})


def article_detail(request: HttpRequest, slug: str) -> HttpResponse:
    """Show one published article with its tags and comments."""
    article = get_object_or_404(
        Article.objects.published().select_related("section", "author").prefetch_related("tags", "comments"),
        slug=slug,
    )
    return render(request, "news/article_detail.html", {"article": article})


def article_list(request: HttpRequest) -> HttpResponse:
    """List the latest published articles with author, tags and comment count.

    No ``select_related`` or ``prefetch_related``: ``Article.objects`` is prefetch-aware, so
    the page takes four queries (articles, authors, tags, comment counts) for any length.
    """
    articles = Article.objects.published().order_by("-published_at")[:ARTICLE_LIST_SIZE]
    return render(request, "news/article_list.html", {"articles": articles})
