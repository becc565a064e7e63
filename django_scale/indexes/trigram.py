"""``TrigramIndex``: an index that serves the admin's ``icontains`` search on big tables.

Django's ``icontains`` on PostgreSQL is ``UPPER("title"::text) LIKE UPPER('%word%')``. No
B-tree index serves a pattern with a leading ``%``, and a trigram index on the plain column
does not serve ``UPPER(...)`` either: without the right index every search reads the whole
table. ``TrigramIndex`` is that index::

    from django_scale.indexes import TrigramIndex

    class Article(models.Model):
        title = models.CharField(max_length=200)

        class Meta:
            indexes = [TrigramIndex(fields=["title"], name="article_title_trgm")]

On PostgreSQL it is ``CREATE INDEX ... USING gin ((UPPER("title"::text)) gin_trgm_ops)``, which
needs the ``pg_trgm`` extension: add
``django.contrib.postgres.operations.TrigramExtension()`` to a migration before the index. On
other databases, which have no trigram indexes, it is a plain index of the same columns, so one
model serves a project that runs SQLite on a laptop and PostgreSQL in production.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.backends.ddl_references import Statement, Table
from django.db.models import Index, Model

from django_scale.exceptions import ArgumentError

__all__ = ["TrigramIndex"]

#: The operator class of ``pg_trgm``'s GIN indexes.
OPCLASS = "gin_trgm_ops"


class TrigramIndex(Index):
    """A GIN trigram index of ``UPPER(field)`` for ``icontains`` searches (PostgreSQL only)."""

    def __init__(self, *, fields: Sequence[str], name: str) -> None:
        if not fields or isinstance(fields, str) or not all(isinstance(f, str) and f for f in fields):
            raise ArgumentError(
                "TrigramIndex(fields=...) takes a list of field names, e.g. fields=['title']."
            )
        if any(field.startswith("-") for field in fields):
            raise ArgumentError("TrigramIndex(fields=...) has no order: drop the '-' from the field names.")
        super().__init__(fields=list(fields), name=name)
        #: The fields whose ``icontains`` (and ``iexact``, ``istartswith``, ``iendswith``) it serves.
        self.search_fields = tuple(fields)

    def create_sql(
        self, model: type[Model], schema_editor: BaseDatabaseSchemaEditor, using: str = "", **kwargs: Any
    ) -> Statement:
        if schema_editor.connection.vendor != "postgresql":
            return super().create_sql(model, schema_editor, using=using, **kwargs)
        quote = schema_editor.quote_name
        columns = [str(model._meta.get_field(field).column) for field in self.fields]  # type: ignore[union-attr]
        # Exactly the expression Django's icontains compares, so that the planner matches it.
        # (Written out: an OpClass() index expression needs django.contrib.postgres installed.)
        return Statement(
            "CREATE INDEX %(name)s ON %(table)s USING gin (%(columns)s)",
            name=quote(self.name),
            table=Table(model._meta.db_table, quote),
            columns=", ".join(f"(UPPER({quote(column)}::text)) {OPCLASS}" for column in columns),
        )

    def deconstruct(self) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        return "django_scale.indexes.TrigramIndex", (), {"fields": list(self.fields), "name": self.name}
