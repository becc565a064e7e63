"""Resumable backfills, an app of their own: list ``"django_scale.contrib.backfill"`` in ``INSTALLED_APPS``.

* :mod:`django_scale.contrib.backfill.runner`: :class:`Backfill`, :func:`run_backfill`,
  :func:`progress_bar` (import them from there: this package is imported while apps load,
  before models can be).
* :mod:`django_scale.contrib.backfill.models`: :class:`BackfillCheckpoint`, its table
  ``django_scale_backfill_checkpoint``.
* ``manage.py scale_backfill run|status|reset``.
"""
