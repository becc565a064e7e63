#!/usr/bin/env python
"""Run the newsroom example project's management commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    """Put this directory on ``sys.path`` and run the command named on the command line."""
    # `python example_project/manage.py` from the repository root already has this directory
    # first on sys.path; other ways of running the file (runpy, an IDE) may not.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "newsroom.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
