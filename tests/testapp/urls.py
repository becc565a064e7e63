from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from testapp import cached, views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("authors/", views.create_author),
    path("authors/<int:pk>/", views.show_author),
    path("authors/<int:pk>/rename/", views.rename_author),
    path("authors/enqueue/", views.create_author_and_enqueue),
    path("authors/sleepy/", views.sleepy_authors),
    path("async/authors/", views.async_create_author),
    path("async/authors/<int:pk>/", views.async_show_author),
    path("async/authors/<int:pk>/rename/", views.async_rename_author),
    path("async/statement-timeout/", views.async_statement_timeout),
    path("swr/page/", cached.page),
    path("swr/cookie/", cached.page_with_cookie),
    path("swr/user/", cached.page_for_user),
    path("swr/per-user/", cached.page_per_user),
    path("swr/language/", cached.page_by_language),
    path("swr/async/", cached.async_page),
    path("swr/replica/", cached.replica_page),
    path("swr/fragment/", views.fragment),
    path("iso/", include("testapp.pages")),
]
