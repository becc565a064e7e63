"""Settings of the newsroom example project.

With no environment variables the project runs on the embedded default: SQLite, the
local-memory cache and eager Celery tasks. Environment variables switch on the real services:

``DATABASE_URL``
    ``postgres://user:password@host:port/name``: PostgreSQL as the ``default`` database.
``REPLICA_URL``
    The same for a streaming replica of it (needs ``DATABASE_URL``): the ``replica`` alias,
    listed in ``DJANGO_SCALE["REPLICAS"]``.
``REDIS_URL``
    ``redis://host:port/db``: django-redis as the ``default`` cache.
``CELERY_BROKER_URL``
    A real Celery broker; tasks then run on a worker instead of eagerly.
``LEGACY_DATABASE_URL``
    An old database to migrate data from (``manage.py scale_copy --from legacy``, ``bench
    migrate``): the ``legacy`` alias.
``DJANGO_SCALE_EXAMPLE_HARNESS=1``
    Start a throwaway PostgreSQL primary, streaming replica and Redis with the test suite's
    harness and use them (for ``manage.py bench``; needs the repository checkout).
``DJANGO_SCALE_EXAMPLE_POOLER=transaction``
    The PostgreSQL aliases reach the server through PgBouncer in transaction mode: sets
    ``DJANGO_SCALE["POOLER"]`` and ``DISABLE_SERVER_SIDE_CURSORS`` for them (with the harness,
    ``DJANGO_SCALE_TEST_POOLER=pgbouncer`` puts a real PgBouncer in front).
``DJANGO_SCALE_EXAMPLE_SQLITE``
    The SQLite file used without ``DATABASE_URL`` (default: ``db.sqlite3`` next to ``manage.py``).
``DJANGO_SCALE_EXAMPLE_CONFIG``
    ``manage.py bench site``'s configuration of the same pages (unset: the project as it is):
    ``stock`` (no router, no middleware of ours, Django's managers and ``ModelAdmin``, no
    cache), ``tuned`` (what a careful team writes with Django and the popular packages:
    ``select_related``/``prefetch_related`` by hand, ``cache_page`` and the ``{% cache %}`` tag
    with a TTL, django-multidb-router) or ``scale`` (django-scale throughout, plus
    ``MetricsMiddleware`` writing to ``DJANGO_SCALE_EXAMPLE_METRICS_DIR``).
``DJANGO_SCALE_EXAMPLE_SERVER``
    The app server ``bench site`` runs the project under (``gunicorn`` or ``uvicorn``):
    ``tuned`` and ``scale`` keep connections (``CONN_MAX_AGE`` 60) except under ``uvicorn``.
``DJANGO_SCALE_EXAMPLE_CACHE_TTL``
    Seconds for which the cached pages and the sidebar fragment are fresh (``tuned``: their
    TTL; ``scale``: their ``fresh`` period). Unset: 60 for the pages, 300 for the sidebar.
    ``bench site`` sets it short for its phase through cache expiry.
``DJANGO_DEBUG``, ``DJANGO_SECRET_KEY``, ``DJANGO_ALLOWED_HOSTS``
    The Django settings of the same names (``DEBUG`` is on unless ``DJANGO_DEBUG=0``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_flag(name: str, default: str) -> bool:
    """Return whether environment variable *name* (or *default*) says yes."""
    return os.environ.get(name, default).strip().lower() in {"1", "true", "yes", "on"}


def database_from_url(url: str, options: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Turn ``postgres://user:password@host:port/name?option=value`` into a DATABASES entry.

    Query parameters (``sslmode=require``, ``connect_timeout=5``) become ``OPTIONS`` and win
    over the defaults in *options*.
    """
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    if parts.scheme not in {"postgres", "postgresql"} or not name:
        raise ImproperlyConfigured(f"{url!r} is not a postgres://user:password@host:port/name URL.")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": {**(options or {}), **dict(parse_qsl(parts.query))},
        **extra,
    }


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-newsroom-example-do-not-deploy")
DEBUG = env_flag("DJANGO_DEBUG", "1")
ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_scale",
    "news",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "newsroom.urls"
WSGI_APPLICATION = "newsroom.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if env_flag("DJANGO_SCALE_EXAMPLE_HARNESS", "0"):
    # Throwaway PostgreSQL primary + streaming replica and Redis, started by the test suite's
    # harness (needs a checkout of the repository and the PostgreSQL 15 server binaries); they
    # are stopped and removed when the process exits.
    import sys

    # Appended, not inserted first: the suite's own test apps (tests/news) must not shadow ours.
    sys.path.append(str(BASE_DIR.parent / "tests"))
    import harness

    # A server sized for the benchmarks' data (bench site's 1,000,000 articles take 1.4 GB): the
    # suite's 64 MB would have every big read come from the OS cache, as no production server
    # is set up. The harness starts its servers once per process, with this.
    os.environ.setdefault("DJANGO_SCALE_TEST_SHARED_BUFFERS", "1GB")
    _services = harness.services()
    _primary, _replica = _services.primary, _services.replica
    harness.create_database(_primary, "newsroom")
    os.environ["DATABASE_URL"] = f"postgres://{_primary.user}@{_primary.host}:{_primary.port}/newsroom"
    os.environ["REPLICA_URL"] = f"postgres://{_replica.user}@{_replica.host}:{_replica.port}/newsroom"
    os.environ["REDIS_URL"] = _services.redis.url()
    if _services.replica2 is not None:
        _replica2 = _services.replica2
        os.environ["REPLICA2_URL"] = f"postgres://{_replica2.user}@{_replica2.host}:{_replica2.port}/newsroom"
    harness.create_database(_primary, "newsroom_legacy")
    os.environ["LEGACY_DATABASE_URL"] = (
        f"postgres://{_primary.user}@{_primary.host}:{_primary.port}/newsroom_legacy"
    )

DATABASE_URL = os.environ.get("DATABASE_URL", "")
REPLICA_URL = os.environ.get("REPLICA_URL", "")
DATABASES: dict[str, dict[str, Any]]
DJANGO_SCALE: dict[str, Any] = {}
DATABASE_ROUTERS: list[str] = []

if DATABASE_URL:
    DATABASES = {"default": database_from_url(DATABASE_URL)}
    if REPLICA_URL:
        # A standby is read-only: tests mirror the primary's test database instead of creating
        # one. The timeout keeps a hung replica host from stalling a request for minutes.
        DATABASES["replica"] = database_from_url(
            REPLICA_URL, options={"connect_timeout": 2}, TEST={"MIRROR": "default"}
        )
        DJANGO_SCALE["REPLICAS"] = ["replica"]
        # The same standby through a connection django-scale does not manage (it is not in
        # REPLICAS): `bench request` reads through it for its django-multidb-router and
        # one-line-router setups, so that they carry none of django-scale's per-query guard.
        DATABASES["replica_plain"] = database_from_url(
            REPLICA_URL, options={"connect_timeout": 2}, TEST={"MIRROR": "default"}
        )
        if os.environ.get("REPLICA2_URL"):
            # A second standby, known to Django but not in REPLICAS: `bench routing` lists both
            # for its several-replica rows.
            DATABASES["replica2"] = database_from_url(
                os.environ["REPLICA2_URL"], options={"connect_timeout": 2}, TEST={"MIRROR": "default"}
            )
        # Reads go to the replica when it has what the user wrote; the middleware goes first
        # so that every write of a request, the session's included, is seen.
        DATABASE_ROUTERS.append("django_scale.routers.ReplicaRouter")
        MIDDLEWARE.insert(0, "django_scale.middleware.ScaleMiddleware")
    LEGACY_DATABASE_URL = os.environ.get("LEGACY_DATABASE_URL", "")
    if LEGACY_DATABASE_URL:
        DATABASES["legacy"] = database_from_url(LEGACY_DATABASE_URL)
elif REPLICA_URL:
    raise ImproperlyConfigured("REPLICA_URL is set without DATABASE_URL; set the primary's URL too.")
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("DJANGO_SCALE_EXAMPLE_SQLITE", str(BASE_DIR / "db.sqlite3")),
        }
    }

#: ``bench site``'s configuration (the module's docstring): read by the news views and admin.
SITE_CONFIG = os.environ.get("DJANGO_SCALE_EXAMPLE_CONFIG", "")
if SITE_CONFIG not in {"", "stock", "tuned", "scale"}:
    raise ImproperlyConfigured(
        f"DJANGO_SCALE_EXAMPLE_CONFIG={SITE_CONFIG!r}; use stock, tuned or scale, or leave it unset."
    )
if SITE_CONFIG in {"stock", "tuned"}:
    # Without django-scale's routing: no ReplicaRouter, no ScaleMiddleware, no managed replica.
    DATABASE_ROUTERS = []
    if "django_scale.middleware.ScaleMiddleware" in MIDDLEWARE:
        MIDDLEWARE.remove("django_scale.middleware.ScaleMiddleware")
    DJANGO_SCALE.pop("REPLICAS", None)
if SITE_CONFIG == "tuned" and REPLICA_URL:
    # django-multidb-router, as its README sets it up: reads on the replica, a request that
    # wrote (and the next ones, by cookie) pinned to the primary. It reads through the alias
    # django-scale does not manage.
    DATABASE_ROUTERS = ["multidb.PinningReplicaRouter"]
    MIDDLEWARE.insert(0, "multidb.middleware.PinningRouterMiddleware")
    REPLICA_DATABASES = ["replica_plain"]
if SITE_CONFIG in {"tuned", "scale"} and os.environ.get("DJANGO_SCALE_EXAMPLE_SERVER") != "uvicorn":
    # Persistent connections, as a careful deployment has them (stock: Django's default, a
    # new connection per request). Not under ASGI: Django runs each request's sync code in a
    # thread of its own there, so a kept connection is never reused and piles up on the server
    # (Django ticket #33497; Django's async docs: disable them, or use a connection pool).
    for _database in DATABASES.values():
        _database.setdefault("CONN_MAX_AGE", 60)
        _database.setdefault("CONN_HEALTH_CHECKS", True)
if SITE_CONFIG == "scale":
    # The monitoring issue's per-route percentiles: first, right before ScaleMiddleware (W510),
    # so that the latency covers its work too.
    MIDDLEWARE.insert(0, "django_scale.metrics.MetricsMiddleware")
    DJANGO_SCALE["METRICS_DIR"] = os.environ.get(
        "DJANGO_SCALE_EXAMPLE_METRICS_DIR", str(Path(tempfile.gettempdir()) / "newsroom-metrics")
    )

#: Seconds the cached pages (front page, section pages) and the sidebar fragment are fresh for.
NEWSROOM_PAGE_TTL, NEWSROOM_FRAGMENT_TTL = 60, 300
if _ttl := os.environ.get("DJANGO_SCALE_EXAMPLE_CACHE_TTL", ""):
    if not _ttl.isdigit() or int(_ttl) < 1:
        raise ImproperlyConfigured(
            f"DJANGO_SCALE_EXAMPLE_CACHE_TTL={_ttl!r}; use a whole number of seconds, 1 or more."
        )
    NEWSROOM_PAGE_TTL = NEWSROOM_FRAGMENT_TTL = int(_ttl)

REDIS_URL = os.environ.get("REDIS_URL", "")
CACHES: dict[str, dict[str, Any]]
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "newsroom",
            # A Redis that hangs holds a request at most this long (check django_scale.W212).
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 1},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
if SITE_CONFIG == "scale" and REDIS_URL and DATABASE_URL:
    # The admin's counts go through the query cache (news.admin.NewsroomPaginator).
    DJANGO_SCALE["QUERY_CACHE"] = True

if DATABASE_URL and os.environ.get("DJANGO_SCALE_EXAMPLE_POOLER") == "transaction":
    # Behind PgBouncer in transaction mode, as docs/deployment.md describes.
    DJANGO_SCALE["POOLER"] = dict.fromkeys(DATABASES, "transaction")
    for _database in DATABASES.values():
        _database["DISABLE_SERVER_SIDE_CURSORS"] = True

# `manage.py bench querycache` measures django-cachalot and django-cacheops each in a process
# of its own, with this variable set: only there is the rival installed (cachalot patches the
# ORM of every query once installed).
_QUERYCACHE_RIVAL = os.environ.get("DJANGO_SCALE_BENCH_QUERYCACHE", "")
if _QUERYCACHE_RIVAL == "django-cachalot":
    INSTALLED_APPS.append("cachalot")
elif _QUERYCACHE_RIVAL == "django-cacheops":
    INSTALLED_APPS.append("cacheops")
    CACHEOPS_REDIS = REDIS_URL
    CACHEOPS = {"news.*": {"ops": "all", "timeout": 3600}}

if DATABASE_URL:
    # The query sniper (PostgreSQL only): cancel queries past 30 s, end sessions idle in a
    # transaction for 60 s; run every 10 s by Celery beat (`celery -A newsroom beat`).
    DJANGO_SCALE["SNIPER_RULES"] = [
        {"name": "long query", "max_duration": 30},
        {
            "name": "idle in transaction",
            "states": ["idle in transaction", "idle in transaction (aborted)"],
            "max_duration": 60,
        },
    ]
    CELERY_BEAT_SCHEDULE = {"django-scale-snipe": {"task": "django_scale.snipe", "schedule": 10.0}}

# Without a broker, tasks run in the calling process as they are sent.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "")
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
if CELERY_TASK_ALWAYS_EAGER:
    CELERY_BROKER_URL = "memory://"
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# A server error's traceback on the console (stderr) also when DEBUG is off, where Django's
# default LOGGING only mails it to ADMINS: `bench site` keeps each app server's output, and a
# 5xx under a fault is worth its traceback.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # (With DEBUG on, Django's own console handler prints it.)
    "filters": {"require_debug_false": {"()": "django.utils.log.RequireDebugFalse"}},
    "handlers": {"errors": {"class": "logging.StreamHandler", "filters": ["require_debug_false"]}},
    "loggers": {"django.request": {"handlers": ["errors"], "level": "ERROR"}},
}
