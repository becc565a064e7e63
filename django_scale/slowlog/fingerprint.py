"""Fingerprints: a statement with its literals and placeholders stripped, so that one query
run with different values, or with IN-lists of different lengths, is one entry of the log."""

from __future__ import annotations

import hashlib
import re

__all__ = ["digest", "fingerprint"]

_STRING = re.compile(r"'(?:[^']|'')*'")
_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s|\$\d+|\?")
# A number not part of a name (t1.c2) and not quoted ("c1" was quoted already).
_NUMBER = re.compile(r"(?<![\w.\"$])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_SPACE = re.compile(r"\s+")
# A list of placeholders: IN (?, ?, ?) and VALUES (?, ?), (?, ?) of any length are one shape.
_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)*\s*\)")
_ROWS = re.compile(r"\(\.\.\.\)(?:\s*,\s*\(\.\.\.\))+")
_ARRAY = re.compile(r"ARRAY\[\s*\?(?:\s*,\s*\?)*\s*\]", re.IGNORECASE)


def fingerprint(sql: str) -> str:
    """Return *sql* with string and number literals and placeholders replaced by ``?`` and
    lists of them collapsed: ``IN (?, ?, ?)`` becomes ``IN (...)``."""
    text = _STRING.sub("?", sql)
    text = _PLACEHOLDER.sub("?", text)
    text = _NUMBER.sub("?", text)
    text = _SPACE.sub(" ", text).strip()
    text = _ARRAY.sub("ARRAY[...]", text)
    text = _LIST.sub("(...)", text)
    return _ROWS.sub("(...)", text)


def digest(text: str) -> str:
    """Return a short, stable name of fingerprint *text* (16 hexadecimal digits)."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
