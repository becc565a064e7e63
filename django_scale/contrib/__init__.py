"""Optional apps of django-scale, each opted into by listing it in ``INSTALLED_APPS``."""
