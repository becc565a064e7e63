"""Per-user functions cached with stale-while-revalidate, for tests/test_refill_trust.py."""

from __future__ import annotations

from django_scale.cache import stale_while_revalidate

from testapp.cached import probe


@stale_while_revalidate(fresh=60, stale=3600)
def balance(user_id: int) -> str:
    """One user's private value: it must never be served to another user."""
    return f"{probe.record('balance', user_id)}:balance-of-{user_id}"


@stale_while_revalidate(fresh=60, stale=3600, key=lambda user_id, note="": str(user_id))
def statement(user_id: int, note: str = "") -> str:
    """Keyed by a key= function: the note is not part of the key."""
    return f"{probe.record('statement', user_id)}:statement-of-{user_id}"


@stale_while_revalidate(fresh=60, stale=3600)
def report(user_id: int, *, year: int = 2024, **filters: str) -> str:
    """Keyword-only and variadic parameters."""
    return f"{probe.record('report', user_id)}:report-of-{user_id}-{year}-{sorted(filters.items())}"
