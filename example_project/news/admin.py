"""The newsroom's admin: every model, with filters, search and autocomplete for relations."""

from __future__ import annotations

from django.contrib import admin

from news.models import Article, Author, Comment, Section, Tag


@admin.register(Section)
class SectionAdmin(admin.ModelAdmin):
    list_display = ["name", "slug"]
    search_fields = ["name"]
    prepopulated_fields = {"slug": ["name"]}


@admin.register(Author)
class AuthorAdmin(admin.ModelAdmin):
    list_display = ["name", "email"]
    search_fields = ["name", "email"]


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    list_display = ["name", "slug"]
    search_fields = ["name"]
    prepopulated_fields = {"slug": ["name"]}


class CommentInline(admin.TabularInline):
    model = Comment
    fields = ["author_name", "body", "created_at"]
    extra = 0


@admin.register(Article)
class ArticleAdmin(admin.ModelAdmin):
    list_display = ["title", "section", "author", "status", "published_at", "views"]
    list_filter = ["status", "section", "published_at"]
    list_select_related = ["section", "author"]
    search_fields = ["title", "slug"]
    date_hierarchy = "published_at"
    prepopulated_fields = {"slug": ["title"]}
    autocomplete_fields = ["section", "author", "tags"]
    inlines = [CommentInline]


@admin.register(Comment)
class CommentAdmin(admin.ModelAdmin):
    list_display = ["author_name", "article", "created_at"]
    list_filter = ["created_at"]
    list_select_related = ["article"]
    search_fields = ["author_name", "body"]
    raw_id_fields = ["article"]
