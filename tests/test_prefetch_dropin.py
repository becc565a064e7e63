"""Peer loading is drop-in: results equal Django's lazy loading, fewer queries the only difference.

One regression test per defect of issue 20 ("Prefetch-aware querysets" 1-10), each compared
with what Django's own querysets answer, on PostgreSQL and SQLite and every Django of the
matrix; and pins of the Django behaviour the package relies on where it has no public API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import django
import pytest
from django.db.models import Prefetch, QuerySet, Value, prefetch_related_objects
from prefetch_data import build, count, stock
from support import wait_until

from django_scale.prefetch import HAS_FETCH_MODES, peer_group
from django_scale.replicas import monitor, parse_lsn

from testapp.models import Place, Post, Profile, Reply, Reporter, Restaurant, Tag


def bodies(rows: Any) -> list[str]:
    return [row.body for row in rows]


def replies_of(post: Post, **filters: Any) -> list[str]:
    return bodies(stock(Reply).filter(post_id=post.pk, **filters).order_by("id"))


# -- 1. first() / last() ------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["values", "values_list", "flat"])
def test_first_and_last_after_values_answer_as_djangos(data: None, shape: str) -> None:
    def shaped(queryset: QuerySet[Any]) -> QuerySet[Any]:
        if shape == "values":
            return queryset.values("bio")
        return queryset.values_list("bio", flat=shape == "flat")

    queryset = shaped(Profile.objects.all())  # Profile has no Meta.ordering
    list(queryset)
    expected = shaped(stock(Profile))
    assert (queryset.first(), queryset.last()) == (expected.first(), expected.last())


def test_first_of_an_unordered_reverse_is_djangos(data: None) -> None:
    queryset = Profile.objects.reverse()
    list(queryset)
    expected = stock(Profile).reverse()
    assert queryset.first() == expected.first() == stock(Profile).order_by("-pk")[0]
    assert queryset.last() == expected.last() == stock(Profile).order_by("pk")[0]


@pytest.mark.parametrize("cleared", [False, True])
def test_first_after_the_row_was_deleted_is_djangos(data: None, cleared: bool) -> None:
    queryset = Profile.objects.order_by() if cleared else Profile.objects.all()
    expected = stock(Profile).order_by() if cleared else stock(Profile).all()
    rows = list(queryset)
    list(expected)
    lowest = min(rows, key=lambda row: row.pk)
    stock(Profile).filter(pk=lowest.pk).delete()
    # Django queries again (or, for order_by() on Django 6.1, answers from its cache).
    assert (queryset.first(), queryset.last()) == (expected.first(), expected.last())
    if not cleared:
        assert queryset.first() != lowest


def test_first_and_last_of_peer_loaded_rows_follow_djangos_order(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        answers = [
            (post.replies.first(), post.replies.last(), post.tags.first(), post.tags.last()) for post in posts
        ]
    assert len(queries) == 2  # replies and tags, once for all posts
    expected = [
        (
            stock(Reply).filter(post=post).order_by("id").first(),
            stock(Reply).filter(post=post).order_by("id").last(),
            stock(Tag).filter(posts=post).order_by("name").first(),
            stock(Tag).filter(posts=post).order_by("name").last(),
        )
        for post in posts
    ]
    assert answers == expected


def test_first_in_iterator_chunks_answers_as_djangos(data: None) -> None:
    with count() as queries:
        firsts = [(post.tags.first(), post.replies.last()) for post in Post.objects.iterator(chunk_size=5)]
    assert len(queries) == 1 + 2 * 3  # the rows, then tags and replies once per chunk of 5
    assert firsts == [
        (
            stock(Tag).filter(posts=post).order_by("name").first(),
            stock(Reply).filter(post=post).order_by("id").last(),
        )
        for post in stock(Post).order_by("id")
    ]


# -- 2. custom managers --------------------------------------------------------------------


def test_a_custom_related_manager_never_shares_the_default_relations_cache(data: None) -> None:
    posts = list(Post.objects.all())
    approved = [bodies(post.replies(manager="approved_replies").all()) for post in posts]
    approved_counts = [post.replies(manager="approved_replies").count() for post in posts]
    everything = [bodies(post.replies.all()) for post in posts]
    counts = [post.replies.count() for post in posts]
    again = [bodies(post.replies(manager="approved_replies").all()) for post in posts]
    assert approved == again == [replies_of(post, approved=True) for post in posts]
    assert approved_counts == [len(rows) for rows in approved]
    assert everything == [replies_of(post) for post in posts]
    assert counts == [len(rows) for rows in everything]
    assert any(len(a) < len(e) for a, e in zip(approved, everything, strict=True))


def test_a_custom_related_manager_filters_after_a_peer_load(data: None) -> None:
    posts = list(Post.objects.all())
    [list(post.replies.all()) for post in posts]
    manager = posts[3].replies(manager="approved_replies")
    assert bodies(manager.filter(body__startswith="reply")) == replies_of(posts[3], approved=True)
    assert manager.first() == stock(Reply).filter(post=posts[3], approved=True).order_by("id").first()


# -- 3. db_manager() -----------------------------------------------------------------------


def test_db_manager_reads_on_its_own_and_caches_nothing_for_peers(data: None) -> None:
    posts = list(Post.objects.all())
    assert (
        posts[0].replies.db_manager("default").__dict__["_db"] == "default"
    )  # what _django_scale_default reads
    with count() as queries:
        mine = bodies(posts[3].replies.db_manager("default").all())
        theirs = [bodies(post.replies.all()) for post in posts]
    # Its own query, then one peer load: the db_manager() rows were not shared.
    assert len(queries) == 2
    assert mine == replies_of(posts[3])
    assert theirs == [replies_of(post) for post in posts]


@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_db_manager_reads_its_own_database(replica: Any) -> None:
    build()
    target = parse_lsn(replica.primary_lsn())
    replica.wait_for_replay()
    wait_until(lambda: monitor("replica").is_available(None, target), "the replica to be available")
    posts = list(Post.objects.using("default"))
    with count("replica") as on_replica, count("default") as on_default:
        mine = bodies(posts[3].replies.db_manager("replica").all())
        counted = posts[3].replies.db_manager("replica").count()
    assert (len(on_replica), len(on_default)) == (2, 0)
    assert mine == replies_of(posts[3]) and counted == len(mine)
    with count("replica") as on_replica, count("default") as on_default:
        theirs = [bodies(post.replies.all()) for post in posts]
    assert (len(on_replica), len(on_default)) == (0, 1)
    assert theirs == [replies_of(post) for post in posts]


# -- 4. grouped count() / exists() are invalidated -------------------------------------------


def test_grouped_count_sees_a_reply_created_through_the_related_manager(data: None) -> None:
    posts = list(Post.objects.all())
    assert [post.replies.count() for post in posts][0] == 0
    assert not posts[0].replies.exists()
    posts[0].replies.create(body="new")
    assert (posts[0].replies.count(), posts[0].replies.exists()) == (1, True)
    assert [post.replies.count() for post in posts] == [
        stock(Reply).filter(post=post).count() for post in posts
    ]


def test_grouped_count_sees_add_on_both_kinds_of_relation(data: None) -> None:
    posts = list(Post.objects.all())
    assert [post.replies.count() for post in posts][:2] == [0, 1]
    assert [post.tags.count() for post in posts][0] == 0
    moved = stock(Reply).get(post=posts[1])
    posts[0].replies.add(moved)
    posts[0].tags.add(stock(Tag).get(name="tag 0"))
    assert [post.replies.count() for post in posts] == [
        stock(Reply).filter(post=post).count() for post in posts
    ]
    assert [post.tags.count() for post in posts] == [stock(Tag).filter(posts=post).count() for post in posts]
    assert [post.replies.exists() for post in posts][:2] == [True, False]


def test_grouped_count_is_read_again_after_refresh_from_db(data: None) -> None:
    posts = list(Post.objects.all())
    assert posts[0].replies.count() == 0
    # A write no signal tells (Django's own queryset): a refresh must still see it.
    stock(Reply).filter(post=posts[1]).update(post=posts[0])
    posts[0].refresh_from_db()
    assert posts[0].replies.count() == 1
    assert bodies(posts[0].replies.all()) == replies_of(posts[0])


def test_rows_are_read_again_after_refresh_from_db(data: None) -> None:
    posts = list(Post.objects.all())
    assert [bodies(post.replies.all()) for post in posts][0] == []
    stock(Reply).filter(post=posts[1]).update(post=posts[0])
    posts[0].refresh_from_db()
    assert bodies(posts[0].replies.all()) == replies_of(posts[0]) != []


def test_refresh_from_db_replaces_the_prefetch_cache(data: None) -> None:
    """Pin what PeerGroup.refreshed() relies on, on every Django of the matrix."""
    post = list(Post.objects.all())[2]
    before = post.__dict__.get("_prefetched_objects_cache")
    post.refresh_from_db()
    after = post.__dict__["_prefetched_objects_cache"]
    assert after == {} and after is not before
    post.refresh_from_db(fields=["title"])  # deferred-field loads pass fields: the cache stays
    assert post.__dict__["_prefetched_objects_cache"] is after


# -- 5. writes on one member reach every member's cache ---------------------------------------


def test_reverse_foreign_key_add_on_one_member_reaches_the_others(data: None) -> None:
    posts = list(Post.objects.all())
    [list(post.replies.all()) for post in posts]
    moved = posts[1].replies.all()[0]
    posts[2].replies.add(moved)
    assert bodies(posts[1].replies.all()) == replies_of(posts[1]) == []
    assert bodies(posts[2].replies.all()) == replies_of(posts[2])
    assert moved.body in bodies(posts[2].replies.all())


def test_nullable_key_remove_clear_and_set_reach_every_member(data: None) -> None:
    reporters = list(Reporter.objects.all())

    def edited() -> list[list[str]]:
        return [[post.title for post in reporter.edited_posts.all()] for reporter in reporters]

    def expected() -> list[list[str]]:
        return [
            list(stock(Post).filter(editor=r).order_by("id").values_list("title", flat=True))
            for r in reporters
        ]

    assert edited() == expected()
    post = reporters[1].edited_posts.all()[0]
    reporters[2].edited_posts.add(post)
    assert edited() == expected()
    reporters[2].edited_posts.remove(post)
    assert edited() == expected()
    reporters[3].edited_posts.clear()
    assert edited() == expected()
    reporters[0].edited_posts.set([stock(Post).get(title="post 1")])
    assert edited() == expected()
    assert [reporter.edited_posts.count() for reporter in reporters] == [len(rows) for rows in expected()]


def test_many_to_many_add_is_seen_from_the_other_side(data: None) -> None:
    tags = list(Tag.objects.all())
    posts = list(Post.objects.all())
    assert [tag.posts.count() for tag in tags]
    [list(tag.posts.all()) for tag in tags]
    [list(post.tags.all()) for post in posts]
    posts[0].tags.add(tags[0])
    tags[1].posts.remove(*tags[1].posts.all()[:1])
    tags[2].posts.clear()

    def titles(tag: Tag) -> list[str]:
        return sorted(post.title for post in tag.posts.all())

    assert [titles(tag) for tag in tags] == [
        sorted(stock(Post).filter(tags=tag).values_list("title", flat=True)) for tag in tags
    ]
    assert [tag.posts.count() for tag in tags] == [stock(Post).filter(tags=tag).count() for tag in tags]
    assert [[tag.name for tag in post.tags.all()] for post in posts] == [
        list(stock(Tag).filter(posts=post).order_by("name").values_list("name", flat=True)) for post in posts
    ]


def test_a_reverse_one_to_one_created_later_is_found(data: None) -> None:
    reporters = list(Reporter.objects.all())
    assert reporters[0].profile.bio == "bio 0"  # loads all five; the fifth is missing
    Profile.objects.create(reporter=stock(Reporter).get(pk=reporters[4].pk), bio="late")
    assert reporters[4].profile.bio == "late"


def test_saving_a_row_with_another_parent_reaches_the_parents_caches(data: None) -> None:
    reporters = list(Reporter.objects.all())
    assert [reporter.posts.count() for reporter in reporters]
    [list(reporter.posts.all()) for reporter in reporters]
    post = stock(Post).get(title="post 1")
    post.reporter_id = reporters[0].pk
    post.save()
    assert [[p.title for p in reporter.posts.all()] for reporter in reporters] == [
        list(stock(Post).filter(reporter=r).order_by("id").values_list("title", flat=True)) for r in reporters
    ]
    assert [reporter.posts.count() for reporter in reporters] == [
        stock(Post).filter(reporter=r).count() for r in reporters
    ]


def test_deleting_a_loaded_row_or_a_queryset_reaches_the_caches(data: None) -> None:
    posts = list(Post.objects.all())
    assert [post.replies.count() for post in posts]
    [list(post.replies.all()) for post in posts]
    # A row deleted through the instance peers loaded (Model.delete() sends post_delete,
    # which peer loading does not listen to: see "Differences from Django").
    list(posts[3].replies.all())[0].delete()
    assert bodies(posts[3].replies.all()) == replies_of(posts[3])
    Reply.objects.filter(post=posts[2]).delete()
    assert (bodies(posts[2].replies.all()), posts[2].replies.count()) == ([], 0)
    assert [post.replies.count() for post in posts] == [
        stock(Reply).filter(post=post).count() for post in posts
    ]


# -- 6. explicit prefetches win ------------------------------------------------------------


def test_an_explicit_prefetch_after_a_peer_load_wins(data: None) -> None:
    posts = list(Post.objects.all())
    [list(post.replies.all()) for post in posts]
    approved = Reply.objects.filter(approved=True).annotate(marker=Value(7))
    with count() as queries:
        prefetch_related_objects(posts, Prefetch("replies", queryset=approved))
    assert len(queries) == 1
    assert [bodies(post.replies.all()) for post in posts] == [
        replies_of(post, approved=True) for post in posts
    ]
    assert all(reply.marker == 7 for post in posts for reply in post.replies.all())


# -- 7. multi-table inheritance parent links ---------------------------------------------------


@pytest.fixture
def places(db: None) -> None:
    owners = Reporter.objects.bulk_create(Reporter(name=f"owner {i}") for i in range(3))
    for i in range(6):
        Restaurant.objects.create(owner=owners[i % 3], name=f"restaurant {i}", serves_pizza=i % 2 == 0)
    Place.objects.create(owner=owners[0], name="just a place")


def test_parent_links_keep_djangos_zero_query_path(places: None) -> None:
    restaurants = list(Restaurant.objects.all())
    restaurants[0].name = "renamed in memory"
    with count() as queries:
        parents = [restaurant.place_ptr for restaurant in restaurants]
    assert len(queries) == 0
    assert parents[0].name == "renamed in memory"
    assert [parent.name for parent in parents[1:]] == [f"restaurant {i}" for i in range(1, 6)]


def test_deleting_multi_table_rows_costs_what_django_does(places: None) -> None:
    with count() as queries:
        Restaurant.objects.filter(serves_pizza=True).delete()
    with count() as expected:
        stock(Restaurant).filter(serves_pizza=False).delete()
    assert len(queries) == len(expected)
    assert list(stock(Place).values_list("name", flat=True)) == ["just a place"]


# -- 8. a key cached on an ancestor --------------------------------------------------------------


def test_a_key_cached_on_an_ancestor_costs_no_query(places: None) -> None:
    places = list(Place.objects.select_related("owner", "restaurant"))
    with count() as queries:
        owners = [place.restaurant.owner for place in places if hasattr(place, "restaurant")]
    assert len(queries) == 0
    assert [owner.name for owner in owners] == [f"owner {i % 3}" for i in range(6)]
    assert all(place.restaurant.owner is place.owner for place in places if hasattr(place, "restaurant"))


# -- 9. back-references are the instance Django gives ---------------------------------------------


def test_back_references_are_the_same_instance(data: None) -> None:
    posts = list(Post.objects.select_related("reporter"))  # one Reporter instance per post
    with count() as queries:
        back = [all(other.reporter is post.reporter for other in post.reporter.posts.all()) for post in posts]
    assert len(queries) == 1
    assert all(back)
    post = posts[5]
    post.reporter.name = "edited in memory"
    assert post.reporter.posts.all()[0].reporter.name == "edited in memory"


def test_reverse_one_to_one_back_references_are_the_same_instance(data: None) -> None:
    profiles = list(Profile.objects.select_related("reporter").order_by("id"))
    reporters = [profile.reporter for profile in profiles] * 2
    pairs = list(Reporter.objects.filter(pk__in=[r.pk for r in reporters]).select_related("profile"))
    assert all(reporter.profile.reporter is reporter for reporter in pairs)
    posts = list(Post.objects.select_related("reporter"))
    with count() as queries:
        found = [
            post.reporter.profile.reporter is post.reporter
            for post in posts
            if post.reporter.name != "reporter 4"
        ]
    assert len(queries) == 1
    assert all(found)


# -- 10. many-to-many count() / exists() keep Django's join-free path ------------------------------


def _joins_target(sql: str) -> bool:
    return "testapp_tag" in sql.replace("testapp_post_tags", "")


def test_grouped_many_to_many_count_reads_the_through_table_alone(data: None) -> None:
    posts = list(Post.objects.all())
    with count() as queries:
        counts = [post.tags.count() for post in posts]
        found = [post.tags.exists() for post in posts]
    assert len(queries) == 1
    assert not _joins_target(queries[0]["sql"])
    assert counts == [stock(Tag).filter(posts=post).count() for post in posts]
    assert found == [n > 0 for n in counts]


def test_single_many_to_many_count_joins_as_django_does(data: None) -> None:
    post = Post.objects.get(title="post 3")
    has_join_free_path = hasattr(type(post.tags), "constrained_target")  # Django 5.0+
    assert has_join_free_path == (django.VERSION >= (5, 0))
    with count() as queries:
        assert (post.tags.count(), post.tags.exists()) == (3, True)
    assert len(queries) == 2
    assert [_joins_target(query["sql"]) for query in queries] == [not has_join_free_path] * 2


# -- Pins of the private attributes peer loading still uses ---------------------------------------


def test_rows_point_at_their_group_through_the_fetch_mode_or_the_field_cache(data: None) -> None:
    """Pin the per-row seams of hooks.attach_peers on every Django of the matrix."""
    posts = list(Post.objects.all())
    group = peer_group(posts[0])
    assert group is not None and group is peer_group(posts[-1])
    if HAS_FETCH_MODES:
        # Django 6.1 reads the row's own mode before a lazy load (ModelState.fetch_mode).
        assert posts[0]._state.fetch_mode is group.mode  # type: ignore[attr-defined]
        assert posts[0]._state.fields_cache.__class__ is dict
    else:
        assert not hasattr(posts[0]._state, "fetch_mode")
        assert posts[0]._state.fields_cache.group is group  # type: ignore[attr-defined]


def test_the_docs_list_every_known_difference_of_the_orm_suites() -> None:
    """docs/querysets.md's "Differences from Django" names each test of tests/compat/orm.txt."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "querysets.md").read_text()
    section = text.split("## Differences from Django", 1)[1].split("\n## ", 1)[0]
    listed = [
        line.split()[0]
        for line in (root / "tests" / "compat" / "orm.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert listed
    assert [test for test in listed if f"`{test}`" not in section] == []
