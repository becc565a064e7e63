"""A module with an import side effect, inside a package that is no installed app.

A forged refill message names it; the test asserts it was never imported.
"""

from __future__ import annotations

import os

os.environ["DJANGO_SCALE_TEST_TRAP"] = __name__


def anything() -> None:
    """Never called."""
