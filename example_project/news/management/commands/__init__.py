"""Management commands of the news app: ``demo``."""

from __future__ import annotations
