from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models

from django_scale.indexes import TrigramIndex
from django_scale.prefetch import PrefetchAwareForeignKey, PrefetchAwareOneToOneField
from django_scale.querysets import PrefetchAwareManager, ScaleQuerySet


class Author(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Article(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="articles")
    title = models.CharField(max_length=200)
    published = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [TrigramIndex(fields=["title"], name="testapp_article_title_trgm")]

    def __str__(self) -> str:
        return self.title


# -- Prefetch-aware models (django_scale.querysets, django_scale.prefetch) -------------------


class Reporter(models.Model):
    name = models.CharField(max_length=100)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Profile(models.Model):
    reporter = PrefetchAwareOneToOneField(Reporter, on_delete=models.CASCADE, related_name="profile")
    bio = models.CharField(max_length=200, blank=True)

    objects = ScaleQuerySet.as_manager()

    def __str__(self) -> str:
        return self.bio


class Tag(models.Model):
    name = models.CharField(max_length=60)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Post(models.Model):
    reporter = PrefetchAwareForeignKey(Reporter, on_delete=models.CASCADE, related_name="posts")
    editor = PrefetchAwareForeignKey(
        Reporter, on_delete=models.SET_NULL, null=True, blank=True, related_name="edited_posts"
    )
    title = models.CharField(max_length=200)
    tags = models.ManyToManyField(Tag, blank=True, related_name="posts")

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.title


class ApprovedReplyManager(PrefetchAwareManager["Reply"]):
    """A second, filtered manager: ``post.replies(manager="approved_replies")``."""

    def get_queryset(self) -> models.QuerySet[Reply]:
        return super().get_queryset().filter(approved=True)


class Reply(models.Model):
    post = PrefetchAwareForeignKey(Post, on_delete=models.CASCADE, related_name="replies")
    body = models.CharField(max_length=200)
    approved = models.BooleanField(default=True)

    objects = ScaleQuerySet.as_manager()
    approved_replies = ApprovedReplyManager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.body


class Place(models.Model):
    """A multi-table inheritance parent with a foreign key (``Restaurant`` inherits it)."""

    owner = PrefetchAwareForeignKey(Reporter, on_delete=models.CASCADE, related_name="places")
    name = models.CharField(max_length=60)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Restaurant(Place):
    serves_pizza = models.BooleanField(default=False)

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["id"]


class BulkRecord(models.Model):
    """One column of each field type that django_scale.bulk must round-trip, on every database."""

    name = models.CharField(max_length=20, unique=True)
    # NULL and "" are different values, and the round trip must keep them apart.
    note = models.TextField(null=True, blank=True)  # noqa: DJ001
    count = models.IntegerField(default=0)
    big = models.BigIntegerField(null=True)
    amount = models.DecimalField(max_digits=10, decimal_places=2, null=True)
    ratio = models.FloatField(null=True)
    flag = models.BooleanField(default=False)
    day = models.DateField(null=True)
    at = models.DateTimeField(null=True)
    clock = models.TimeField(null=True)
    span = models.DurationField(null=True)
    uid = models.UUIDField(null=True)
    data = models.JSONField(null=True)
    blob = models.BinaryField(null=True)
    author = models.ForeignKey(Author, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class PostgresBulkRecord(models.Model):
    """The PostgreSQL-only types: arrays (nested, with NULLs and quotes) and JSON arrays."""

    tags = ArrayField(models.TextField(), default=list)
    grid = ArrayField(ArrayField(models.IntegerField(null=True)), null=True)
    stamps = ArrayField(models.DateTimeField(), null=True)
    data = models.JSONField(default=dict)

    class Meta:
        # Not created on SQLite: migrate skips a model whose required_db_vendor differs.
        required_db_vendor = "postgresql"

    def __str__(self) -> str:
        return f"record {self.pk}"


class BackfillSource(models.Model):
    """The rows test backfills walk."""

    value = models.IntegerField()
    doubled = models.IntegerField(null=True)

    def __str__(self) -> str:
        return f"source {self.pk}"


class BackfillLog(models.Model):
    """One row per source row a backfill processed: a duplicate or a gap shows here."""

    source_id = models.BigIntegerField(db_index=True)

    def __str__(self) -> str:
        return f"log of {self.source_id}"


class AddressRecord(models.Model):
    """A field type the binary COPY path does not send (an inet): its rows go as text."""

    name = models.CharField(max_length=20)
    address = models.GenericIPAddressField(null=True)

    def __str__(self) -> str:
        return self.name


# The newcomer's shop (issue 13): only Order has a prefetch-aware manager; Customer, Label and
# Line keep Django's default manager.


class Customer(models.Model):
    name = models.CharField(max_length=60)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Label(models.Model):
    name = models.CharField(max_length=60)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    customer = PrefetchAwareForeignKey(Customer, on_delete=models.CASCADE, related_name="orders")
    labels = models.ManyToManyField(Label, blank=True, related_name="orders")
    number = models.IntegerField()

    objects = ScaleQuerySet.as_manager()

    class Meta:
        ordering = ["number"]

    def __str__(self) -> str:
        return f"order {self.number}"


class Line(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    quantity = models.IntegerField(default=1)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"line {self.pk}"


class Ticket(models.Model):
    """The index advisor's seeded table (tests/test_indexes.py): filtered by status, newest first."""

    status = models.CharField(max_length=10)
    kind = models.CharField(max_length=10)
    opened_at = models.DateTimeField(db_index=True)
    title = models.CharField(max_length=100, blank=True)

    def __str__(self) -> str:
        return self.title


# The seed's migration (issue 19): an old schema on the "legacy" database, a new one on
# "default". Both exist on both databases (the suite migrates every alias alike).


class OldPublisher(models.Model):
    id = models.IntegerField(primary_key=True)
    name = models.CharField(max_length=50)

    def __str__(self) -> str:
        return self.name


class OldCharacter(models.Model):
    id = models.IntegerField(primary_key=True)
    publisher = models.ForeignKey(OldPublisher, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class NewPublisher(models.Model):
    # Auto ids: the publishers get new keys, which the characters must be remapped to.
    name = models.CharField(max_length=50, unique=True)
    legacy_id = models.IntegerField(null=True, unique=True)

    def __str__(self) -> str:
        return self.name


class NewCharacter(models.Model):
    id = models.IntegerField(primary_key=True)
    publisher = models.ForeignKey(NewPublisher, on_delete=models.CASCADE, related_name="+")
    nickname = models.CharField(max_length=50)
    secret_identity = models.CharField(max_length=50)
    power = models.IntegerField(default=1)

    def __str__(self) -> str:
        return self.nickname
