"""A module nothing imports: the refill task imports it to find its function (an installed app's)."""

from __future__ import annotations

from django_scale.cache import stale_while_revalidate


@stale_while_revalidate(fresh=60, stale=3600)
def doubled(n: int) -> int:
    return n * 2
