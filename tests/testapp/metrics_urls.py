"""URLs of the metrics tests: named and unnamed routes, an async view, and the /scale/ export."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import include, path, re_path

from django_scale import metrics

from testapp.models import Author


def author(request: HttpRequest, pk: int) -> JsonResponse:
    """Read one author: one query; counts a cache hit so the route's events show it."""
    metrics.increment("swr.hit")
    return JsonResponse({"found": Author.objects.filter(pk=pk).exists()})


async def async_author(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse({"found": await Author.objects.filter(pk=pk).aexists()})


def plain(request: HttpRequest, slug: str) -> JsonResponse:
    return JsonResponse({"slug": slug})


urlpatterns = [
    path("scale/", include("django_scale.urls")),
    path("authors/<int:pk>/", author, name="author"),
    path("async/authors/<int:pk>/", async_author, name="async-author"),
    re_path(r"^plain/(?P<slug>[a-z]+)/$", plain),
    path("", include("testapp.urls")),
]
