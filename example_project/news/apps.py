from __future__ import annotations

from django.apps import AppConfig


class NewsConfig(AppConfig):
    name = "news"
    verbose_name = "News"

    def ready(self) -> None:
        # Connect the receivers that invalidate the cached front page.
        from news import signals  # noqa: F401
