"""Settings for django-scale's own test suite.

``DJANGO_SCALE_TEST_BACKEND`` picks what the suite talks to: ``postgres`` (the default) is a
real PostgreSQL primary with a streaming replica, Redis and a Celery worker, started by
:mod:`harness` unless environment variables name existing servers; ``sqlite`` is the
embedded default, SQLite with the local-memory cache.
"""

from __future__ import annotations

from typing import Any

import django

import harness

SECRET_KEY = "django-scale-tests-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "testapp.urls"
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # The browser test loads the admin's stylesheets and scripts from the live server.
    "django.contrib.staticfiles",
    # ArrayField (testapp.PostgresBulkRecord) needs it from Django 6.1 on (check postgres.E005).
    "django.contrib.postgres",
    "django_scale",
    "django_scale.contrib.backfill",
    "testapp",
    # Models named like testapp's: fragment keys must tell the apps apart.
    "otherapp",
    # The docs' news site: tests/test_docs_examples.py runs the pages' examples on it.
    "news",
]
MIDDLEWARE = [
    "django_scale.middleware.ScaleMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASE_ROUTERS = ["django_scale.routers.ReplicaRouter"]
# Django 6.1 sends mail through MAILERS and warns when it is not set (the sniper mails ADMINS);
# the test runner replaces the backend with the local-memory one either way.
if django.VERSION >= (6, 1):
    MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}
# Fast hashing: the suite logs users in, it does not test password storage.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

DATABASES: dict[str, dict[str, Any]]
CACHES: dict[str, dict[str, Any]]

if harness.BACKEND == "sqlite":
    DATABASES = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        # A second database, as a project migrating from an old one has (tests/test_copy_pipe.py).
        "legacy": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    DJANGO_SCALE: dict[str, Any] = {}
    CELERY_TASK_ALWAYS_EAGER = True
    CELERY_BROKER_URL = "memory://"
else:
    _services = harness.services()
    DATABASES = {
        "default": _services.primary.database_settings(),
        # The replica alias connects to the real standby. MIRROR tells Django's test runner
        # not to create a database there (a standby is read-only) but to use the name of the
        # primary's test database, which reaches the standby through replication.
        "replica": _services.replica.database_settings(
            TEST={"MIRROR": "default"}, OPTIONS={"connect_timeout": 2}
        ),
    }
    # A second standby, streaming from the primary on its own (tests/test_replicas_several.py
    # pauses replay on one and not the other). The suite's default REPLICAS lists only
    # "replica": the single-replica tests pin what happens when *the* replica lags or fails,
    # which a second healthy standby would answer instead. The several-replica tests list
    # both with override_scale_settings().
    DATABASES["replica2"] = (_services.replica2 or _services.replica).database_settings(
        TEST={"MIRROR": "default"}, OPTIONS={"connect_timeout": 2}
    )
    # An alias for the primary itself, as projects mirror "replicas" in their test settings.
    DATABASES["mirror"] = _services.primary.database_settings(TEST={"MIRROR": "default"})
    # The standby again, through a backend of the suite's own (tests/custom_backend/): the
    # replica monitor must connect through a project's backend, not around it.
    DATABASES["custom_backend"] = _services.replica.database_settings(
        ENGINE="custom_backend", TEST={"MIRROR": "default"}, OPTIONS={"connect_timeout": 2}
    )
    # A second database on the primary's server (its test database "test_<name>_legacy"), as
    # a project migrating from an old database has: the COPY pipe's source (test_copy_pipe.py).
    DATABASES["legacy"] = _services.primary.database_settings(NAME=f"{_services.primary.name}_legacy")
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": _services.redis.url(),
            "KEY_PREFIX": "django-scale-tests",
        }
    }
    DJANGO_SCALE = {"REPLICAS": ["replica"], "HEALTH_CHECK_INTERVAL": 0.1}
    if _services.pooler is not None:
        # Every alias goes through PgBouncer in transaction mode (DJANGO_SCALE_TEST_POOLER):
        # configured as the deployment guide says, with no server-side cursors.
        DJANGO_SCALE["POOLER"] = dict.fromkeys(DATABASES, "transaction")
        for _database in DATABASES.values():
            _database["DISABLE_SERVER_SIDE_CURSORS"] = True
    CELERY_BROKER_URL = _services.redis.url(1)
    CELERY_RESULT_BACKEND = _services.redis.url(2)

# One result backend for all threads, so the suite can close the worker thread's connections.
CELERY_RESULT_BACKEND_THREAD_SAFE = True
CELERY_TASK_DEFAULT_QUEUE = "django-scale-tests"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = False
