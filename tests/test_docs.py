"""The docs follow the code: every public name is documented, no shipped feature is "planned"."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
README = DOCS.parent / "README.md"

#: The modules users import from; docs/api.md documents each with ``automodule``.
PUBLIC_MODULES = [
    "django_scale.admin",
    "django_scale.bulk",
    "django_scale.cache",
    "django_scale.cache.queries",
    "django_scale.conf",
    "django_scale.contrib.backfill.runner",
    "django_scale.counting",
    "django_scale.exceptions",
    "django_scale.indexes",
    "django_scale.indexes.advisor",
    "django_scale.keyset",
    "django_scale.metrics",
    "django_scale.middleware",
    "django_scale.paginator",
    "django_scale.prefetch",
    "django_scale.querysets",
    "django_scale.replicas",
    "django_scale.routers",
    "django_scale.slowlog",
    "django_scale.sniper",
    "django_scale.task_routing",
    "django_scale.testing",
    "django_scale.timeouts",
    "django_scale.views",
]


def _source(module: ModuleType) -> str:
    """Return the source of *module* (a package's ``__init__.py``)."""
    return Path(inspect.getfile(module)).read_text(encoding="utf-8")


def _has_own_docstring(module: ModuleType, name: str, source: str) -> bool:
    """Whether *name* has documentation autodoc shows: a docstring of its own or a ``#:`` comment."""
    value = getattr(module, name)
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.ismethod(value):
        # A class's inherited docstring (say, Django's) is not ours: ask the class itself.
        return bool((vars(value).get("__doc__") if inspect.isclass(value) else value.__doc__) or "")
    if callable(value) and getattr(value, "__wrapped__", None) is not None:
        return bool(getattr(value, "__doc__", None))
    # Data (constants, signals, the conf object): autodoc reads the "#:" comment above it in
    # the module it documents, so a package re-exporting a constant comments it in __init__.py.
    comment = rf"^[ \t]*#:[^\n]*\n(?:[ \t]*#:[^\n]*\n)*[ \t]*{re.escape(name)}\b\s*(?::[^\n=]*)?="
    return re.search(comment, source, re.MULTILINE) is not None


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_module_is_in_the_api_reference(module_name):
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    assert f".. automodule:: {module_name}\n" in api


def test_api_reference_documents_only_public_modules():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"^\.\. automodule:: (\S+)$", api, re.MULTILINE)) == PUBLIC_MODULES


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_documented(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    public = module.__all__
    source = _source(module)
    undocumented = [name for name in public if not _has_own_docstring(module, name, source)]
    assert not undocumented, f"{module_name}: no docstring (or '#:' comment) for {undocumented}"


def test_docs_do_not_call_shipped_features_planned():
    # Pages describe what ships. Designs for later live in the issues, not in the docs.
    pages = [*sorted(DOCS.glob("*.md")), README]
    found = [
        f"{page.name}: {line.strip()}"
        for page in pages
        for line in page.read_text(encoding="utf-8").splitlines()
        if re.search(r"\b(planned|coming soon|not (yet )?written|not yet available)\b", line, re.IGNORECASE)
    ]
    assert not found, "\n".join(found)


def test_every_python_example_in_the_docs_is_valid_python():
    """A copied example must at least parse: ``...`` may stand for elided values, not syntax."""
    pages = [*sorted(DOCS.glob("*.md")), README]
    broken = []
    blocks = 0
    for page in pages:
        for match in re.finditer(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL):
            blocks += 1
            try:
                compile(match.group(1), page.name, "exec")
            except SyntaxError as error:
                broken.append(f"{page.name}: {error}")
    assert blocks > 20
    assert not broken, "\n".join(broken)
