"""Two admin sites over the same articles, for tests/test_admin_isolation.py.

``/owned/`` shows each staff user only the articles of the author named like them, the way
a project restricts an admin to ``owner=request.user``; ``/whole/`` shows every article.
The URLconf is used with ``@pytest.mark.urls("testapp.owned_admin")``.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import path

from django_scale.admin import ScaleModelAdmin

from testapp.admin import SmallThresholdPaginator
from testapp.models import Article, Post

owned_site = admin.AdminSite(name="owned")
whole_site = admin.AdminSite(name="whole")


class WholeArticleAdmin(ScaleModelAdmin):
    list_display = ["title"]
    list_filter = ["title", "author"]
    date_hierarchy = "published"
    paginator = SmallThresholdPaginator
    list_per_page = 20


class OwnArticleAdmin(WholeArticleAdmin):
    # A plain field, a relation, and a field through a relation.
    list_filter = ["title", "author", "author__name"]
    search_fields = ["title"]

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).filter(author__name=request.user.get_username())


class OwnPostAdmin(ScaleModelAdmin):
    list_display = ["title"]
    # A many-to-many field, a reverse relation and a nullable foreign key.
    list_filter = ["tags", "replies", "editor"]

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).filter(reporter__name=request.user.get_username())


whole_site.register(Article, WholeArticleAdmin)
owned_site.register(Article, OwnArticleAdmin)
owned_site.register(Post, OwnPostAdmin)

urlpatterns = [path("owned/", owned_site.urls), path("whole/", whole_site.urls)]
