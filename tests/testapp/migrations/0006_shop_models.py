# The newcomer's shop (issue 13): Order is prefetch-aware, Customer, Label and Line are not.

from __future__ import annotations

from typing import Any

import django.db.models.deletion
from django.db import migrations, models


def _id() -> Any:
    return models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")


class Migration(migrations.Migration):
    dependencies = [
        ("testapp", "0005_prefetch_compat_models"),
    ]

    operations = [
        migrations.CreateModel(
            name="Customer",
            fields=[("id", _id()), ("name", models.CharField(max_length=60))],
            options={"ordering": ["id"]},
        ),
        migrations.CreateModel(
            name="Label",
            fields=[("id", _id()), ("name", models.CharField(max_length=60))],
            options={"ordering": ["name"]},
        ),
        migrations.CreateModel(
            name="Order",
            fields=[
                ("id", _id()),
                ("number", models.IntegerField()),
                (
                    "customer",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="orders",
                        to="testapp.customer",
                    ),
                ),
                ("labels", models.ManyToManyField(blank=True, related_name="orders", to="testapp.label")),
            ],
            options={"ordering": ["number"]},
        ),
        migrations.CreateModel(
            name="Line",
            fields=[
                ("id", _id()),
                ("quantity", models.IntegerField(default=1)),
                (
                    "order",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="lines", to="testapp.order"
                    ),
                ),
            ],
            options={"ordering": ["id"]},
        ),
    ]
