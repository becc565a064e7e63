"""What a user gets from ``pip install django-scale``."""

from __future__ import annotations

import os
import re
from importlib import metadata
from importlib.resources import files
from pathlib import Path

import pytest

import django_scale


def test_version_matches_the_distribution():
    assert django_scale.__version__ == metadata.version("django-scale")


def test_py_typed_is_shipped():
    assert files("django_scale").joinpath("py.typed").is_file()


@pytest.mark.skipif(
    not os.environ.get("DJANGO_SCALE_TEST_EXPECT_WHEEL"), reason="set by tox, which installs the wheel"
)
def test_package_is_the_installed_wheel_not_the_source_tree():
    source_tree = Path(__file__).resolve().parent.parent / "django_scale"
    assert Path(django_scale.__file__).resolve().parent != source_tree
    assert "site-packages" in Path(django_scale.__file__).parts


def test_every_exception_class_is_a_django_scale_error():
    from django_scale import exceptions

    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        if issubclass(cls, Warning):
            assert issubclass(cls, exceptions.DjangoScaleWarning), name
        else:
            assert issubclass(cls, exceptions.DjangoScaleError), name


#: Python's exceptions the package may raise, by (exception, start of the message).
BUILTIN_RAISES_ALLOWED = {
    # Python's conventions: an abstract method; an internal invariant; a dict's __missing__.
    ("NotImplementedError", "{type(self).__name__} must def"),
    ("AssertionError", "unreachable: a value failed to"),
    ("KeyError", None),
    # A test helper fails the test that called it.
    ("AssertionError", "replay on {alias!r} did not pa"),
    # A call that does not bind to the function's signature, as Python says it.
    ("TypeError", "{self.path}(): {error}"),
    # Raised inside COPY's value conversion and reported as BulkDataError.
    ("TypeError", "expected an integer, got {type"),
}
#: Python's exceptions still raised to users, to be turned into django_scale.exceptions classes
#: (ArgumentError is a ValueError too, UsageError a RuntimeError): keep this set empty.
BUILTIN_RAISES_PENDING: set[tuple[str, str | None]] = set()


def test_errors_raised_to_users_are_django_scale_errors():
    import builtins

    builtin = {
        name
        for name in dir(builtins)
        if isinstance(getattr(builtins, name), type) and issubclass(getattr(builtins, name), BaseException)
    }
    found = set()
    for path in Path(django_scale.__file__).parent.rglob("*.py"):
        for match in re.finditer(r"raise (\w+)\((?:\s*f?[\"']([^\"'\n]{0,30}))?", path.read_text()):
            if match.group(1) in builtin:
                found.add((match.group(1), match.group(2)))
    unexpected = found - BUILTIN_RAISES_ALLOWED - BUILTIN_RAISES_PENDING
    assert not unexpected, f"raise a django_scale.exceptions class instead: {sorted(unexpected, key=str)}"


def _module_imports(package_dir: Path) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports when it is imported.

    Imports inside functions and under ``if TYPE_CHECKING:`` run later or never, and are left out.
    """
    import ast

    graph: dict[str, set[str]] = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        statements = list(tree.body)
        while statements:
            node = statements.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                statements.extend(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try)):
                for block in ("body", "orelse", "finalbody"):
                    statements.extend(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    statements.extend(handler.body)
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = targets
    return {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles: list[str] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(" -> ".join([*path[path.index(node) :], node]))
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, [*path, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_the_package_has_no_import_cycle() -> None:
    graph = _module_imports(Path(django_scale.__file__).resolve().parent)
    assert graph["django_scale.middleware"] >= {"django_scale.cache.pages", "django_scale.replicas"}
    # A package's __init__ re-exports its modules; a module importing its own package's name
    # goes through it, which is no cycle of concepts, so edges from a module into its parents
    # are left out.
    for name, targets in graph.items():
        targets -= {parent for parent in graph if name.startswith(parent + ".")}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert not _cycles(graph), _cycles(graph)


def test_no_module_is_over_600_lines() -> None:
    package_dir = Path(django_scale.__file__).resolve().parent
    lengths = {
        str(p.relative_to(package_dir)): len(p.read_text().splitlines()) for p in package_dir.rglob("*.py")
    }
    long = {name: n for name, n in lengths.items() if n > 600}
    assert not long, long
