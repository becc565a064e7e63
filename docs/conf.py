"""Sphinx configuration for the django-scale documentation."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _read_version() -> str:
    # The installed distribution is the truth (tox's docs env installs the wheel). Without it,
    # read the source tree's __init__.py as text: importing django_scale or Django settings
    # here would make the docs build depend on a configured Django project.
    try:
        return package_version("django-scale")
    except PackageNotFoundError:
        text = (ROOT / "django_scale" / "__init__.py").read_text(encoding="utf-8")
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
        if match is None:
            raise RuntimeError("No __version__ found in django_scale/__init__.py") from None
        return match.group(1)


project = "django-scale"
author = "The django-scale developers"
copyright = "The django-scale developers"
release = _read_version()
version = ".".join(release.split(".")[:2])

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"django-scale {release}"
