"""The newsroom's URLs: the admin and a small public front."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from news import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", views.front_page, name="front-page"),
    path("articles/", views.article_list, name="article-list"),
    path("articles/<slug:slug>/", views.article_detail, name="article-detail"),
    path("articles/<slug:slug>/comments/", views.add_comment, name="article-comment"),
    path("sections/<slug:slug>/", views.section_page, name="section"),
]
