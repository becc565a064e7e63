from __future__ import annotations

from django.urls import path

from news import views

urlpatterns = [path("articles/", views.article_list)]
