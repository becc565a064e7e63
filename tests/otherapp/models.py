from __future__ import annotations

import uuid

from django.db import models

from testapp import models as testapp_models


class Post(models.Model):
    """Named like ``testapp.Post``: a fragment keyed by class name and pk would mix them up."""

    title = models.CharField(max_length=200)

    def __str__(self) -> str:
        return self.title


class Author(testapp_models.Author):
    """A proxy of ``testapp.Author`` with the same class name, which renders differently."""

    class Meta:
        proxy = True

    def __str__(self) -> str:
        return f"proxy of {self.name}"


# -- ScaleModelAdmin drop-in probes (tests/test_admin_dropin.py) -----------------------------


class Desk(models.Model):
    """A related model ordered by its own Meta.ordering, not by its primary key."""

    name = models.CharField(max_length=100)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Event(models.Model):
    """A UUID primary key and a non-null timestamp that many rows share."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    desk = models.ForeignKey(Desk, on_delete=models.CASCADE, related_name="events")
    title = models.CharField(max_length=100)
    at = models.DateTimeField()

    def __str__(self) -> str:
        return self.title
