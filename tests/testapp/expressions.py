"""An expression of a project's own that reads request state when compiled (query cache tests)."""

from __future__ import annotations

from typing import Any

from django.db.models import CharField, Expression
from django.utils import translation


class ActiveLanguage(Expression):
    """The active language as a SQL parameter, read when the query is compiled.

    Translation packages compile per language this way (a column or a join chosen by
    ``get_language()``): the same query object gives another SQL in another request.
    """

    output_field = CharField()

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        return "%s", [translation.get_language() or ""]
