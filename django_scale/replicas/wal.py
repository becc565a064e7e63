"""WAL positions: PostgreSQL LSNs as integers, and the read-your-writes cookie's value."""

from __future__ import annotations

from django_scale.exceptions import ArgumentError

__all__ = ["STICKY_PRIMARY", "decode_position", "format_lsn", "parse_lsn"]


def parse_lsn(text: str) -> int:
    """Return the PostgreSQL WAL position ``"16/B374D848"`` as an integer.

    Raise :class:`~django_scale.exceptions.ArgumentError` (a :class:`ValueError`) for any
    other text.
    """
    high, sep, low = text.partition("/")
    try:
        if sep:
            return (int(high, 16) << 32) + int(low, 16)
    except ValueError:
        pass
    raise ArgumentError(f"{text!r} is not a PostgreSQL LSN such as '16/B374D848'")


def format_lsn(value: int) -> str:
    """Return the integer WAL position *value* in PostgreSQL's ``"16/B374D848"`` form."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


#: The value of a read-your-writes cookie or task header that means "read from the primary":
#: the user wrote, but the primary has no WAL position to wait for.
STICKY_PRIMARY = "primary"


def decode_position(value: str | None) -> tuple[int | None, bool]:
    """Decode a cookie or header value: the WAL position to wait for, and whether to stick to the primary.

    ``None`` means no recent write; a malformed value sticks to the primary, which is slower
    but never stale.
    """
    if value is None:
        return None, False
    if value == STICKY_PRIMARY:
        return None, True
    try:
        return parse_lsn(value), False
    except ValueError:
        return None, True
