"""Migrations of the news app."""

from __future__ import annotations
