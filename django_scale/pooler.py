"""Checks of databases behind a transaction pooler (``DJANGO_SCALE["POOLER"]``): W504–W507.

What works on a direct connection but not through PgBouncer in transaction mode: server-side
cursors, prepared statements (PgBouncer before 1.21), session settings at connect and
``assume_role``. ``check_ops`` runs them; see docs/deployment.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core import checks

from django_scale.checks import _message

__all__ = ["pooler_messages"]


def _w504_server_side_cursors(alias: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W504",
        f"The database {alias!r} is transaction pooled (DJANGO_SCALE['POOLER']) but uses "
        "server-side cursors: QuerySet.iterator() outside a transaction declares a WITH HOLD "
        "cursor that later fetches look for on another server connection.",
        f"Set DATABASES[{alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True.",
        obj=f"DATABASES[{alias!r}]",
    )


def _w505_prepared_statements(alias: str, threshold: Any) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W505",
        f"The database {alias!r} is transaction pooled (DJANGO_SCALE['POOLER']) and psycopg 3 "
        f"prepares statements (OPTIONS['prepare_threshold'] = {threshold!r}): a prepared "
        "statement exists on one server connection only, so PgBouncer before 1.21 (Debian 12 "
        "ships 1.18), or without max_prepared_statements, fails with 'prepared statement "
        "does not exist'.",
        "Remove OPTIONS['prepare_threshold'] (Django then prepares nothing), or run PgBouncer "
        "1.21+ with max_prepared_statements > 0 and silence this check.",
        obj=f"DATABASES[{alias!r}]",
    )


def _w506_session_options(alias: str, options: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W506",
        f"The database {alias!r} is transaction pooled (DJANGO_SCALE['POOLER']) but sets session "
        f"settings at connect (OPTIONS['options'] = {options!r}): PgBouncer refuses the startup "
        "parameter, or drops it when told to ignore it, and the server connections run "
        "without them.",
        "Set these on the database role or database instead (ALTER ROLE ... SET ...), or in "
        "PgBouncer's connect_query.",
        obj=f"DATABASES[{alias!r}]",
    )


def _w507_assume_role(alias: str, role: Any) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W507",
        f"The database {alias!r} is transaction pooled (DJANGO_SCALE['POOLER']) but assumes "
        f"the role {role!r} with a session SET ROLE when it connects: the role stays on the "
        "server connection that got it, for other clients, and this client's later "
        "transactions run on server connections that never got it.",
        f"Connect as {role!r} (USER), or remove OPTIONS['assume_role'].",
        obj=f"DATABASES[{alias!r}]",
    )


def pooler_messages(pooler: Mapping[str, Any]) -> list[checks.CheckMessage]:
    """What in ``DATABASES`` cannot work through a transaction pooler, for each such alias."""
    messages: list[checks.CheckMessage] = []
    for alias, mode in pooler.items():
        database = settings.DATABASES.get(alias)
        if mode != "transaction" or not database or "postgresql" not in database.get("ENGINE", ""):
            continue
        options = database.get("OPTIONS") or {}
        if not database.get("DISABLE_SERVER_SIDE_CURSORS"):
            messages.append(_w504_server_side_cursors(alias))
        if options.get("prepare_threshold") is not None:
            messages.append(_w505_prepared_statements(alias, options["prepare_threshold"]))
        if isinstance(options.get("options"), str) and options["options"].strip():
            messages.append(_w506_session_options(alias, options["options"]))
        if options.get("assume_role"):
            messages.append(_w507_assume_role(alias, options["assume_role"]))
    return messages
