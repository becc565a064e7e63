from __future__ import annotations

from django.apps import AppConfig

__all__ = ["DjangoScaleConfig"]


class DjangoScaleConfig(AppConfig):
    name = "django_scale"
    verbose_name = "django-scale"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Register the system checks and nothing else: django-scale never patches Django.
        from django_scale.checks import register_checks

        register_checks()
