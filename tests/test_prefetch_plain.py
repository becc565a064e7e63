"""Peer loading of relations to models that keep Django's default manager (issue 13, item 2).

Only ``Order`` has a prefetch-aware manager; ``Customer``, ``Label`` and ``Line`` keep
Django's. Their related managers read the rows' prefetch cache, where the peers' rows are.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from django.db import connections, models
from django.db.models import Prefetch, QuerySet
from django.test.utils import CaptureQueriesContext, isolate_apps

from django_scale.checks import check_querysets
from django_scale.prefetch.plain import PeerPrefetchCache, PeerRows, plain_relations
from django_scale.querysets import ScaleQuerySet

from testapp.models import Customer, Label, Line, Order

ORDERS = 200


def build(orders: int = ORDERS) -> None:
    """Customers, labels, orders with 0-3 labels and 0-4 lines."""
    customers = Customer.objects.bulk_create(Customer(name=f"customer {i}") for i in range(20))
    labels = Label.objects.bulk_create(Label(name=f"label {i}") for i in range(5))
    created = Order.objects.bulk_create(Order(customer=customers[i % 20], number=i) for i in range(orders))
    through = Order.labels.through
    through.objects.bulk_create(
        through(order_id=order.pk, label_id=labels[(i + k) % 5].pk)
        for i, order in enumerate(created)
        for k in range(i % 4)
    )
    Line.objects.bulk_create(
        Line(order=order, quantity=k + 1) for i, order in enumerate(created) for k in range(i % 5)
    )


@pytest.fixture
def data(db: None) -> None:
    build()


def count() -> CaptureQueriesContext:
    return CaptureQueriesContext(connections["default"])


def page(orders: Any) -> list[tuple[int, str, list[str], int]]:
    """The newcomer's list: each order with its customer, labels and line count."""
    return [
        (order.number, order.customer.name, [label.name for label in order.labels.all()], order.lines.count())
        for order in orders
    ]


def test_the_newcomers_list_takes_at_most_five_queries(data: None) -> None:
    with count() as queries:
        shown = page(Order.objects.all())
    # Orders, customers, labels, one grouped COUNT of lines.
    assert len(queries) == 4
    # Django's lazy loading: the same rows, one query per row and relation.
    with count() as lazy:
        expected = page(Order.objects.peer_loading(False))
    assert len(lazy) == 1 + 3 * ORDERS
    assert shown == expected
    assert sum(lines for *_, lines in shown) == Line.objects.count() > 0


def test_count_is_one_grouped_count_and_loads_no_row(data: None) -> None:
    orders = list(Order.objects.all())
    with count() as queries:
        counts = [order.lines.count() for order in orders]
        exists = [order.lines.exists() for order in orders]
    assert len(queries) == 1
    assert "COUNT(" in queries[0]["sql"].upper()
    assert counts == [i % 5 for i in range(ORDERS)]
    assert exists == [bool(i % 5) for i in range(ORDERS)]
    # The rows themselves: one more query, for every order.
    with count() as queries:
        quantities = [[line.quantity for line in order.lines.all()] for order in orders]
    assert len(queries) == 1
    assert quantities == [list(range(1, i % 5 + 1)) for i in range(ORDERS)]


def test_many_to_many_count_and_exists_are_grouped(data: None) -> None:
    # Django 5.0+ counts on the through table once the prefetch cache has nothing: it does
    # have something here, so the grouped count answers.
    orders = list(Order.objects.all())
    with count() as queries:
        counts = [order.labels.count() for order in orders]
        exists = [order.labels.exists() for order in orders]
    assert len(queries) == 1
    assert counts == [i % 4 for i in range(ORDERS)]
    assert exists == [bool(i % 4) for i in range(ORDERS)]


def test_loaded_rows_point_back_at_their_own_order(data: None) -> None:
    orders = list(Order.objects.all())
    with count() as queries:
        lines = [line for order in orders for line in order.lines.all()]
        owners = [line.order for line in lines]
    assert len(queries) == 1
    assert [owner.pk for owner in owners] == [line.order_id for line in lines]
    assert all(owner in orders for owner in owners)


def test_reverse_many_to_many_of_a_plain_row_from_a_prefetch_aware_set(data: None) -> None:
    # The rows loaded for peers (customers) are peers too, and Customer.orders is an
    # Order manager: prefetch-aware already. Labels loaded for orders batch label.orders.
    orders = list(Order.objects.all())
    labels = {label.pk: label for order in orders for label in order.labels.all()}
    with count() as queries:
        numbers = {pk: sorted(order.number for order in label.orders.all()) for pk, label in labels.items()}
    assert len(queries) == 1
    assert numbers == {
        label.pk: sorted(QuerySet(Order).filter(labels=label).values_list("number", flat=True))
        for label in QuerySet(Label).all()
        if label.pk in labels
    }


def test_writes_through_related_managers_are_seen(data: None) -> None:
    orders = list(Order.objects.all())
    first, second = orders[1], orders[2]
    assert first.lines.count() == 1
    first.lines.create(quantity=9)
    assert first.lines.count() == 2
    assert [line.quantity for line in first.lines.all()] == [1, 9]
    Line.objects.create(order=second, quantity=7)
    assert [line.quantity for line in second.lines.all()] == [1, 2, 7]
    label = Label.objects.create(name="new")
    first.labels.add(label)
    assert "new" in [label.name for label in first.labels.all()]
    assert first.labels.count() == 2
    first.labels.remove(label)
    assert first.labels.count() == 1
    second.labels.clear()
    assert list(second.labels.all()) == []
    assert second.labels.exists() is False


def test_a_moved_or_deleted_row_is_seen(data: None) -> None:
    orders = list(Order.objects.all())
    one, two = orders[1], orders[2]
    line = one.lines.all()[0]
    assert two.lines.count() == 2
    two.lines.add(line)  # a bulk UPDATE of Line: no signal, the related manager tells
    assert one.lines.count() == 0
    assert [obj.pk for obj in two.lines.all()] == sorted(
        QuerySet(Line).filter(order=two).values_list("pk", flat=True)
    )
    gone = two.lines.all()[0]
    gone.delete()
    assert gone.pk not in [obj.pk for obj in two.lines.all()]
    line.quantity = 5
    line.save()
    assert 5 in [obj.quantity for obj in two.lines.all()]


def test_explicit_prefetches_win(data: None) -> None:
    with count() as queries:
        orders = list(
            Order.objects.prefetch_related(
                Prefetch("lines", queryset=Line.objects.filter(quantity__gt=1)), "labels"
            )
        )
        big = [[line.quantity for line in order.lines.all()] for order in orders]
        labels = [len(order.labels.all()) for order in orders]
    assert len(queries) == 3  # orders and the two prefetches, no peer load
    assert big == [list(range(2, i % 5 + 1)) for i in range(ORDERS)]
    assert labels == [i % 4 for i in range(ORDERS)]


def test_filtered_and_other_database_reads_query_per_row(data: None) -> None:
    orders = list(Order.objects.all())
    with count() as queries:
        big = [order.lines.filter(quantity__gt=3).count() for order in orders[:5]]
    assert len(queries) == 5
    assert big == [0, 0, 0, 0, 1]


def test_peer_loading_off_leaves_rows_to_django(data: None) -> None:
    orders = list(Order.objects.peer_loading(False))
    assert "_prefetched_objects_cache" not in orders[0].__dict__
    with count() as queries:
        [order.lines.count() for order in orders[:3]]
    assert len(queries) == 3


def test_django_reads_the_prefetch_cache_through_its_related_managers(data: None) -> None:
    # The seam: Django's reverse foreign key and many-to-many managers read
    # instance._prefetched_objects_cache[name] (and pop it before writing), on every Django.
    orders = list(Order.objects.all())
    cache = orders[0].__dict__["_prefetched_objects_cache"]
    assert type(cache) is PeerPrefetchCache
    assert set(plain_relations(Order)) == {"lines", "labels"}
    queryset = orders[0].lines.all()
    assert type(queryset._result_cache) is PeerRows
    assert cache == {}  # nothing stored: the peers' rows live with the group


def test_copies_and_pickles_carry_no_peers(data: None) -> None:
    orders = list(Order.objects.all())
    [order.lines.count() for order in orders]
    restored = pickle.loads(pickle.dumps(orders[3]))
    assert type(restored.__dict__["_prefetched_objects_cache"]) is dict
    assert restored.lines.count() == 3
    rows = orders[3].lines.all()._result_cache
    assert type(copy.copy(rows)) is list
    assert [line.quantity for line in pickle.loads(pickle.dumps(rows))] == [1, 2, 3]


def test_w401_only_for_related_models_with_other_managers() -> None:
    with isolate_apps("testapp") as registry:

        class Shelf(models.Model):  # noqa: DJ008 - a model for one check
            objects = ScaleQuerySet.as_manager()

            class Meta:
                app_label = "testapp"

        class Book(models.Model):  # noqa: DJ008 - a model for one check
            shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")

            class Meta:
                app_label = "testapp"

        class Poster(models.Model):  # noqa: DJ008 - a model for one check
            shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="posters")
            objects = models.Manager()
            framed = models.Manager()

            class Meta:
                app_label = "testapp"

        messages = check_querysets(app_configs=[registry.get_app_config("testapp")])
    w401 = [message for message in messages if message.id == "django_scale.W401"]
    assert [message.msg for message in w401] == [
        "testapp.Shelf uses a prefetch-aware queryset, but testapp.Poster has more than one manager and "
        "its default one is not a PrefetchAwareManager: Shelf.posters.all(), .count() and .exists() "
        "load row by row."
    ]
