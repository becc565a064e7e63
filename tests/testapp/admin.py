from __future__ import annotations

from django.contrib import admin

from django_scale.admin import ScaleModelAdmin
from django_scale.paginator import ApproxCountPaginator

from testapp.models import Article, Author


class SmallThresholdPaginator(ApproxCountPaginator):
    """Counts above 50 rows are estimated, so the suite's small tables behave as big ones."""

    count_threshold = 50


@admin.register(Author)
class AuthorAdmin(ScaleModelAdmin):
    search_fields = ["name"]
    paginator = SmallThresholdPaginator
    list_per_page = 20


@admin.register(Article)
class ArticleAdmin(ScaleModelAdmin):
    list_display = ["title", "author", "published"]
    list_filter = ["author"]
    search_fields = ["title"]
    paginator = SmallThresholdPaginator
    list_per_page = 20
    raw_id_fields = ["author"]
    # `published` is not on the form: a save must keep whatever the primary has for it.
    fields = ["title", "author"]
