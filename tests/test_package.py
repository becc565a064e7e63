"""What a user gets from ``pip install django-scale``."""

from __future__ import annotations

import os
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
