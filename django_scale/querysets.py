"""Queryset mixins for big tables: ``ScaleQuerySet`` and its parts."""

from __future__ import annotations

from typing import Any

from django.db import models

from django_scale.counting import DEFAULT_BUDGET, DEFAULT_CAP, DEFAULT_THRESHOLD, ApproxCount, approx_count

__all__ = ["ApproxCountQuerySetMixin", "ScaleQuerySet"]


class ApproxCountQuerySetMixin:
    """Add ``approx_count()`` to a ``QuerySet`` subclass."""

    def approx_count(
        self, *, threshold: int = DEFAULT_THRESHOLD, cap: int = DEFAULT_CAP, budget: float = DEFAULT_BUDGET
    ) -> ApproxCount:
        """Return the number of rows: exact below *threshold*, else estimated or capped.

        See :func:`django_scale.counting.approx_count`.
        """
        queryset: Any = self
        return approx_count(queryset, threshold=threshold, cap=cap, budget=budget)


# QuerySet is generic only in django-stubs; subscripting it fails at run time.
class ScaleQuerySet(ApproxCountQuerySetMixin, models.QuerySet):  # type: ignore[type-arg]
    """The project-wide queryset for big tables: ``objects = ScaleQuerySet.as_manager()``."""
