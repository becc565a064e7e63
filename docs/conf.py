"""Sphinx configuration for the django-scale documentation."""

from __future__ import annotations

import os
import re
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _read_version() -> str:
    # The installed distribution is the truth (tox's docs env installs the wheel). Without it,
    # read the source tree's __init__.py as text, before Django is configured below.
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

# autodoc imports django_scale, whose modules import Django models and admin: configure
# Django first, with settings that need no database or cache server (docs/_settings.py).
sys.path.insert(0, str(ROOT / "docs"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "_settings")
import django  # noqa: E402

django.setup()

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"django-scale {release}"

# autodoc: members in source order, limited to each module's __all__ (automodule's default).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# A method that overrides Django's without a docstring of its own stays out of the reference:
# Django's docstrings are not written as reStructuredText.
autodoc_inherit_docstrings = False
autodoc_default_options = {"members": True, "show-inheritance": True}

# The build runs offline (CI has no network), so the inventories are files in
# docs/_inventories/: python.inv from Debian's python3.11-doc package, django.inv from its
# python-django-doc package (Django 3.2) with each page rewritten to the directory URL
# docs.djangoproject.com serves ("ref/paginator.html#x" -> "ref/paginator/#x"). Links point at
# the online docs; a name added to Django after 3.2 shows unlinked.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", str(ROOT / "docs" / "_inventories" / "python.inv")),
    "django": (
        "https://docs.djangoproject.com/en/stable/",
        str(ROOT / "docs" / "_inventories" / "django.inv"),
    ),
}
