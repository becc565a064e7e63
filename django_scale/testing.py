"""Helpers for the test suites of projects that use django-scale."""

from __future__ import annotations

from typing import Any

from django.test.utils import TestContextDecorator, override_settings

from django_scale.conf import conf

__all__ = ["override_scale_settings"]


class override_scale_settings(override_settings):  # noqa: N801 - named like override_settings
    """Override some ``DJANGO_SCALE`` keys, keeping the others the project set.

    Use it like :func:`django.test.override_settings`: as a decorator on a test function or
    class, or as a context manager. The merge happens when it is entered, so it stacks with
    other overrides made before it.
    """

    def __init__(self, **keys: Any) -> None:
        self.scale_keys = keys
        super().__init__()

    def enable(self) -> None:
        merged = {**conf.user_settings(), **self.scale_keys}
        self.options = {"DJANGO_SCALE": merged}
        super().enable()

    def decorate_class(self, cls: type) -> type:
        # override_settings freezes its options onto a SimpleTestCase subclass when the class
        # is decorated, before there is anything to merge with; enter per test instead.
        return TestContextDecorator.decorate_class(self, cls)
