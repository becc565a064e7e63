"""ScaleQuerySet and its parts: the manager, the checks of prefetch-aware models, settings."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from django.core import checks
from django.db import models
from django.test.utils import isolate_apps, override_settings

from django_scale.checks import check_querysets
from django_scale.prefetch import HAS_FETCH_MODES, PrefetchAwareForeignKey
from django_scale.querysets import (
    ApproxCountQuerySetMixin,
    PrefetchAwareManager,
    PrefetchAwareQuerySetMixin,
    ScaleQuerySet,
)
from django_scale.testing import override_scale_settings

from testapp.models import Post, Tag


def test_scale_queryset_combines_approximate_counts_and_peer_loading() -> None:
    assert issubclass(ScaleQuerySet, ApproxCountQuerySetMixin)
    assert issubclass(ScaleQuerySet, PrefetchAwareQuerySetMixin)
    assert isinstance(Post.objects, PrefetchAwareManager)
    assert isinstance(Post.objects.all(), ScaleQuerySet)


def test_related_managers_are_prefetch_aware_managers(db: None) -> None:
    post = Post(pk=1)
    assert isinstance(post.tags, PrefetchAwareManager)
    assert isinstance(post.replies, PrefetchAwareManager)


@pytest.mark.django_db
def test_approx_count_still_works() -> None:
    Tag.objects.bulk_create(Tag(name=str(i)) for i in range(3))
    assert Tag.objects.approx_count() == 3


def test_check_is_registered() -> None:
    assert check_querysets in checks.registry.registry.get_checks()


def test_the_test_models_pass_the_queryset_checks() -> None:
    assert check_querysets() == []


def test_w401_related_model_with_two_plain_managers() -> None:
    with isolate_apps("testapp") as registry:

        class Shelf(models.Model):  # noqa: DJ008 - a model for one check
            objects = ScaleQuerySet.as_manager()

            class Meta:
                app_label = "testapp"

        class Label(models.Model):  # noqa: DJ008 - a model for one check
            class Meta:
                app_label = "testapp"

        class Book(models.Model):  # noqa: DJ008 - a model for one check
            shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")
            labels = models.ManyToManyField(Label)
            # A second manager: shelf.books(manager="paperbacks") reads the prefetch cache too.
            objects = models.Manager()
            paperbacks = models.Manager()

            class Meta:
                app_label = "testapp"

        class Plank(models.Model):  # noqa: DJ008 - a model for one check
            shelf = PrefetchAwareForeignKey(Shelf, models.CASCADE, related_name="planks")
            objects = ScaleQuerySet.as_manager()

            class Meta:
                app_label = "testapp"

        messages = check_querysets(app_configs=[registry.get_app_config("testapp")])
    assert [message.id for message in messages] == ["django_scale.W401"]
    assert "Shelf.books.all()" in messages[0].msg
    assert "testapp.Book" in messages[0].hint
    assert messages[0].hint.endswith("#django-scale-w401")
    assert messages[0].obj is Shelf  # `manage.py check` prints "testapp.Shelf: ..."


def test_no_w401_for_a_manager_built_from_a_plain_manager() -> None:
    # Item's related managers read the rows' prefetch cache, where peers' rows are.
    with isolate_apps("testapp") as registry:

        class Box(models.Model):  # noqa: DJ008 - a model for one check
            objects = ScaleQuerySet.as_manager()

            class Meta:
                app_label = "testapp"

        class Item(models.Model):  # noqa: DJ008 - a model for one check
            box = PrefetchAwareForeignKey(Box, models.CASCADE, related_name="items")
            objects = models.Manager.from_queryset(ScaleQuerySet)()

            class Meta:
                app_label = "testapp"

        messages = check_querysets(app_configs=[registry.get_app_config("testapp")])
    assert [message.id for message in messages] == []


def test_w403_plain_foreign_key_before_django_61() -> None:
    with isolate_apps("testapp") as registry:

        class Crate(models.Model):  # noqa: DJ008 - a model for one check
            objects = ScaleQuerySet.as_manager()

            class Meta:
                app_label = "testapp"

        class Bottle(models.Model):  # noqa: DJ008 - a model for one check
            crate = models.ForeignKey(Crate, models.CASCADE, related_name="bottles")
            objects = ScaleQuerySet.as_manager()

            class Meta:
                app_label = "testapp"

        messages = check_querysets(app_configs=[registry.get_app_config("testapp")])
    if HAS_FETCH_MODES:
        assert messages == []  # the fetch mode peer-loads a plain ForeignKey
    else:
        assert [message.id for message in messages] == ["django_scale.W403"]
        assert "Bottle.crate is a plain ForeignKey" in messages[0].msg
        assert "PrefetchAwareForeignKey" in messages[0].hint


@pytest.mark.parametrize(("debug", "expected"), [(False, ["django_scale.W402"]), (True, [])])
def test_w402_raise_mode_in_production(debug: bool, expected: list[str]) -> None:
    with override_settings(DEBUG=debug), override_scale_settings(N_PLUS_ONE="raise"):
        assert [message.id for message in check_querysets()] == expected


@pytest.mark.parametrize(
    ("key", "value", "check_id"),
    [
        ("N_PLUS_ONE", "loud", "django_scale.E003"),
        ("N_PLUS_ONE", 1, "django_scale.E002"),
        ("N_PLUS_ONE_SAMPLE_RATE", 2, "django_scale.E003"),
    ],
)
def test_n_plus_one_settings_are_validated(key: str, value: Any, check_id: str) -> None:
    from django_scale.checks import check_settings

    with override_scale_settings(**{key: value}):
        assert [message.id for message in check_settings()] == [check_id]


class _ServingQuerySet(models.QuerySet):  # type: ignore[type-arg]
    """A queryset class of a caching package's kind: it serves a query's rows a second time
    from its own store, pickled, in ``_fetch_all()`` (django-cacheops wraps
    ``QuerySet._fetch_all``)."""

    store: dict[str, bytes] = {}

    def _fetch_all(self) -> None:
        if self._result_cache is None:
            key = str(self.query)
            if key in self.store:
                self._result_cache = pickle.loads(self.store[key])
            else:
                super()._fetch_all()
                self.store[key] = pickle.dumps(self._result_cache)
        super()._fetch_all()


class _ServedScaleQuerySet(PrefetchAwareQuerySetMixin, _ServingQuerySet):
    pass


def test_a_queryset_class_after_the_mixin_still_serves_the_rows(db: None) -> None:
    # PrefetchAwareQuerySetMixin loads rows through the _fetch_all() of the classes after it:
    # it used to build them itself, so a package that serves rows there (django-cacheops' cache)
    # never got to, and every read ran its query. The rows still get their peers, and
    # prefetch_related() still runs after them.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from testapp.models import Article, Author, Profile, Reporter

    _ServingQuerySet.store.clear()
    for n in range(3):
        author = Author.objects.create(name=f"a{n}")
        Article.objects.create(author=author, title=f"t{n}")
        Profile.objects.create(reporter=Reporter.objects.create(name=f"r{n}"), bio=f"b{n}")

    def authors() -> list[Author]:
        return list(_ServedScaleQuerySet(model=Author).prefetch_related("articles").order_by("id"))

    with CaptureQueriesContext(connection) as first:
        assert [a.name for a in authors()] == ["a0", "a1", "a2"]
    assert len(first.captured_queries) == 2  # the authors, their articles
    with CaptureQueriesContext(connection) as served:
        rows = authors()
        assert [[article.title for article in a.articles.all()] for a in rows] == [["t0"], ["t1"], ["t2"]]
    assert len(served.captured_queries) == 1, served.captured_queries  # the prefetch only

    list(_ServedScaleQuerySet(model=Reporter).order_by("id"))
    with CaptureQueriesContext(connection) as peers:
        reporters = list(_ServedScaleQuerySet(model=Reporter).order_by("id"))
        assert [r.profile.bio for r in reporters] == ["b0", "b1", "b2"]
    assert len(peers.captured_queries) == 1, peers.captured_queries  # the profiles of all three
