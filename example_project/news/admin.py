"""The newsroom's admin: every model, with filters, search and autocomplete for relations.

Every ``ModelAdmin`` is a ``ScaleModelAdmin``: changelists count approximately and fetch
every page with a ``LIMIT``, and GET pages read from the replica when one is configured.
``bench site``'s stock and hand-tuned configurations (``news.configs``) register the same
options on Django's ``ModelAdmin`` instead; the hand-tuned one also turns off the full count
(``show_full_result_count``), as a careful team does on a big table.
"""

from __future__ import annotations

from django.contrib import admin

from django_scale.admin import ScaleModelAdmin
from django_scale.paginator import ApproxCountPaginator

from news.configs import site_config
from news.models import Article, Author, Comment, Section, Tag


class TunedModelAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Django's ModelAdmin as a careful team configures it for big tables."""

    show_full_result_count = False


class NewsroomPaginator(ApproxCountPaginator):
    """Counts of at most 1,000 rows: an editor searching headlines needs no more than "1,000+".

    With the defaults (10,000) a search of a common word counts 10,001 matching rows on every
    page load. The counts go through the query cache (``QUERY_CACHE`` is on in the ``scale``
    configuration): a search or filter shown again costs no count until an article changes.
    ``bench site`` measures this configuration (docs/site-benchmark.md).
    """

    count_threshold = 1_000
    count_cap = 1_000
    count_cached = True


#: The base class of every ModelAdmin here, by configuration (read once, when admin.py loads).
BaseAdmin: type[admin.ModelAdmin] = {  # type: ignore[type-arg]
    "stock": admin.ModelAdmin,
    "tuned": TunedModelAdmin,
}.get(site_config(), ScaleModelAdmin)


@admin.register(Section)
class SectionAdmin(BaseAdmin):
    list_display = ["name", "slug"]
    search_fields = ["^name"]
    prepopulated_fields = {"slug": ["name"]}
    # Sort only by indexed columns: sorting a big table by any other reads all of it
    # (django_scale.W304).
    sortable_by = ["slug"]


@admin.register(Author)
class AuthorAdmin(BaseAdmin):
    list_display = ["name", "email"]
    search_fields = ["name"]
    # Sort only by indexed columns: sorting a big table by any other reads all of it
    # (django_scale.W304).
    sortable_by: list[str] = []


@admin.register(Tag)
class TagAdmin(BaseAdmin):
    list_display = ["name", "slug"]
    search_fields = ["^name"]
    prepopulated_fields = {"slug": ["name"]}


class CommentInline(admin.TabularInline):
    model = Comment
    fields = ["author_name", "body", "created_at"]
    extra = 0


@admin.register(Article)
class ArticleAdmin(BaseAdmin):
    list_display = ["title", "section", "author", "status", "published_at", "views"]
    list_filter = ["status", "section", "published_at"]
    list_select_related = ["section", "author"]
    # A substring of the title, served by its trigram index. (Searching the slug too would
    # OR in a condition no index serves and read the whole table: django_scale.W303.)
    search_fields = ["title"]
    if BaseAdmin is ScaleModelAdmin:
        paginator = NewsroomPaginator
    date_hierarchy = "published_at"
    prepopulated_fields = {"slug": ["title"]}
    autocomplete_fields = ["section", "author", "tags"]
    inlines = [CommentInline]
    # Sort only by indexed columns: sorting a big table by any other reads all of it
    # (django_scale.W304).
    sortable_by = ["section", "author", "published_at"]


@admin.register(Comment)
class CommentAdmin(BaseAdmin):
    list_display = ["author_name", "article", "created_at"]
    list_filter = ["created_at"]
    list_select_related = ["article"]
    search_fields = ["author_name"]
    raw_id_fields = ["article"]
    # Sort only by indexed columns: sorting a big table by any other reads all of it
    # (django_scale.W304).
    sortable_by = ["article"]
