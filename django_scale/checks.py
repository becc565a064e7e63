"""System checks, with ids ``django_scale.E<NNN>`` / ``django_scale.W<NNN>``.

Feature checks live with their feature (:mod:`django_scale.cache.checks`,
:mod:`django_scale.admin.checks`). Ids are numbered in ranges: 0xx settings, 1xx routing, 2xx cache and Celery, 3xx admin,
4xx querysets, 5xx operations. An id is never reused; each has an anchor in ``docs/checks.md``.
One factory per message keeps every id in exactly one place.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core import checks
from django.db import connections
from django.db.models import ForeignObjectRel, Model
from django.utils.module_loading import import_string

from django_scale.conf import SETTINGS, conf
from django_scale.prefetch import HAS_FETCH_MODES, PrefetchAwareForeignKey, PrefetchAwareOneToOneField
from django_scale.prefetch.plain import plain_relations

__all__ = [
    "check_ops",
    "check_querysets",
    "check_routing",
    "check_settings",
    "persistent_connections_under_asgi",
    "register_checks",
]

DOCS = "https://django-scale.readthedocs.io/en/latest/checks.html"


def _message(
    level: type[checks.Error | checks.Warning], check_id: str, msg: str, fix: str, *, obj: Any = None
) -> checks.CheckMessage:
    """Build a check message whose hint gives the fix and links to the id's docs.

    *obj* is what the message is about: a class, a model, or the setting's name as a string
    (``"DJANGO_SCALE['REPLICAS']"``). ``manage.py check`` prints it before the message.
    """
    # docs/checks.md labels each id as (django-scale-e001)=, which Sphinx renders as this id.
    anchor = check_id.lower().replace("_", "-").replace(".", "-")
    return level(msg, hint=f"{fix} See {DOCS}#{anchor}", obj=obj, id=check_id)


def _setting(key: str) -> str:
    """Name the ``DJANGO_SCALE`` key *key* as a check message's ``obj``."""
    return f"DJANGO_SCALE[{key!r}]"


def _e001_not_a_dict(value: Any) -> checks.CheckMessage:
    return _message(
        checks.Error,
        "django_scale.E001",
        f"The DJANGO_SCALE setting must be a dict, not {type(value).__name__}.",
        'Set it to a dict, e.g. DJANGO_SCALE = {"REPLICAS": ["replica"]}.',
        obj="DJANGO_SCALE",
    )


def _w001_unknown_key(key: str) -> checks.CheckMessage:
    matches = difflib.get_close_matches(str(key).upper(), SETTINGS, n=1, cutoff=0.6)
    fix = f"Did you mean {matches[0]!r}?" if matches else f"Known keys: {', '.join(sorted(SETTINGS))}."
    return _message(
        checks.Warning,
        "django_scale.W001",
        f"DJANGO_SCALE[{key!r}] is not a django-scale setting and is ignored.",
        fix,
        obj=_setting(key),
    )


def _e002_wrong_type(key: str, value: Any) -> checks.CheckMessage:
    spec = SETTINGS[key]
    return _message(
        checks.Error,
        "django_scale.E002",
        f"DJANGO_SCALE[{key!r}] must be {spec.expected}, not {type(value).__name__} ({value!r}).",
        f"Set it to e.g. DJANGO_SCALE[{key!r}] = {spec.example}.",
        obj=_setting(key),
    )


def _e003_invalid_value(key: str, value: Any, problem: str) -> checks.CheckMessage:
    spec = SETTINGS[key]
    return _message(
        checks.Error,
        "django_scale.E003",
        f"DJANGO_SCALE[{key!r}] = {value!r} is not allowed: {problem}.",
        f"Set it to e.g. DJANGO_SCALE[{key!r}] = {spec.example}.",
        obj=_setting(key),
    )


def _e004_unknown_database(key: str, alias: str) -> checks.CheckMessage:
    known = ", ".join(repr(name) for name in settings.DATABASES) or "none"
    return _message(
        checks.Error,
        "django_scale.E004",
        f"DJANGO_SCALE[{key!r}] names the database alias {alias!r}, which is not in DATABASES.",
        f"Add {alias!r} to DATABASES or remove it from DJANGO_SCALE[{key!r}] (DATABASES has {known}).",
        obj=_setting(key),
    )


def _e005_unknown_cache(alias: str) -> checks.CheckMessage:
    known = ", ".join(repr(name) for name in getattr(settings, "CACHES", {})) or "none"
    return _message(
        checks.Error,
        "django_scale.E005",
        f"DJANGO_SCALE['CACHE_ALIAS'] names the cache alias {alias!r}, which is not in CACHES.",
        f"Add {alias!r} to CACHES or set DJANGO_SCALE['CACHE_ALIAS'] to one of {known}.",
        obj=_setting("CACHE_ALIAS"),
    )


def _e101_primary_is_a_replica(alias: str) -> checks.CheckMessage:
    return _message(
        checks.Error,
        "django_scale.E101",
        f"DJANGO_SCALE['REPLICAS'] lists {alias!r}, which is the primary (DJANGO_SCALE['PRIMARY']).",
        f"Remove {alias!r} from REPLICAS: reads that must see writes would go to it as if it lagged.",
        obj=_setting("REPLICAS"),
    )


def _w102_router_without_middleware() -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W102",
        "ReplicaRouter is in DATABASE_ROUTERS but ScaleMiddleware is not in MIDDLEWARE: a user's "
        "next request after a write may read from a replica that has not replayed it yet.",
        'Add "django_scale.middleware.ScaleMiddleware" at the top of MIDDLEWARE.',
        obj="MIDDLEWARE",
    )


def _w103_replicas_without_router() -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W103",
        "DJANGO_SCALE['REPLICAS'] is set but ReplicaRouter is not in DATABASE_ROUTERS: no read "
        "goes to the replicas.",
        'Add "django_scale.routers.ReplicaRouter" to DATABASE_ROUTERS.',
        obj="DATABASE_ROUTERS",
    )


def _e104_engine_mismatch(alias: str, engine: str, primary_engine: str) -> checks.CheckMessage:
    return _message(
        checks.Error,
        "django_scale.E104",
        f"The replica {alias!r} uses the ENGINE {engine!r} but the primary uses {primary_engine!r}.",
        "A replica must be a copy of the primary on the same database vendor; fix DATABASES.",
        obj=f"DATABASES[{alias!r}]",
    )


def _w105_local_cache(alias: str, backend: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W105",
        f"DJANGO_SCALE['CACHE_ALIAS'] is {alias!r}, a {backend.rsplit('.', 1)[-1]}, which each "
        "process keeps to itself: a replica one process ejects keeps taking the others' reads.",
        "Point CACHE_ALIAS at a shared cache such as django_redis.cache.RedisCache.",
        obj=_setting("CACHE_ALIAS"),
    )


def _w106_no_connect_timeout(alias: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W106",
        f"The replica {alias!r} has no OPTIONS['connect_timeout']: connecting to a replica whose "
        "host hangs waits for the operating system's TCP timeout, minutes.",
        f'Set DATABASES[{alias!r}]["OPTIONS"]["connect_timeout"] = 2 (whole seconds, 2 at least).',
        obj=f"DATABASES[{alias!r}]",
    )


def _w107_middleware_order(after: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W107",
        f"ScaleMiddleware comes after {after} in MIDDLEWARE, so that middleware's writes (such as "
        "a session save) are not seen by read-your-writes.",
        "Move django_scale.middleware.ScaleMiddleware above it, to the top of MIDDLEWARE.",
        obj="MIDDLEWARE",
    )


def _w108_pooled_host_list(alias: str, shape: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W108",
        f"The replica {alias!r} {shape}: one alias reaches several servers, so the health "
        "monitor measures one standby while a request may read another, and read-your-writes "
        "and the lag limit no longer hold.",
        "Give each standby an alias of its own (one HOST, through its own PgBouncer if pooled) and "
        "list them all in DJANGO_SCALE['REPLICAS'].",
        obj=f"DATABASES[{alias!r}]",
    )


def _w109_weight_for_unknown_replica(alias: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W109",
        f"DJANGO_SCALE['REPLICA_WEIGHTS'] gives a weight to {alias!r}, which is not in "
        "DJANGO_SCALE['REPLICAS']: the weight is never used.",
        "Remove it from REPLICA_WEIGHTS, or add the alias to REPLICAS.",
        obj=_setting("REPLICA_WEIGHTS"),
    )


def _w110_safe_primary_methods(methods: list[str]) -> checks.CheckMessage:
    listed = ", ".join(repr(method) for method in methods)
    return _message(
        checks.Warning,
        "django_scale.W110",
        f"DJANGO_SCALE['PRIMARY_METHODS'] lists {listed}: every read of such a request goes to the "
        "primary, so the replicas take none of their reads.",
        "List only the methods of requests that write (the default: POST, PUT, PATCH, DELETE); pin the "
        "views that must read the primary with use_primary(). Silence this check if it is meant.",
        obj=_setting("PRIMARY_METHODS"),
    )


#: The id of the run-time check of an ASGI process's connections (silenced by its id, too).
W111 = "django_scale.W111"


def _w111_persistent_connections_under_asgi(aliases: list[str]) -> checks.CheckMessage:
    listed = ", ".join(repr(alias) for alias in aliases)
    return _message(
        checks.Warning,
        W111,
        f"ScaleMiddleware runs under ASGI and the database aliases {listed} keep connections between "
        "requests (CONN_MAX_AGE is not 0) without a pool. Under ASGI Django runs each request's sync "
        "code in a thread of its own, so every request leaves its connections open (Django ticket "
        "#33497); a replica that runs out of connections sends its reads to the primary.",
        "Set CONN_MAX_AGE to 0 for the ASGI deployment, or use Django's connection pool "
        "(OPTIONS['pool'], Django 5.1+ with psycopg 3).",
        obj="DATABASES",
    )


def persistent_connections_under_asgi() -> list[checks.CheckMessage]:
    """Check, at run time, the routed aliases of a process that serves ASGI (``django_scale.W111``).

    No system check can tell whether the project is served by an ASGI server: ``ScaleMiddleware``
    asks this when Django builds it for async requests, and logs what it returns.
    ``SILENCED_SYSTEM_CHECKS`` silences it as it does a system check.
    """
    if W111 in getattr(settings, "SILENCED_SYSTEM_CHECKS", ()):
        return []
    try:
        primary, replicas = conf.aliases()
    except Exception:
        return []  # check_settings reports a malformed DJANGO_SCALE
    persistent = []
    for alias in dict.fromkeys((primary, *replicas)):
        if alias not in settings.DATABASES:
            continue
        # The live settings of the alias (Django fills in CONN_MAX_AGE's default, 0).
        settings_dict = connections[alias].settings_dict
        if settings_dict.get("CONN_MAX_AGE", 0) != 0 and not (settings_dict.get("OPTIONS") or {}).get("pool"):
            persistent.append(alias)
    return [_w111_persistent_connections_under_asgi(persistent)] if persistent else []


def _pooled_shape(database: dict[str, Any]) -> str | None:
    """Describe how *database* reaches several servers under one alias, or ``None`` if it does not."""
    host, port = str(database.get("HOST") or ""), str(database.get("PORT") or "")
    options = database.get("OPTIONS") or {}
    if "," in host or "," in port:
        return f"lists several hosts in HOST ({host!r})"
    for key in ("target_session_attrs", "load_balance_hosts"):
        if key in options:
            return f"sets OPTIONS[{key!r}], which picks one of several servers at connect time"
    return None


def _w401_related_model_not_prefetch_aware(
    model: type[Model], accessor: str, related: type[Model]
) -> checks.CheckMessage:
    label, related_label = model._meta.label, related._meta.label
    return _message(
        checks.Warning,
        "django_scale.W401",
        f"{label} uses a prefetch-aware queryset, but {related_label} has more than one manager and its "
        f"default one is not a PrefetchAwareManager: {model.__name__}.{accessor}.all(), .count() and "
        ".exists() load row by row.",
        f"Give {related_label} a prefetch-aware default manager, e.g. objects = ScaleQuerySet.as_manager().",
        obj=model,
    )


def _w402_raise_in_production() -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W402",
        "DJANGO_SCALE['N_PLUS_ONE'] is 'raise' while DEBUG is False: a page with an N+1 query "
        "fails in production instead of being reported.",
        "Use 'log' (with N_PLUS_ONE_SAMPLE_RATE) in production, and raise in tests with "
        "django_scale.testing.forbid_n_plus_one().",
        obj=_setting("N_PLUS_ONE"),
    )


def _w403_plain_relation_field(model: type[Model], field: Any) -> checks.CheckMessage:
    kind = "OneToOneField" if field.one_to_one else "ForeignKey"
    return _message(
        checks.Warning,
        "django_scale.W403",
        f"{model._meta.label} uses a prefetch-aware queryset, but {model.__name__}.{field.name} is a "
        f"plain {kind}: on Django 4.2 to 6.0 it loads row by row.",
        f"Declare it with django_scale.prefetch.PrefetchAware{kind} (no migration needed).",
        obj=field,
    )


def _is_prefetch_aware(model: type[Model]) -> bool:
    from django_scale.querysets import PrefetchAwareManager, PrefetchAwareQuerySetMixin

    manager = model._meta.default_manager
    queryset_class = getattr(manager, "_queryset_class", None)
    return (
        isinstance(manager, PrefetchAwareManager)
        and isinstance(queryset_class, type)
        and issubclass(queryset_class, PrefetchAwareQuerySetMixin)
    )


def check_querysets(
    app_configs: Iterable[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Check that peer loading reaches every relation of prefetch-aware models, and the N+1 mode."""
    messages: list[checks.CheckMessage] = []
    models = (
        [model for config in app_configs for model in config.get_models()]
        if app_configs is not None
        else apps.get_models()
    )
    for model in models:
        if not _is_prefetch_aware(model):
            continue
        if not HAS_FETCH_MODES:
            # Before fetch modes, only the field's descriptor can load for all peers. A
            # multi-table inheritance parent link needs no query: Django builds the parent.
            for field in model._meta.concrete_fields:
                if (
                    (field.many_to_one or field.one_to_one)
                    and not getattr(field.remote_field, "parent_link", False)
                    and not isinstance(field, (PrefetchAwareForeignKey, PrefetchAwareOneToOneField))
                ):
                    messages.append(_w403_plain_relation_field(model, field))
        for relation in model._meta.get_fields():
            # Reverse foreign keys and both sides of many-to-many relations load through a
            # related manager, which Django builds from the related model's default manager.
            if not (relation.one_to_many or relation.many_to_many) or getattr(relation, "hidden", False):
                continue
            related = relation.related_model
            if not isinstance(related, type) or not issubclass(related, Model) or _is_prefetch_aware(related):
                continue
            if relation.auto_created and not relation.concrete:
                accessor = relation.get_accessor_name()  # type: ignore[union-attr]
            elif relation.many_to_many and not isinstance(relation, ForeignObjectRel):
                accessor = relation.name
            else:
                continue  # e.g. a GenericRelation: its manager is not peer-loaded
            if accessor in plain_relations(model).values():
                continue  # loaded for peers through the rows' prefetch cache
            messages.append(_w401_related_model_not_prefetch_aware(model, str(accessor), related))
    try:
        mode = conf.N_PLUS_ONE
    except Exception:
        return messages  # check_settings reports a malformed DJANGO_SCALE
    if mode == "raise" and not settings.DEBUG:
        messages.append(_w402_raise_in_production())
    return messages


def _e501_bad_sniper_rule(problem: str) -> checks.CheckMessage:
    return _message(
        checks.Error,
        "django_scale.E501",
        f"DJANGO_SCALE['SNIPER_RULES'] has a rule the query sniper cannot use: {problem}",
        'Fix the rule, e.g. {"name": "long query", "max_duration": 30, "states": ["active"]}.',
        obj=_setting("SNIPER_RULES"),
    )


def _w502_sniper_not_postgresql(alias: str, vendor: str) -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W502",
        f"DJANGO_SCALE['SNIPER_DATABASES'] lists {alias!r}, a {vendor} database: the query sniper "
        "reads pg_stat_activity and refuses to run on it.",
        f"Remove {alias!r} from SNIPER_DATABASES; list only PostgreSQL aliases.",
        obj=_setting("SNIPER_DATABASES"),
    )


def _w503_mail_without_admins() -> checks.CheckMessage:
    return _message(
        checks.Warning,
        "django_scale.W503",
        "DJANGO_SCALE['SNIPER_MAIL_ADMINS'] is True but ADMINS is empty: nobody is mailed about kills.",
        "Set ADMINS to the people who should hear about kills, or SNIPER_MAIL_ADMINS to False.",
        obj=_setting("SNIPER_MAIL_ADMINS"),
    )


ROUTER_PATH = "django_scale.routers.ReplicaRouter"
MIDDLEWARE_PATH = "django_scale.middleware.ScaleMiddleware"
#: Cache backends each process keeps to itself.
PROCESS_LOCAL_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)
#: Middleware that write to the database in their response phase.
WRITING_MIDDLEWARE = (
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
)


def _is_subclass_path(entry: Any, base_path: str) -> bool:
    """Whether a settings entry (dotted path, class or instance) is *base_path* or a subclass."""
    if entry == base_path:
        return True
    try:
        base = import_string(base_path)
        found = import_string(entry) if isinstance(entry, str) else entry
    except ImportError:
        return False
    cls = found if isinstance(found, type) else type(found)
    return issubclass(cls, base)


def check_routing(**kwargs: Any) -> list[checks.CheckMessage]:
    """Check that replica routing is set up whole: router, middleware, aliases and cache."""
    try:
        primary, replicas, cache_alias = conf.PRIMARY, conf.REPLICAS, conf.CACHE_ALIAS
    except Exception:
        return []  # check_settings reports a malformed DJANGO_SCALE
    if not (isinstance(primary, str) and all(isinstance(alias, str) for alias in replicas)):
        return []
    databases = settings.DATABASES
    messages: list[checks.CheckMessage] = []
    has_router = any(_is_subclass_path(entry, ROUTER_PATH) for entry in settings.DATABASE_ROUTERS)
    middleware = list(settings.MIDDLEWARE or ())
    position = next(
        (i for i, entry in enumerate(middleware) if _is_subclass_path(entry, MIDDLEWARE_PATH)), None
    )

    if primary in replicas:
        messages.append(_e101_primary_is_a_replica(primary))
    if has_router and position is None:
        messages.append(_w102_router_without_middleware())
    if replicas and not has_router:
        messages.append(_w103_replicas_without_router())
    primary_engine = databases.get(primary, {}).get("ENGINE", "")
    for alias in replicas:
        if alias not in databases or alias == primary:
            continue
        engine = databases[alias].get("ENGINE", "")
        if primary_engine and engine != primary_engine:
            messages.append(_e104_engine_mismatch(alias, engine, primary_engine))
        elif "postgresql" in engine and "connect_timeout" not in (databases[alias].get("OPTIONS") or {}):
            messages.append(_w106_no_connect_timeout(alias))
        if (shape := _pooled_shape(databases[alias])) is not None:
            messages.append(_w108_pooled_host_list(alias, shape))
    try:
        weights = conf.REPLICA_WEIGHTS
    except Exception:
        weights = {}
    if SETTINGS["REPLICA_WEIGHTS"].has_type(weights):
        messages.extend(_w109_weight_for_unknown_replica(alias) for alias in weights if alias not in replicas)
    # (Imported here, as the cache's checks are: the middleware imports the cache package.)
    from django_scale.middleware import SAFE_METHODS

    user = getattr(settings, "DJANGO_SCALE", None) or {}
    methods = user.get("PRIMARY_METHODS", ()) if isinstance(user, dict) else ()
    safe = sorted(SAFE_METHODS.intersection(methods)) if SETTINGS["PRIMARY_METHODS"].has_type(methods) else []
    if safe:
        messages.append(_w110_safe_primary_methods(safe))
    backend = getattr(settings, "CACHES", {}).get(cache_alias, {}).get("BACKEND", "")
    if replicas and backend in PROCESS_LOCAL_CACHES:
        messages.append(_w105_local_cache(cache_alias, backend))
    if position is not None:
        for entry in middleware[:position]:
            if entry in WRITING_MIDDLEWARE:
                messages.append(_w107_middleware_order(entry))
    return messages


def check_ops(**kwargs: Any) -> list[checks.CheckMessage]:
    """Check the operations settings: the sniper's rules, databases and mail, the pooler; request metrics."""
    from django_scale.exceptions import SniperError
    from django_scale.sniper import Rule

    user = getattr(settings, "DJANGO_SCALE", None) or {}
    if not isinstance(user, dict):
        return []  # check_settings reports it
    messages: list[checks.CheckMessage] = []
    rules = user.get("SNIPER_RULES", ())
    if SETTINGS["SNIPER_RULES"].has_type(rules):
        for position, rule in enumerate(rules):
            try:
                Rule.from_dict(rule, position=position)
            except SniperError as error:
                messages.append(_e501_bad_sniper_rule(str(error)))
    aliases = user.get("SNIPER_DATABASES", ())
    if SETTINGS["SNIPER_DATABASES"].has_type(aliases):
        for alias in aliases:
            engine = settings.DATABASES.get(alias, {}).get("ENGINE", "")
            if engine and "postgresql" not in engine and "postgis" not in engine:
                messages.append(_w502_sniper_not_postgresql(alias, engine.rsplit(".", 1)[-1]))
    if user.get("SNIPER_MAIL_ADMINS") is True and not getattr(settings, "ADMINS", None):
        messages.append(_w503_mail_without_admins())
    pooler = user.get("POOLER", {})
    if SETTINGS["POOLER"].has_type(pooler):
        # The pooler's checks live in their own module (imported here: it imports this one).
        from django_scale.pooler import pooler_messages

        messages.extend(pooler_messages(pooler))
    # Request metrics' checks live with them (imported here: they import this module).
    from django_scale.metrics.checks import check_metrics

    messages.extend(check_metrics())
    return messages


def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """Check the ``DJANGO_SCALE`` setting: its keys, their types and the aliases they name."""
    user = getattr(settings, "DJANGO_SCALE", None)
    if user is None:
        user = {}
    if not isinstance(user, dict):
        return [_e001_not_a_dict(user)]

    messages: list[checks.CheckMessage] = [_w001_unknown_key(key) for key in user if key not in SETTINGS]
    valid: set[str] = set()
    for key, spec in SETTINGS.items():
        if key not in user:
            valid.add(key)
            continue
        value = user[key]
        if not spec.has_type(value):
            messages.append(_e002_wrong_type(key, value))
        elif (problem := spec.problem(value)) is not None:
            messages.append(_e003_invalid_value(key, value, problem))
        else:
            valid.add(key)

    # Alias checks only make sense once the value itself is well-formed.
    aliases: Iterable[tuple[str, str]] = [
        *([("PRIMARY", conf.PRIMARY)] if "PRIMARY" in valid else []),
        *(("REPLICAS", alias) for alias in (conf.REPLICAS if "REPLICAS" in valid else ())),
        *(
            ("SNIPER_DATABASES", alias)
            for alias in (user.get("SNIPER_DATABASES", ()) if "SNIPER_DATABASES" in valid else ())
        ),
        *(("POOLER", alias) for alias in (user.get("POOLER", {}) if "POOLER" in valid else ())),
        *(
            ("SLOW_QUERY_DATABASES", alias)
            for alias in (user.get("SLOW_QUERY_DATABASES", ()) if "SLOW_QUERY_DATABASES" in valid else ())
        ),
    ]
    messages.extend(
        _e004_unknown_database(key, alias) for key, alias in aliases if alias not in settings.DATABASES
    )
    if "CACHE_ALIAS" in valid and conf.CACHE_ALIAS not in getattr(settings, "CACHES", {}):
        messages.append(_e005_unknown_cache(conf.CACHE_ALIAS))
    return messages


def register_checks() -> None:
    """Register django-scale's system checks with Django (called from ``AppConfig.ready()``)."""
    checks.register(check_settings, "django_scale")
    checks.register(check_routing, "django_scale")
    checks.register(check_querysets, "django_scale")
    checks.register(check_ops, "django_scale")
    # The cache's checks live with the cache (imported here: they import this module).
    from django_scale.cache.checks import check_cache, check_cache_timeouts, check_query_cache

    checks.register(check_cache, "django_scale", checks.Tags.caches)
    checks.register(check_cache_timeouts, "django_scale", checks.Tags.caches)
    checks.register(check_query_cache, "django_scale", checks.Tags.caches)
    from django_scale.indexes.checks import check_model_indexes

    checks.register(check_model_indexes, "django_scale", checks.Tags.models)
