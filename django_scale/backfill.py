"""Deprecated: backfills are now the app :mod:`django_scale.contrib.backfill`.

Add ``"django_scale.contrib.backfill"`` to ``INSTALLED_APPS`` and import from
:mod:`django_scale.contrib.backfill.runner`. This module re-exports its names for one release.
"""

from __future__ import annotations

import warnings

from django_scale.contrib.backfill.runner import Backfill, BackfillProgress, progress_bar, run_backfill

__all__ = ["Backfill", "BackfillProgress", "progress_bar", "run_backfill"]

warnings.warn(
    "django_scale.backfill is deprecated: add 'django_scale.contrib.backfill' to INSTALLED_APPS "
    "and import from django_scale.contrib.backfill.runner.",
    DeprecationWarning,
    stacklevel=2,
)
