"""Run part of an admin page under the page's statement timeout, with a fallback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from django.db import DatabaseError

from django_scale.timeouts import current_statement_timeout, is_statement_timeout, statement_timeout

__all__ = ["or_fallback"]

logger = logging.getLogger("django_scale.admin")
T = TypeVar("T")


def or_fallback(alias: str, compute: Callable[[], T], fallback: Callable[[], T], what: str) -> T:
    """Return ``compute()``, or ``fallback()`` if a statement of it ran out of time.

    Under the page's :func:`~django_scale.timeouts.statement_timeout`, the statements run in
    their own block: inside a transaction (``ATOMIC_REQUESTS``) that is a savepoint, so a
    cancelled statement leaves the rest of the request's transaction usable.
    """
    seconds = current_statement_timeout(alias)
    if seconds is None:
        return compute()
    try:
        with statement_timeout(seconds, using=alias):
            return compute()
    except DatabaseError as error:
        if not is_statement_timeout(error):
            raise
        logger.warning("The admin's %s ran out of time (%s s) on %r; falling back.", what, seconds, alias)
        return fallback()
