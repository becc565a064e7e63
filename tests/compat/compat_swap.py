"""Swap django-scale's classes into Django's own test suites, and prove the swap happened.

This module belongs to the compatibility harness (``tests/compat/``), never to django_scale:
it patches Django's *test harness and test apps* (names in ``django.contrib.admin`` and
``django.db.models`` that the test apps look up when they are imported), which is allowed here
and nowhere else. django_scale itself patches nothing.

The swapped-in classes carry Django's names (``ModelAdmin``, ``Manager``, ``ForeignKey``,
``OneToOneField``) so that messages and ``repr()`` strings Django's tests compare read as
with stock Django: a difference the job reports is one of behaviour, not of a class name.
"""

from __future__ import annotations

from typing import Any

PROFILES: dict[str, list[str]] = {
    "admin": ["admin_changelist", "admin_filters", "admin_views", "admin_inlines", "admin_ordering"],
    "orm": [
        "prefetch_related",
        "many_to_one",
        "many_to_many",
        "one_to_one",
        "select_related",
        "foreign_object",
        "generic_relations",
        "m2m_through",
        "known_related_objects",
        "queries",
        "fixtures",
        "model_inheritance",
        "delete",
    ],
}


def swap(profile: str) -> None:
    """Make the classes Django's test apps subclass or get by default django-scale's.

    Call it after ``django.setup()`` has loaded the contrib apps and before the test apps'
    ``models``/``admin`` modules are imported (runtests.py imports them after).
    """
    if profile == "admin":
        _swap_admin()
    elif profile == "orm":
        _swap_orm()
    else:
        raise SystemExit(f"unknown profile {profile!r}")


def _swap_admin() -> None:
    from django.contrib import admin
    from django.contrib.admin import options, sites

    from django_scale.admin import ScaleModelAdmin

    class ModelAdmin(ScaleModelAdmin):
        """ScaleModelAdmin under Django's name (see the module docstring)."""

    ModelAdmin.__module__ = __name__
    ModelAdmin.__qualname__ = "ModelAdmin"
    # `admin.ModelAdmin` is what the test apps subclass; `options.ModelAdmin` what some tests
    # instantiate directly; `sites.ModelAdmin` what `site.register(Model)` without an admin
    # class uses (django/contrib/admin/sites.py: `admin_class = admin_class or ModelAdmin`).
    admin.ModelAdmin = options.ModelAdmin = sites.ModelAdmin = ModelAdmin  # type: ignore[misc]


def _manager_class() -> Any:
    from django_scale.querysets import PrefetchAwareManager, ScaleQuerySet

    class Manager(PrefetchAwareManager.from_queryset(ScaleQuerySet)):  # type: ignore[misc]
        """Every model's default manager: ScaleQuerySet's, prefetch-aware."""

    # Migrations' deconstruct() imports the manager class by module and name.
    Manager.__module__ = __name__
    Manager.__qualname__ = "Manager"
    globals()["Manager"] = Manager
    return Manager


def _swap_orm() -> None:
    from django.db import models
    from django.db.models import base

    from django_scale.prefetch import HAS_FETCH_MODES, PrefetchAwareForeignKey, PrefetchAwareOneToOneField
    from django_scale.querysets import ScaleQuerySet

    manager = _manager_class()
    # `models.Manager` is what test apps instantiate or subclass; `base.Manager` is the
    # auto-created `objects` (django/db/models/base.py, ModelBase._prepare()).
    models.Manager = base.Manager = manager  # type: ignore[misc]
    # Custom querysets of the test apps (`class XQuerySet(models.QuerySet)`, `.as_manager()`)
    # become ScaleQuerySets too. Django's own code uses django.db.models.query.QuerySet.
    models.QuerySet = ScaleQuerySet  # type: ignore[misc]
    if not HAS_FETCH_MODES:
        # Django <= 6.0: forward FK/O2O peer loading needs the fields' descriptors.
        class ForeignKey(PrefetchAwareForeignKey):
            pass

        class OneToOneField(PrefetchAwareOneToOneField):
            pass

        for cls, name in ((ForeignKey, "ForeignKey"), (OneToOneField, "OneToOneField")):
            cls.__module__ = __name__
            cls.__qualname__ = cls.__name__ = name
        models.ForeignKey = ForeignKey  # type: ignore[misc]
        # Multi-table inheritance parent links (django/db/models/base.py, ModelBase.__new__).
        models.OneToOneField = base.OneToOneField = OneToOneField  # type: ignore[misc,attr-defined]


def verify(profile: str) -> list[str]:
    """Return why the swap did not happen for the loaded test apps (empty when it did).

    Call it after the test modules are imported (the suite is built).
    """
    if profile == "admin":
        return _verify_admin()
    return _verify_orm()


def _verify_admin() -> list[str]:
    import sys

    from django.contrib import admin
    from django.contrib.admin import AdminSite
    from django.contrib.admin.options import BaseModelAdmin, InlineModelAdmin

    from django_scale.admin import ScaleModelAdmin

    problems: list[str] = []
    if not issubclass(admin.ModelAdmin, ScaleModelAdmin):
        problems.append(f"django.contrib.admin.ModelAdmin is {admin.ModelAdmin!r}")
    labels = set(PROFILES["admin"])
    sites: dict[int, AdminSite] = {}
    classes: set[type] = set()
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in labels:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, AdminSite):
                sites[id(value)] = value
            elif (
                isinstance(value, type)
                and issubclass(value, BaseModelAdmin)
                and not issubclass(value, InlineModelAdmin)
                and value.__module__.split(".")[0] in labels
            ):
                classes.add(value)
    # Every ModelAdmin class the test apps define, and every one registered on their sites.
    for cls in classes:
        if not issubclass(cls, ScaleModelAdmin):
            problems.append(f"{cls.__module__}.{cls.__qualname__} is not a ScaleModelAdmin")
    registered = 0
    for site in sites.values():
        for model, model_admin in site._registry.items():
            registered += 1
            if not isinstance(model_admin, ScaleModelAdmin):
                problems.append(f"{site.name}: {model._meta.label} has {type(model_admin).__qualname__}")
    if not classes and not registered:
        problems.append("the test apps define and register no ModelAdmin")
    print(
        f"compat: {len(classes)} ModelAdmin classes of the test apps and {registered} registered "
        f"ModelAdmins on {len(sites)} admin sites are ScaleModelAdmins"
    )
    return problems


def _verify_orm() -> list[str]:
    from django.apps import apps
    from django.db.models.fields import related

    from django_scale.prefetch import HAS_FETCH_MODES, PrefetchAwareForeignKey, PrefetchAwareOneToOneField
    from django_scale.querysets import PrefetchAwareManager, ScaleQuerySet

    problems: list[str] = []
    checked = fields = 0
    for label in PROFILES["orm"]:
        try:
            config = apps.get_app_config(label)
        except LookupError:
            continue  # not part of this run
        for model in config.get_models(include_auto_created=True):
            checked += 1
            manager = model._default_manager
            queryset = manager.get_queryset()
            if not isinstance(manager, PrefetchAwareManager) or not isinstance(queryset, ScaleQuerySet):
                problems.append(
                    f"{model._meta.label}: default manager {type(manager).__qualname__} "
                    f"gives {type(queryset).__qualname__}"
                )
            if HAS_FETCH_MODES:
                continue
            for field in model._meta.local_fields:
                if isinstance(field, related.OneToOneField):
                    expected: type = PrefetchAwareOneToOneField
                elif isinstance(field, related.ForeignKey):
                    expected = PrefetchAwareForeignKey
                else:
                    continue
                fields += 1
                if not isinstance(field, expected):
                    problems.append(f"{model._meta.label}.{field.name}: {type(field).__qualname__}")
    if not checked:
        problems.append("no model of the test apps was loaded")
    print(
        f"compat: {checked} models have prefetch-aware ScaleQuerySet default managers"
        + ("" if HAS_FETCH_MODES else f", {fields} FK/O2O fields are PrefetchAware fields")
    )
    return problems
