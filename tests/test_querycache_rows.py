"""How the query cache stores rows (django_scale.cache.queries.rows): a model query's values.

A model query's entry holds the values its SQL compiler returned, and every read builds the
instances with ``Model.from_db()`` as Django's ``ModelIterable`` does; other querysets keep
their rows pickled. These tests check that a hit returns what the query without the cache
returns (fields, annotations, deferred fields, the instance's state), that ``from_db()`` and
its signals run as without the cache, that an entry of the older format is a miss, and pin the
compiler attributes the values are read with.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_querycache
from django.db import connections
from django.db.models import Count, F, Model, Value
from django.db.models.functions import Lower
from django.db.models.signals import post_init
from django.test.utils import CaptureQueriesContext
from support import counter

from django_scale.cache.queries import compiled, rows
from django_scale.cache.queries.shared import MARKER
from django_scale.cache.queries.storing import writer
from django_scale.conf import conf
from django_scale.replicas import use_primary

from testapp.models import Post, Reporter

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])
# test_querycache's fixtures: a clean state around each test, and the query cache on.
_clean = test_querycache._clean
querycache = test_querycache.querycache


def loaded(instance: Model) -> dict[str, Any]:
    """What an instance holds: its attributes (fields, annotations), its class, its state."""
    values = {name: value for name, value in instance.__dict__.items() if name != "_state"}
    return {
        "class": type(instance),
        "values": values,
        "deferred": instance.get_deferred_fields(),
        "adding": instance._state.adding,
        "db": instance._state.db,
    }


def entries(cache: Any) -> list[tuple[Any, ...]]:
    """The query cache entries in Redis, decoded."""
    client = cache.client.get_client(write=True)
    return [cache.client.decode(client.get(key)) for key in client.keys("*qc:{qc}:e:*")]


def served(queryset: Any) -> tuple[list[Any], int]:
    """The rows of *queryset* (cached) on the primary, and the queries that read them."""
    with use_primary(), CaptureQueriesContext(connections["default"]) as captured:
        found = list(queryset)
    return found, len(captured.captured_queries)


def querysets() -> dict[str, Any]:
    return {
        "plain": Post.objects.order_by("id"),
        "only": Post.objects.only("title").order_by("id"),
        "defer": Post.objects.defer("title").order_by("-id"),
        "annotated": Post.objects.annotate(n=Count("tags"), double=F("id") * 2, one=Value(1)).order_by("id"),
        "extra select": Post.objects.extra(select={"shout": "UPPER(title)"}).order_by("id"),
        "ordered by what it does not select": Post.objects.distinct().order_by(Lower("title")),
    }


@pytest.fixture
def posts() -> list[Post]:
    ann = Reporter.objects.create(name="ann")
    bob = Reporter.objects.create(name="bob")
    return [
        Post.objects.create(reporter=ann, editor=bob, title="first"),
        Post.objects.create(reporter=bob, title="second"),
        Post.objects.create(reporter=ann, title="third"),
    ]


@REPLICA
@pytest.mark.parametrize("name", list(querysets()))
def test_a_hit_builds_what_the_query_returns(querycache: Any, posts: list[Post], name: str) -> None:
    with use_primary():
        plain = [loaded(post) for post in querysets()[name]]
    assert len(plain) == 3
    miss, _ = served(querysets()[name].cached())
    assert [loaded(post) for post in miss] == plain
    hit, queries = served(querysets()[name].cached())
    assert queries == 0
    assert [loaded(post) for post in hit] == plain
    assert counter("querycache.hit") == 1
    # The entry holds values, not instances.
    assert writer.flush()
    (entry,) = entries(querycache)
    assert entry[0] == MARKER
    assert all(isinstance(row, tuple) for row in entry[-1])
    assert not any(isinstance(value, Model) for row in entry[-1] for value in row)


@REPLICA
def test_a_deferred_field_of_a_hit_loads_as_without_the_cache(querycache: Any, posts: list[Post]) -> None:
    served(Post.objects.only("title").order_by("id").cached())
    hit, _ = served(Post.objects.only("title").order_by("id").cached())
    with use_primary(), CaptureQueriesContext(connections["default"]) as captured:
        assert hit[0].reporter_id == posts[0].reporter_id
    assert len(captured.captured_queries) == 1


@REPLICA
def test_from_db_and_its_signals_run_on_a_hit(querycache: Any, posts: list[Post]) -> None:
    """Without the cache Django builds each row with ``from_db()``, whose ``__init__`` sends
    ``post_init``: a hit does too (a pickled instance was restored without either)."""
    built: list[Any] = []

    def note(sender: Any, instance: Any, **kwargs: Any) -> None:
        built.append(instance)

    post_init.connect(note, sender=Post)
    try:
        served(Post.objects.order_by("id").cached())
        built.clear()
        hit, queries = served(Post.objects.order_by("id").cached())
    finally:
        post_init.disconnect(note, sender=Post)
    assert queries == 0
    assert built == hit
    assert [post.title for post in hit] == ["first", "second", "third"]


@REPLICA
def test_changing_a_hits_instances_changes_no_entry(querycache: Any, posts: list[Post]) -> None:
    served(Post.objects.order_by("id").cached())
    hit, _ = served(Post.objects.order_by("id").cached())
    hit[0].title = "changed by the caller"
    again, queries = served(Post.objects.order_by("id").cached())
    assert queries == 0
    assert again[0].title == "first"
    assert again[0] is not hit[0]


@REPLICA
def test_querysets_whose_rows_are_stored_pickled(querycache: Any, posts: list[Post]) -> None:
    """values(), values_list() and select_related() keep their rows pickled as the queryset
    returns them; their hits return what the query does."""
    cases = {
        "values": lambda: Post.objects.order_by("id").values("title", "reporter__name"),
        "values_list": lambda: Post.objects.order_by("id").values_list("title", flat=True),
        "select_related": lambda: Post.objects.select_related("reporter").order_by("id"),
    }
    for name, make in cases.items():
        assert not rows.by_values(make()), name
        with use_primary():
            plain = list(make())
        miss, _ = served(make().cached())
        hit, queries = served(make().cached())
        assert queries == 0, name
        assert miss == plain == hit, name
    hit, _ = served(Post.objects.select_related("reporter").order_by("id").cached())
    with use_primary(), CaptureQueriesContext(connections["default"]) as captured:
        assert [post.reporter.name for post in hit] == ["ann", "bob", "ann"]
    assert captured.captured_queries == []


@REPLICA
def test_a_related_managers_hit_sets_its_instance_on_each_row(querycache: Any, posts: list[Post]) -> None:
    """As without the cache, each row of ``reporter.posts.all()`` has that very reporter."""
    with use_primary():
        ann = Reporter.objects.get(name="ann")
    for hit in (False, True):
        found, queries = served(ann.posts.order_by("id").cached())
        assert queries == 0 if hit else queries >= 1
        assert [post.title for post in found] == ["first", "third"]
        with CaptureQueriesContext(connections["default"]) as captured:
            assert all(post.reporter is ann for post in found)
        assert captured.captured_queries == []
    # The same query from the model's manager shares the entry, and loads its reporters.
    found, queries = served(Post.objects.filter(reporter=ann).order_by("id").cached())
    assert queries == 0
    assert all(post.reporter is not ann and post.reporter_id == ann.pk for post in found)


@REPLICA
def test_an_entry_of_the_older_format_is_a_miss(querycache: Any, posts: list[Post]) -> None:
    """An entry another version wrote under the same key (another marker) is a miss, never an error."""
    served(Post.objects.order_by("id").cached())
    assert writer.flush()
    client = querycache.client.get_client(write=True)
    (key,) = client.keys("*qc:{qc}:e:*")
    older = ("django_scale.querycache.1", *querycache.client.decode(client.get(key))[1:])
    client.set(key, querycache.client.encode(older))
    misses = counter("querycache.miss")
    found, queries = served(Post.objects.order_by("id").cached())
    # The query; behind a transaction pooler every miss asks its server's position too.
    assert queries == 1 + int(conf.transaction_pooled("default"))
    assert counter("querycache.miss") == misses + 1
    assert [post.title for post in found] == ["first", "second", "third"]


@pytest.mark.django_db
@pytest.mark.parametrize("name", list(querysets()))
def test_the_compiler_attributes_the_values_are_read_with(posts: list[Post], name: str) -> None:
    """Pins the compiler's ``select``, ``klass_info``, ``annotation_col_map``, ``col_count``,
    ``has_extra_select`` and ``results_iter(results)`` as rows.py reads them: run as a miss
    runs a query compiled for its key, and read as a miss of a query the memo had reads it
    (compiled again), the instances are those Django's ModelIterable builds."""
    expected = [loaded(post) for post in querysets()[name]]
    compiled.forget()
    queryset = querysets()[name]
    found, compiler = compiled.compile_for_run(queryset.query, "default")
    assert compiler is not None and found.shape is not None
    values, instances = rows.run(found.shape, "default", {}, compiler, found.sql, found.params)
    # Columns the ordering added (DISTINCT with an order by an expression) are cut off.
    assert all(len(row) == compiler.col_count for row in values)
    assert [loaded(post) for post in instances] == expected
    assert [loaded(post) for post in rows.build(found.shape, "default", values, {})] == expected
    _, instances = rows.reader(found.shape, "default")(querysets()[name])
    assert [loaded(post) for post in instances] == expected


@pytest.mark.django_db
def test_only_model_querysets_of_one_model_are_stored_as_values() -> None:
    assert rows.by_values(Post.objects.all())
    assert rows.by_values(Post.objects.only("title").annotate(n=Count("tags")))
    assert not rows.by_values(Post.objects.values("title"))
    assert not rows.by_values(Post.objects.values_list("title"))
    assert not rows.by_values(Post.objects.select_related("reporter"))
    assert rows.by_values(Reporter.objects.create(name="ann").posts.all())
    shape = compiled.compile_query(Post.objects.select_related("reporter").query, "default").shape
    assert shape is None
