"""A task module whose cached function nothing but Celery's autodiscovery imports (test_cache)."""

from __future__ import annotations

from django_scale.cache import stale_while_revalidate


@stale_while_revalidate(fresh=60, stale=600, cache="only_in_tasks")
def nightly_totals() -> int:
    return 0
