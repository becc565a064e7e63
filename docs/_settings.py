"""Minimal Django settings for building the docs: autodoc imports django_scale's modules.

Nothing here connects to a server: SQLite in memory and the local-memory cache, so the docs
build needs neither PostgreSQL nor Redis.
"""

from __future__ import annotations

SECRET_KEY = "django-scale-docs-not-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_scale",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
