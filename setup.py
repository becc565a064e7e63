"""Shim for tools that still call ``setup.py``; the metadata lives in pyproject.toml."""

from __future__ import annotations

from setuptools import setup

setup()
