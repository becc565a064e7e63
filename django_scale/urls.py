"""``path("scale/", include("django_scale.urls"))``: the metrics export endpoints."""

from __future__ import annotations

from django.urls import path

from django_scale import views

app_name = "django_scale"

urlpatterns = [
    path("metrics", views.metrics_view, name="metrics"),
    path("sketches.json", views.sketches_view, name="sketches"),
    path("status/", views.status_view, name="status"),
]
