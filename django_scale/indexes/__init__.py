"""Indexes: ``TrigramIndex``, the index checks and the ``scale_indexes`` advisor.

``from django_scale.indexes import TrigramIndex`` is the import path migrations use: it stays.
The checks (:mod:`django_scale.indexes.checks`) need no database; the advisor
(:mod:`django_scale.indexes.advisor`, run by ``manage.py scale_indexes``) reads PostgreSQL's
statistics and proves each index with HypoPG before proposing it.
"""

from __future__ import annotations

from django_scale.indexes.shapes import IndexShape, index_shapes, serving_index, suggest_index
from django_scale.indexes.trigram import TrigramIndex

__all__ = ["IndexShape", "TrigramIndex", "index_shapes", "serving_index", "suggest_index"]
