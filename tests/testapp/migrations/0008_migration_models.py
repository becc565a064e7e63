from __future__ import annotations

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("testapp", "0007_ticket"),
    ]

    operations = [
        migrations.CreateModel(
            name="OldPublisher",
            fields=[
                ("id", models.IntegerField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=50)),
            ],
        ),
        migrations.CreateModel(
            name="OldCharacter",
            fields=[
                ("id", models.IntegerField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=100)),
                (
                    "publisher",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="testapp.oldpublisher",
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="NewPublisher",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=50, unique=True)),
                ("legacy_id", models.IntegerField(null=True, unique=True)),
            ],
        ),
        migrations.CreateModel(
            name="NewCharacter",
            fields=[
                ("id", models.IntegerField(primary_key=True, serialize=False)),
                ("nickname", models.CharField(max_length=50)),
                ("secret_identity", models.CharField(max_length=50)),
                ("power", models.IntegerField(default=1)),
                (
                    "publisher",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="testapp.newpublisher",
                    ),
                ),
            ],
        ),
    ]
