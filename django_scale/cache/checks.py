"""System checks of stale-while-revalidate caching and its Celery refills (ids 2xx).

Only functions and views imported by the time checks run are seen; the URLconf is imported
first so that cached views are.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from django_scale.checks import PROCESS_LOCAL_CACHES, _message
from django_scale.conf import conf

__all__ = ["check_cache", "check_cache_timeouts", "check_query_cache"]

#: The Redis cache backends, and the key of ``OPTIONS`` that bounds how long a call waits for
#: the server's answer (django-redis's own, and redis-py's for Django's backend).
SOCKET_TIMEOUT_OPTIONS = {
    "django_redis.cache.RedisCache": "SOCKET_TIMEOUT",
    "django.core.cache.backends.redis.RedisCache": "socket_timeout",
}


def _e201_unknown_swr_cache(path: str, alias: str) -> checks.CheckMessage:
    known = ", ".join(repr(name) for name in getattr(settings, "CACHES", {})) or "none"
    return _message(
        checks.Error,
        "django_scale.E201",
        f"{path} is cached with stale_while_revalidate(cache={alias!r}), which is not in CACHES.",
        f"Add {alias!r} to CACHES or pass one of {known}.",
        obj=path,
    )


def _w202_process_local_cache(alias: str, backend: str, paths: list[str]) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W202",
        f"The cache {alias!r} is a {backend.rsplit('.', 1)[-1]}, which each process keeps to itself, "
        f"but {', '.join(paths[:3])}{' and others' if len(paths) > 3 else ''} refill through Celery: "
        "a worker's refill never reaches the web processes, and each process computes on its own.",
        "Use a shared cache such as django_redis.cache.RedisCache, or refill='inline'.",
        obj=f"CACHES[{alias!r}]",
    )


def _e203_celery_missing(paths: list[str]) -> checks.CheckMessage:
    return _message(
        checks.Error,
        "django_scale.E203",
        f"Celery is not installed, but {', '.join(paths[:3])} refill through Celery.",
        "Install Celery (pip install celery) and run a worker, or pass refill='inline'.",
        obj=paths[0],
    )


def _w204_task_not_registered(app_name: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W204",
        f"The Celery app {app_name!r} has no task django_scale.refresh: workers configured like it "
        "reject stale_while_revalidate refills as unregistered tasks, and values stay stale.",
        "Call app.autodiscover_tasks() in your Celery module, or import django_scale.tasks there.",
        obj=app_name,
    )


def _w205_default_celery_app(paths: list[str]) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W205",
        f"{', '.join(paths[:3])}{' and others' if len(paths) > 3 else ''} refill through Celery, but "
        "the current Celery app is Celery's unconfigured default: this process has not loaded the "
        "project's Celery app, so refills go to Celery's default broker (AMQP on localhost) and "
        "values stay stale.",
        "Load your Celery app when Django starts: in your project package's __init__.py, "
        "`from .celery import app as celery_app` (Celery's 'First steps with Django').",
        obj=paths[0],
    )


def _w206_broker_transport_missing(
    app_name: str, transport: str, error: BaseException
) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W206",
        f"The Celery app {app_name!r} uses the {transport!r} broker transport, which cannot be "
        f"imported ({error}): refills are never sent, and every stale value is recomputed in "
        "the web process.",
        f"Install the transport's libraries, e.g. pip install 'celery[{transport}]'.",
        obj=app_name,
    )


def _w210_pages_without_outer_middleware(paths: list[str]) -> checks.CheckMessage:
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return _message(
        checks.Warning,
        "django_scale.W210",
        f"{shown} {'is' if len(paths) == 1 else 'are'} cached with swr_cache_page, but "
        "django_scale.middleware.ScaleMiddleware is not the first entry of MIDDLEWARE (or the "
        "second, right after MetricsMiddleware): the final response cannot be judged, so these "
        "pages are served uncached.",
        'Put "django_scale.middleware.ScaleMiddleware" first in MIDDLEWARE (after '
        '"django_scale.metrics.MetricsMiddleware" only).',
        obj="MIDDLEWARE",
    )


def _w211_query_cache_unsupported(what: str, obj: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W211",
        f"QUERY_CACHE is on, but {what}: .cached() querysets run their queries uncached.",
        "The query cache needs a PostgreSQL PRIMARY and a django-redis CACHE_ALIAS shared by every "
        "process; turn QUERY_CACHE off, or point them there.",
        obj=obj,
    )


def _w212_no_socket_timeout(alias: str, option: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W212",
        f"The cache {alias!r} is Redis with no OPTIONS[{option!r}]: when its server hangs "
        "(accepts connections, never answers), every request that touches the cache waits for "
        "as long as redis-py does (for good, before redis-py 8), and django-scale's fallbacks for "
        "a cache that is down never start.",
        f'Set CACHES[{alias!r}]["OPTIONS"][{option!r}] = 1 (seconds), and a connect timeout too, '
        "as the caching docs show.",
        obj=f"CACHES[{alias!r}]",
    )


def check_cache_timeouts(**kwargs: Any) -> list[checks.CheckMessage]:
    """Check that the Redis caches django-scale uses bound their wait on a hung server.

    The caches checked are ``CACHE_ALIAS`` (the replicas' shared health, the query cache,
    cached functions and pages by default) and those cached functions and pages name.
    """
    from django_scale.cache.engine import registry

    try:
        aliases = {conf.CACHE_ALIAS}
    except Exception:
        return []  # check_settings reports a malformed DJANGO_SCALE
    aliases.update(engine.cache for engine in registry.values() if engine.cache is not None)
    configured = getattr(settings, "CACHES", {})
    messages = []
    for alias in sorted(aliases):
        options = configured.get(alias, {}).get("OPTIONS") or {}
        option = SOCKET_TIMEOUT_OPTIONS.get(str(configured.get(alias, {}).get("BACKEND", "")))
        if option is not None and options.get(option) is None:
            messages.append(_w212_no_socket_timeout(alias, option))
    return messages


def check_query_cache(**kwargs: Any) -> list[checks.CheckMessage]:
    """Check that the query cache, when on, has what it needs: PostgreSQL and django-redis."""
    try:
        enabled = conf.QUERY_CACHE
        alias, primary = conf.CACHE_ALIAS, conf.PRIMARY
    except Exception:
        return []  # check_settings reports the invalid setting
    if not enabled:
        return []
    messages = []
    backend = str(getattr(settings, "CACHES", {}).get(alias, {}).get("BACKEND", ""))
    if not backend.startswith("django_redis."):
        messages.append(
            _w211_query_cache_unsupported(f"CACHE_ALIAS {alias!r} is {backend or 'missing'}", "CACHES")
        )
    engine = str(getattr(settings, "DATABASES", {}).get(primary, {}).get("ENGINE", ""))
    if "postgres" not in engine and "postgis" not in engine:
        messages.append(
            _w211_query_cache_unsupported(
                f"the PRIMARY {primary!r} is not PostgreSQL ({engine})", "DATABASES"
            )
        )
    return messages


def check_cache(**kwargs: Any) -> list[checks.CheckMessage]:
    """Check the caches and the Celery setup that stale-while-revalidate functions and views use.

    Only functions and views imported by the time checks run are seen; the URLconf is imported
    first so that cached views are.
    """
    from django_scale.cache.engine import registry
    from django_scale.cache.pages import page_paths

    urlconf = getattr(settings, "ROOT_URLCONF", None)
    if urlconf:
        # Django's own URL checks report a broken URLconf.
        with contextlib.suppress(Exception):
            import_string(f"{urlconf}.urlpatterns")
    try:
        from celery import current_app
    except ImportError:
        pass
    else:
        if current_app.main != "default":
            _import_task_modules(current_app)
    try:
        default_alias = conf.CACHE_ALIAS
    except Exception:
        return []  # check_settings reports a malformed DJANGO_SCALE
    configured = getattr(settings, "CACHES", {})
    messages: list[checks.CheckMessage] = []
    for path, engine in sorted(registry.items()):
        if engine.cache is not None and engine.cache not in configured:
            messages.append(_e201_unknown_swr_cache(path, engine.cache))
    from django_scale.middleware import _is_first_middleware  # it imports the cache's pages

    if page_paths and not _is_first_middleware():
        messages.append(_w210_pages_without_outer_middleware(sorted(page_paths)))
    celery_engines = [engine for engine in registry.values() if engine.refill == "celery"]
    if not celery_engines:
        return messages
    paths = sorted(engine.path for engine in celery_engines)
    try:
        import celery
    except ImportError:
        return [*messages, _e203_celery_missing(paths)]
    app = celery.current_app
    if app.main == "default" and not app.conf.task_always_eager:
        # Celery's fallback app (celery/_state.py creates it as Celery("default") when no app
        # was made current): the project's app was never loaded in this process.
        return [*messages, _w205_default_celery_app(paths)]
    eager = bool(app.conf.task_always_eager)
    if not eager:
        by_alias: dict[str, list[str]] = {}
        for engine in celery_engines:
            by_alias.setdefault(engine.cache or default_alias, []).append(engine.path)
        for alias, users in sorted(by_alias.items()):
            backend = configured.get(alias, {}).get("BACKEND", "")
            if backend in PROCESS_LOCAL_CACHES:
                messages.append(_w202_process_local_cache(alias, backend, sorted(users)))
    # Import the task modules as a worker does at start (autodiscover_tasks() is lazy and
    # imports them then), so the question is whether a worker would know the task.
    _import_task_modules(app)
    if "django_scale.refresh" not in app.tasks:
        messages.append(_w204_task_not_registered(app.main or "default"))
    if not eager:
        error = _transport_import_error(app)
        if error is not None:
            scheme = str(app.conf.broker_url or "amqp").partition("://")[0].partition("+")[0]
            messages.append(_w206_broker_transport_missing(app.main or "default", scheme, error))
    return messages


#: Whether this thread is importing task modules for the checks: Celery's Django fixup runs
#: every system check when task modules are imported (celery/fixups/django.py,
#: ``on_import_modules`` -> ``validate_models`` -> ``run_checks``), which would import them again.
_importing = threading.local()


def _import_task_modules(app: Any) -> None:
    """Import *app*'s task modules as a worker does at start, so that functions cached in them
    are registered before they are checked (a fresh process has not imported them yet)."""
    if getattr(_importing, "active", False):
        return
    _importing.active = True
    try:
        with contextlib.suppress(Exception):
            app.loader.import_default_modules()
    finally:
        _importing.active = False


def _transport_import_error(app: Any) -> ImportError | None:
    """The error importing *app*'s broker transport raises, if any; nothing connects to the broker."""
    try:
        # kombu imports the transport's module when the connection is made, and the driver
        # library when the transport is (Transport.__init__); neither opens a socket.
        connection = app.connection_for_write()
        try:
            connection.transport  # noqa: B018
        finally:
            connection.release()
    except ImportError as error:
        return error
    return None
