"""Peer loading and N+1 detection: exact query counts for every relation kind, on both backends."""

from __future__ import annotations

import copy
import gc
import logging
import pickle
import sqlite3
import sys
import tracemalloc
from typing import Any

import pytest
from django.db import connections
from django.db.models import Prefetch, QuerySet
from prefetch_data import POSTS, build, count, stock
from support import wait_until

from django_scale.exceptions import ArgumentError, NPlusOneError, NPlusOneWarning, PrefetchBypassedWarning
from django_scale.prefetch import HAS_FETCH_MODES, detect_n_plus_one, detection, peer_group
from django_scale.replicas import monitor, parse_lsn
from django_scale.testing import forbid_n_plus_one

from testapp.models import Post, Profile, Reply, Reporter, Tag

# -- Forward foreign keys and one-to-one fields ----------------------------------------------


def test_forward_foreign_key_loads_for_all_peers_in_one_query(data: None) -> None:
    with count() as queries:
        posts = list(Post.objects.all())
        reporters = [post.reporter.name for post in posts]
    assert len(queries) == 2
    assert reporters == [post.reporter.name for post in stock(Post).select_related("reporter").order_by("id")]


def test_nullable_foreign_key_needs_no_query_for_null_rows(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        editors = [post.editor for post in posts]
    assert len(queries) == 1
    assert editors.count(None) == len([post for post in stock(Post) if post.editor_id is None]) > 0


def test_reverse_one_to_one_loads_for_all_peers_and_keeps_missing_ones_missing(data: None) -> None:
    reporters = list(Reporter.objects.all())
    with count() as queries:
        bios = []
        for reporter in reporters:
            try:
                bios.append(reporter.profile.bio)
            except Profile.DoesNotExist:
                bios.append(None)
    assert len(queries) == 1
    assert bios == ["bio 0", "bio 1", "bio 2", "bio 3", None]


def test_forward_one_to_one_fills_the_reverse_side(data: None) -> None:
    profiles = list(Profile.objects.order_by("id"))
    with count() as queries:
        names = [profile.reporter.name for profile in profiles]
        again = [profile.reporter.profile is profile for profile in profiles]
    assert len(queries) == 1
    assert names == ["reporter 0", "reporter 1", "reporter 2", "reporter 3"]
    assert all(again)


def test_loaded_rows_are_peers_too(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        bios = {
            post.reporter.profile.bio if post.reporter_id != posts[4].reporter_id else "" for post in posts
        }
    assert len(queries) == 2  # reporters, then their profiles
    assert bios == {"bio 0", "bio 1", "bio 2", "bio 3", ""}


def test_rows_joined_by_select_related_are_peers_too(data: None) -> None:
    posts = list(Post.objects.select_related("reporter"))
    with count() as queries:
        bios = {post.reporter.profile.bio for post in posts if post.reporter.name != "reporter 4"}
    assert len(queries) == 1
    assert bios == {"bio 0", "bio 1", "bio 2", "bio 3"}


def test_a_single_object_loads_alone(data: None) -> None:
    post = Post.objects.get(title="post 1")
    assert peer_group(post) is None
    with count() as queries:
        assert post.reporter.name == "reporter 1"
    assert len(queries) == 1


def test_deferred_fields_load_for_all_peers_on_django_61(data: None) -> None:
    posts = list(Post.objects.defer("title"))
    with count() as queries:
        titles = [post.title for post in posts]
    # Django 6.1's fetch-mode hook covers deferred fields; before it, Django loads them alone.
    assert len(queries) == (1 if HAS_FETCH_MODES else POSTS)
    assert titles == [f"post {i}" for i in range(POSTS)]


def test_select_related_is_respected(data: None) -> None:
    with count() as queries:
        posts = list(Post.objects.select_related("reporter"))
        names = {post.reporter.name for post in posts}
    assert len(queries) == 1
    assert len(names) == 5


# -- Reverse foreign keys and many-to-many ---------------------------------------------------


def test_reverse_foreign_key_all_loads_for_all_peers(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        bodies = [[reply.body for reply in post.replies.all()] for post in posts]
        back = all(reply.post is post for post in posts for reply in post.replies.all())
    assert len(queries) == 1
    assert bodies == [
        [reply.body for reply in stock(Reply).filter(post=post).order_by("id")] for post in posts
    ]
    assert back


def test_many_to_many_all_loads_for_all_peers(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        names = [[tag.name for tag in post.tags.all()] for post in posts]
    assert len(queries) == 1
    assert names == [
        list(stock(Tag).filter(posts=post).order_by("name").values_list("name", flat=True)) for post in posts
    ]
    assert any(names) and not all(names)


def test_reverse_many_to_many_all_loads_for_all_peers(data: None) -> None:
    tags = list(Tag.objects.all())
    with count() as queries:
        titles = [sorted(post.title for post in tag.posts.all()) for tag in tags]
    assert len(queries) == 1
    assert titles == [sorted(stock(Post).filter(tags=tag).values_list("title", flat=True)) for tag in tags]


@pytest.mark.parametrize("relation", ["replies", "tags"])
def test_count_is_one_grouped_query_and_loads_no_rows(data: None, relation: str) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        counts = [getattr(post, relation).count() for post in posts]
    assert len(queries) == 1
    assert "COUNT(" in queries[0]["sql"].upper()
    assert counts == [i % 4 for i in range(POSTS)]
    assert all(relation not in post.__dict__.get("_prefetched_objects_cache", {}) for post in posts)


@pytest.mark.parametrize("relation", ["replies", "tags"])
def test_exists_is_one_grouped_query(data: None, relation: str) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        found = [getattr(post, relation).exists() for post in posts]
    assert len(queries) == 1
    assert found == [i % 4 > 0 for i in range(POSTS)]


def test_count_of_all_is_grouped_too(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        counts = [post.replies.all().count() for post in posts]
    assert len(queries) == 1
    assert counts == [i % 4 for i in range(POSTS)]


def test_the_list_page_takes_four_queries(data: None) -> None:
    """The issue's list page: rows, author, tags and comment count, no hand-written lookups."""
    with count() as queries:
        page = [
            (post.title, post.reporter.name, [tag.name for tag in post.tags.all()], post.replies.count())
            for post in Post.objects.all()
        ]
    assert len(queries) == 4
    assert len(page) == POSTS


def test_a_sliced_relation_is_never_batched(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        first = [list(post.replies.all()[:1]) for post in posts]
    assert len(queries) == POSTS
    assert [len(rows) for rows in first] == [min(1, i % 4) for i in range(POSTS)]


def test_a_filtered_relation_queries_per_row_with_the_filter(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        approved = [post.replies.filter(approved=True).count() for post in posts]
    assert len(queries) == POSTS
    assert approved == [stock(Reply).filter(post=post, approved=True).count() for post in posts]


def test_explicit_prefetch_queryset_is_respected(data: None) -> None:
    approved = Prefetch("replies", queryset=Reply.objects.filter(approved=True))
    with count() as queries:
        posts = list(Post.objects.prefetch_related(approved))
        bodies = [[reply.body for reply in post.replies.all()] for post in posts]
        counts = [post.replies.count() for post in posts]
    assert len(queries) == 2
    assert all(body.endswith((".0", ".2")) for rows in bodies for body in rows)
    assert counts == [len(rows) for rows in bodies]


# -- Related managers answer from the prefetch cache -----------------------------------------


def test_prefetched_relation_answers_every_call_without_a_query(data: None) -> None:
    posts = list(Post.objects.prefetch_related("replies", "tags"))
    post = posts[3]
    with count() as queries:
        answers = (
            post.replies.count(),
            post.replies.exists(),
            len(post.replies.all()),
            bool(post.replies.all()),
            post.replies.first().body,
            post.tags.first().name,
            post.tags.count(),
        )
    assert len(queries) == 0
    assert answers == (3, True, 3, True, "reply 3.0", "tag 0", 3)
    # last() of an explicit prefetch queries, as Django's does (reverse() drops the cache).
    with count() as queries:
        assert (post.replies.last().body, post.tags.last().name) == ("reply 3.2", "tag 3")
    assert len(queries) == 2
    empty = posts[0]
    with count() as queries:
        assert (empty.replies.first(), empty.replies.exists()) == (None, False)
    assert len(queries) == 0


def test_first_and_last_of_a_peer_loaded_relation_need_no_query(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        firsts = [(post.replies.all() or [None])[0] for post in posts]
        lasts = [post.replies.last() for post in posts]
    assert len(queries) == 1
    assert [reply.body if reply else None for reply in firsts] == [
        f"reply {i}.0" if i % 4 else None for i in range(POSTS)
    ]
    assert [reply.body if reply else None for reply in lasts] == [
        f"reply {i}.{i % 4 - 1}" if i % 4 else None for i in range(POSTS)
    ]


def test_filtering_a_prefetched_relation_row_by_row_warns_that_the_prefetch_is_bypassed(data: None) -> None:
    posts = list(Post.objects.prefetch_related("replies"))
    list(posts[3].replies.filter(approved=True))  # one row doing it is no pattern
    with pytest.warns(
        PrefetchBypassedWarning, match=r"Post\.replies\.filter\(\) on a prefetched relation"
    ) as caught:
        approved = [list(post.replies.filter(approved=True)) for post in posts[4:8]]
    assert len(caught) == 1  # once per result set
    if sys.version_info >= (3, 12):  # skip_file_prefixes names the user's line
        assert caught[0].filename == __file__
    assert [reply.body for reply in approved[1]] == ["reply 5.0"]


def test_django_internal_filtering_of_a_prefetched_relation_does_not_warn(data: None) -> None:
    reporter = list(Reporter.objects.prefetch_related("edited_posts"))[2]
    post = reporter.edited_posts.all()[0]
    reporter.edited_posts.remove(post)  # Django filters the prefetched relation itself
    assert post not in stock(Post).filter(editor=reporter)


# -- iterator() ------------------------------------------------------------------------------


def test_iterator_makes_each_chunk_a_set_of_peers(data: None) -> None:
    with count() as queries:
        names = [post.reporter.name for post in Post.objects.iterator(chunk_size=5)]
    # The rows (one query), then the reporters once per chunk of 5: 3 chunks.
    assert len(queries) == 1 + 3
    assert names == [f"reporter {i % 5}" for i in range(POSTS)]


def test_iterator_releases_each_chunk(data: None) -> None:
    iterator = Post.objects.iterator(chunk_size=5)
    first = next(iterator)
    group = peer_group(first)
    assert group is not None and len(group) == 5
    for _ in range(5):
        next(iterator)
    assert len(group) == 0
    iterator.close()


@pytest.mark.django_db
def test_iterator_memory_stays_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    # Behind a transaction pooler the suite disables server-side cursors, as deployments must
    # for autocommit code; in a transaction (this test's) a server-side cursor lives on the
    # transaction's server connection, which works through PgBouncer: chunk in it.
    monkeypatch.setitem(connections["default"].settings_dict, "DISABLE_SERVER_SIDE_CURSORS", False)
    reporter = Reporter.objects.create(name="prolific")
    Post.objects.bulk_create(Post(reporter=reporter, title="x" * 150) for _ in range(6000))

    def peak(rows: int) -> int:
        gc.collect()
        tracemalloc.start()
        for post in Post.objects.all()[:rows].iterator(chunk_size=500):
            post.reporter  # noqa: B018 - load the relation, as a page would
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size

    small, large = peak(1500), peak(6000)
    # Four times the rows, the same chunks: the peak must not grow with the row count.
    assert large < small * 1.5, (small, large)


# -- Huge peer sets ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_huge_peer_sets_use_one_statement_shape_or_chunks() -> None:
    reporters = Reporter.objects.bulk_create(Reporter(name=f"r{i}") for i in range(1200))
    Post.objects.bulk_create(Post(reporter=reporter, title="t") for reporter in reporters)
    connection = connections["default"]
    posts = list(Post.objects.all())
    if connection.vendor == "postgresql":
        with count() as queries:
            names = {post.reporter.name for post in posts}
        assert len(queries) == 1
        assert "= ANY(" in queries[0]["sql"]
        assert len(names) == 1200
        return
    # SQLite: lower its real variable limit where Python can (3.11+); 3.10 assumes 999.
    raw = connection.connection
    original = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if hasattr(raw, "getlimit") else None
    limit = 500 if original is not None else 999
    if original is not None:
        raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
    try:
        with count() as queries:
            names = {post.reporter.name for post in posts}
    finally:
        if original is not None:
            raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, original)
    assert len(names) == 1200
    assert len(queries) >= 3 if limit == 500 else len(queries) >= 2
    assert all(query["sql"].count("%s") + query["sql"].count(", ") < limit for query in queries)


# -- Alias pinning ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_follow_up_loads_use_the_alias_the_rows_came_from(replica: Any) -> None:
    build()
    target = parse_lsn(replica.primary_lsn())
    replica.wait_for_replay()
    wait_until(lambda: monitor("replica").is_available(None, target), "the replica to be available")
    with count("replica") as on_replica, count("default") as on_primary:
        posts = list(Post.objects.all())
        assert {post._state.db for post in posts} == {"replica"}
        page = [
            (post.reporter.name, [tag.name for tag in post.tags.all()], post.replies.count())
            for post in posts
        ]
        profiles = [post.reporter.profile.bio for post in posts if post.reporter.name != "reporter 4"]
    assert len(on_replica) == 5
    assert len(on_primary) == 0
    assert len(page) == POSTS and len(profiles) == POSTS - 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "mirror"])
def test_follow_up_loads_stay_on_an_explicit_alias() -> None:
    build()
    posts = list(Post.objects.using("mirror"))
    assert len(posts) == POSTS
    with count("mirror") as on_mirror, count("default") as on_default:
        [post.reporter for post in posts]
        [list(post.replies.all()) for post in posts]
    assert (len(on_mirror), len(on_default)) == (2, 0)


# -- Pickling and opting out -----------------------------------------------------------------


def test_a_pickled_row_carries_no_peers(data: None) -> None:
    posts = list(Post.objects.all())
    posts[0].reporter  # noqa: B018
    copy = pickle.loads(pickle.dumps(posts[1]))
    assert peer_group(copy) is None
    assert len(pickle.dumps(posts[1])) < 2000
    assert copy.reporter.name == posts[1].reporter.name


def test_assigning_none_to_a_relation_loads_nothing(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        for post in posts:
            post.editor = None
    assert len(queries) == 0
    assert all(post.editor is None for post in posts)


def test_a_copied_related_queryset_does_not_copy_the_peers(data: None) -> None:
    posts = list(Post.objects.all())
    replies = posts[3].replies.all()
    copied = copy.deepcopy(replies)
    with count() as queries:
        assert [reply.body for reply in copied] == ["reply 3.0", "reply 3.1", "reply 3.2"]
    assert len(queries) == 1
    assert "replies" not in posts[0].__dict__.get("_prefetched_objects_cache", {})


def test_refreshed_row_still_loads_correctly(data: None) -> None:
    posts = list(Post.objects.all())
    posts[2].refresh_from_db()
    assert [post.reporter.name for post in posts] == [f"reporter {i % 5}" for i in range(POSTS)]


def test_the_field_cache_keeps_the_group_through_django_loads(data: None) -> None:
    """Pin what prefetch.peers.PeerFieldsCache relies on, on every Django of the matrix."""
    posts = list(Post.objects.select_related("editor"))
    cache = posts[1]._state.fields_cache
    posts[1].reporter  # noqa: B018
    posts[1].editor = None
    posts[1].refresh_from_db()
    # Django reads and writes relation caches in the row's own dict, never replacing it...
    assert posts[1]._state.fields_cache is cache or HAS_FETCH_MODES
    assert peer_group(posts[1]) is peer_group(posts[0]) is not None
    field: Any = Post._meta.get_field("reporter")
    assert field.get_cached_value(posts[2]) is posts[2]._state.fields_cache["reporter"]
    # ...and copies or pickles of a row get a plain one: no peers.
    assert peer_group(copy.copy(posts[1])) is None or HAS_FETCH_MODES
    assert type(pickle.loads(pickle.dumps(posts[1]))._state.fields_cache) is dict


def test_prefetch_aware_fields_migrate_as_djangos_own() -> None:
    assert Post._meta.get_field("reporter").deconstruct()[1] == "django.db.models.ForeignKey"
    assert Profile._meta.get_field("reporter").deconstruct()[1] == "django.db.models.OneToOneField"


def test_peer_loading_can_be_turned_off(data: None) -> None:
    posts = list(Post.objects.peer_loading(False))
    with count() as queries:
        [post.reporter for post in posts]
    assert len(queries) == POSTS


@pytest.mark.django_db
def test_per_row_tracking_costs_at_most_64_bytes() -> None:
    reporter = Reporter.objects.create(name="r")
    rows = 4000
    Post.objects.bulk_create(Post(reporter=reporter, title="t") for _ in range(rows))

    def held(queryset: QuerySet[Any]) -> int:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        result = list(queryset)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(result) == rows
        return after - before

    plain = min(held(stock(Post)) for _ in range(2))
    aware = min(held(Post.objects.all()) for _ in range(2))
    per_row = (aware - plain) / rows
    print(f"peer tracking: {per_row:.1f} bytes per row")
    assert per_row <= 64, per_row


# -- N+1 detection -----------------------------------------------------------------------------


def test_detection_raises_on_a_relation_loaded_row_by_row(data: None) -> None:
    posts = list(Post.objects.all())
    with (
        pytest.raises(NPlusOneError, match=r"Post\.replies was loaded row by row") as raised,
        forbid_n_plus_one(),
    ):
        for post in posts:
            post.replies.filter(approved=True).count()
    # The error's traceback leads to the user's line.
    assert any(str(entry.path) == __file__ for entry in raised.traceback)


def test_detection_raises_when_peer_loading_is_off(data: None) -> None:
    with pytest.raises(NPlusOneError, match=r"Post\.reporter"), forbid_n_plus_one():
        for post in Post.objects.peer_loading(False):
            post.reporter  # noqa: B018


def test_detection_has_no_false_positive_on_a_single_object(data: None) -> None:
    with forbid_n_plus_one():
        post = Post.objects.get(title="post 3")
        post.reporter  # noqa: B018
        list(post.replies.filter(approved=True))
        list(post.replies.filter(approved=False))
        list(post.tags.all()[:1])


def test_detection_is_quiet_when_peers_load_together(data: None) -> None:
    with forbid_n_plus_one():
        for post in Post.objects.all():
            post.reporter  # noqa: B018
            list(post.tags.all())
            post.replies.count()


def test_unused_eager_load_is_reported_separately(data: None) -> None:
    with (
        pytest.raises(NPlusOneError, match=r"Unused eager load: select_related\('editor'\)"),
        forbid_n_plus_one(),
    ):
        for post in Post.objects.select_related("reporter", "editor"):
            post.reporter  # noqa: B018
    with (
        pytest.raises(NPlusOneError, match=r"Unused eager load: prefetch_related\('tags'\)"),
        forbid_n_plus_one(),
    ):
        for post in Post.objects.prefetch_related("tags", "replies"):
            list(post.replies.all())


def test_used_eager_loads_are_not_reported(data: None) -> None:
    with forbid_n_plus_one():
        for post in Post.objects.select_related("reporter").prefetch_related("tags"):
            post.reporter  # noqa: B018
            list(post.tags.all())


def test_warn_mode_warns_with_the_calling_line(data: None) -> None:
    posts = list(Post.objects.all())
    with pytest.warns(NPlusOneWarning, match=r"Post\.replies") as caught, detect_n_plus_one("warn"):
        for post in posts:
            list(post.replies.all()[:2])
    if sys.version_info >= (3, 12):  # skip_file_prefixes names the user's line
        assert caught[0].filename == __file__
    assert len(caught) == 1


def test_warnings_are_issued_without_skip_file_prefixes(data: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain stacklevel of Python 3.10 and 3.11, tried on every Python."""
    monkeypatch.setattr(detection, "_HAS_SKIP_FILE_PREFIXES", False)
    posts = list(Post.objects.all())
    with pytest.warns(NPlusOneWarning, match=r"Post\.replies") as caught, detect_n_plus_one("warn"):
        for post in posts:
            list(post.replies.all()[:2])
    assert len(caught) == 1
    posts = list(Post.objects.prefetch_related("replies"))
    with pytest.warns(PrefetchBypassedWarning) as bypassed:
        for post in posts[:3]:
            post.replies.filter(approved=True)
    assert len(bypassed) == 1


def test_log_mode_logs_a_sample(data: None, caplog: pytest.LogCaptureFixture) -> None:
    posts = list(Post.objects.all())
    with caplog.at_level(logging.WARNING, "django_scale.prefetch"), detect_n_plus_one("log") as detector:
        for post in posts:
            list(post.replies.all()[:2])
    assert len(detector.findings) == 1
    assert "Post.replies" in caplog.text
    # The record carries the stack, down to the user's line.
    assert f'File "{__file__}"' in caplog.records[0].stack_info
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, "django_scale.prefetch"),
        detect_n_plus_one("log", sample_rate=0) as d,
    ):
        for post in list(Post.objects.all()):
            list(post.replies.all()[:2])
    assert len(d.findings) == 1 and caplog.text == ""


def test_the_setting_sets_the_mode_outside_a_scope(data: None, settings: Any) -> None:
    settings.DJANGO_SCALE = {**settings.DJANGO_SCALE, "N_PLUS_ONE": "raise"}
    with pytest.raises(NPlusOneError):
        for post in Post.objects.all():
            list(post.replies.all()[:1])


def test_forbid_n_plus_one_decorates_a_function(data: None) -> None:
    @forbid_n_plus_one()
    def page() -> None:
        for post in Post.objects.peer_loading(False):
            post.reporter  # noqa: B018

    with pytest.raises(NPlusOneError):
        page()


def test_bad_mode_is_a_clear_error() -> None:
    with pytest.raises(ArgumentError, match=r"mode='loud'") as caught, detect_n_plus_one("loud"):  # type: ignore[arg-type]
        pass
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ArgumentError, match=r"sample_rate=2"), detect_n_plus_one("log", sample_rate=2):
        pass
