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
