from __future__ import annotations

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
