"""The news site with its list page loading row by row: what ``forbid_n_plus_one()`` must catch."""

from __future__ import annotations

from django.urls import path

from news import views

urlpatterns = [path("articles/", views.article_list_one_by_one)]
