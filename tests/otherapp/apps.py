from __future__ import annotations

from django.apps import AppConfig


class OtherAppConfig(AppConfig):
    name = "otherapp"
    default_auto_field = "django.db.models.BigAutoField"
