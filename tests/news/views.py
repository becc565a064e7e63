"""The list page of the docs' news site: each article's author, tags and comment count."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import HttpRequest, JsonResponse

from news.models import Article


def _list_page(articles: QuerySet[Article]) -> JsonResponse:
    return JsonResponse(
        {
            "articles": [
                {
                    "title": article.title,
                    "author": article.author.name if article.author else None,
                    "tags": [tag.name for tag in article.tags.all()],
                    "comments": article.comments.count(),
                }
                for article in articles
            ]
        }
    )


def article_list(request: HttpRequest) -> JsonResponse:
    """Read each relation lazily, with no lookups: peer loading batches them."""
    return _list_page(Article.objects.order_by("-published_at"))


def article_list_one_by_one(request: HttpRequest) -> JsonResponse:
    """The same page with peer loading off: one query per article and relation (an N+1)."""
    return _list_page(Article.objects.peer_loading(False).order_by("-published_at"))
