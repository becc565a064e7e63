"""The news app: sections, authors, tags, articles and their comments."""

from __future__ import annotations
