"""SQLSTATE helpers: what a failed query on a replica says about the replica."""

from __future__ import annotations

from typing import Any

__all__ = ["RECOVERY_CONFLICT", "error_sqlstate", "is_broken", "is_read"]


def error_sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a database error: the driver's, which Django chains as the cause.

    psycopg 3 calls it ``sqlstate``, psycopg2 ``pgcode``. An error raised by the driver
    itself, unwrapped, is looked at directly.
    """
    for error in (exc.__cause__, exc):
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if code:
            return str(code)
    return None


#: SQLSTATE of a query cancelled by a recovery conflict on a hot standby.
RECOVERY_CONFLICT = "40001"
#: SQLSTATEs of a server that is going away (class 57 "operator intervention", but not
#: 57014, a query cancelled by statement_timeout or pg_cancel_backend()), and of failures
#: to connect (class 08).
_SERVER_GONE = ("57P", "08")


def is_broken(connection: Any, sqlstate: str | None) -> bool:
    """Whether a failed query means the replica or the connection to it failed."""
    if sqlstate is None:
        # No answer from the server at all: the socket broke or the driver gave up.
        return True
    if sqlstate.startswith(_SERVER_GONE):
        return True
    raw = connection.connection
    return raw is None or bool(getattr(raw, "closed", False)) or bool(getattr(raw, "broken", False))


def is_read(sql: str) -> bool:
    """Whether *sql* only reads, so that it may run again on the primary."""
    return sql.lstrip().lstrip("(").upper().startswith(("SELECT", "WITH", "EXPLAIN", "SHOW", "VALUES"))
