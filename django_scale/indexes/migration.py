"""Write the advisor's suggestions as a migration of ``AddIndexConcurrently`` operations, and
remember the statements' times so that ``scale_indexes --verify`` can compare them later."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.apps import apps
from django.core.cache import caches
from django.db import migrations, models
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.writer import MigrationWriter

from django_scale.conf import conf
from django_scale.exceptions import ArgumentError
from django_scale.indexes.advisor import Candidate, Suggestion
from django_scale.indexes.shapes import suggest_index
from django_scale.indexes.stats import statement_totals

__all__ = ["BASELINE_KEY", "index_for", "model_for_table", "save_baseline", "verify", "write_migration"]

#: The cache key of the statements' times when the indexes were proposed.
BASELINE_KEY = "django_scale:indexes:v1:baseline"


def model_for_table(table: str) -> type[models.Model] | None:
    """Return the model whose table is *table*, or ``None``."""
    for model in apps.get_models(include_auto_created=True):
        if model._meta.db_table == table:
            return model
    return None


def index_for(candidate: Candidate) -> tuple[type[models.Model], models.Index] | None:
    """Return the model and the ``models.Index`` of *candidate*, or ``None`` when its table or
    a column belongs to no model."""
    model = model_for_table(candidate.table)
    if model is None:
        return None
    by_column = {field.column: field.name for field in model._meta.concrete_fields}
    if any(column not in by_column for column, _ in candidate.columns):
        return None
    fields = [f"-{by_column[column]}" if desc else by_column[column] for column, desc in candidate.columns]
    name = re.search(r"name='([^']+)'", suggest_index(model, fields))
    assert name is not None
    return model, models.Index(fields=fields, name=name.group(1))


def write_migration(
    app_label: str, suggestions: Sequence[Suggestion], *, directory: str | None = None
) -> Path | None:
    """Write a migration of *app_label* adding *suggestions*' indexes of its models with
    ``AddIndexConcurrently``; return its path, or ``None`` when none is of that app.

    It goes in the app's migrations package, or *directory*.
    """
    from django.contrib.postgres.operations import AddIndexConcurrently

    try:
        apps.get_app_config(app_label)
    except LookupError as error:
        raise ArgumentError(f"--migration {app_label!r}: no installed app has that label.") from error
    operations: list[Any] = []
    for suggestion in suggestions:
        found = index_for(suggestion.candidate)
        if found and found[0]._meta.app_label == app_label:
            model, index = found
            operations.append(AddIndexConcurrently(model_name=str(model._meta.model_name), index=index))
    if not operations:
        return None
    loader = MigrationLoader(None, ignore_no_migrations=True)
    leaves = loader.graph.leaf_nodes(app_label)
    numbers = [int(name[:4]) for _, name in leaves if name[:4].isdigit()]
    name = f"{(max(numbers) + 1) if numbers else 1:04d}_scale_indexes"
    migration = type(
        "Migration",
        (migrations.Migration,),
        {"atomic": False, "dependencies": list(leaves), "operations": operations},
    )(name, app_label)
    writer = MigrationWriter(migration)
    target = Path(directory) if directory else Path(writer.basedir)
    os.makedirs(target, exist_ok=True)
    path = target / f"{name}.py"
    # MigrationWriter leaves out ``atomic``; CREATE INDEX CONCURRENTLY cannot run in a transaction.
    text = writer.as_string().replace(
        "class Migration(migrations.Migration):\n",
        "class Migration(migrations.Migration):\n    atomic = False\n\n",
        1,
    )
    path.write_text(text)
    return path


def save_baseline(alias: str, suggestions: Sequence[Suggestion]) -> int:
    """Remember the calls and total time of each statement *suggestions* serve; return how many."""
    queryids = [p.queryid for s in suggestions for p in s.statements if p.queryid is not None]
    totals = statement_totals(alias, queryids)
    caches[conf.CACHE_ALIAS].set(
        BASELINE_KEY, {str(q): [n, t] for q, (n, t) in totals.items()}, 90 * 24 * 3600
    )
    return len(totals)


def verify(alias: str) -> list[tuple[int, float, float | None, int]]:
    """Compare each remembered statement's mean time before (at :func:`save_baseline`) and
    since: return ``(queryid, mean before, mean since or None if not run since, calls since)``."""
    baseline = caches[conf.CACHE_ALIAS].get(BASELINE_KEY) or {}
    now = statement_totals(alias, [int(q) for q in baseline])
    report = []
    for queryid, (calls, total) in ((int(q), v) for q, v in baseline.items()):
        before = total / calls if calls else 0.0
        later_calls, later_total = now.get(queryid, (calls, total))
        since = later_calls - calls
        report.append((queryid, before, (later_total - total) / since if since > 0 else None, since))
    return report
