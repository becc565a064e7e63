from __future__ import annotations

from django.contrib import admin

from django_scale.admin import ScaleModelAdmin

from testapp.models import Article, Author


@admin.register(Author)
class AuthorAdmin(ScaleModelAdmin):
    search_fields = ["name"]


@admin.register(Article)
class ArticleAdmin(ScaleModelAdmin):
    list_display = ["title", "author", "published"]
    raw_id_fields = ["author"]
    # `published` is not on the form: a save must keep whatever the primary has for it.
    fields = ["title", "author"]
