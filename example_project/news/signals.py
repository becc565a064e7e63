"""Keep the cached front page in step with the articles."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from news.models import Article


@receiver(post_save, sender=Article, dispatch_uid="news.invalidate_front_page.save")
@receiver(post_delete, sender=Article, dispatch_uid="news.invalidate_front_page.delete")
def invalidate_front_page(sender: type[Article], **kwargs: Any) -> None:
    """Drop the cached front page once the change is committed, so the next reader sees it."""
    from news.views import latest_by_section

    transaction.on_commit(latest_by_section.invalidate)
