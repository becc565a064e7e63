from __future__ import annotations

from django.contrib import admin

from testapp.models import Article, Author


@admin.register(Author)
class AuthorAdmin(admin.ModelAdmin):
    search_fields = ["name"]


@admin.register(Article)
class ArticleAdmin(admin.ModelAdmin):
    list_display = ["title", "author", "published"]
    raw_id_fields = ["author"]
