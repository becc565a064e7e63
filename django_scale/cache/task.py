"""The refill task's work: find the registered function, check the message, refill."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from django_scale import metrics
from django_scale.cache.engine import Engine, registry

logger = logging.getLogger("django_scale.cache")


def _reject_refill(path: object, key: object, reason: str) -> bool:
    metrics.increment("swr.refill.rejected")
    logger.error("rejected a refill message for path %r, key %r: %s; nothing was written", path, key, reason)
    return False


def _importable_packages() -> list[str]:
    """Return the packages whose modules the refill task may import: installed apps' and the
    URLconf's."""
    from django.apps import apps
    from django.conf import settings

    packages = [config.name for config in apps.get_app_configs()]
    urlconf = getattr(settings, "ROOT_URLCONF", None)
    if isinstance(urlconf, str) and "." in urlconf:
        packages.append(urlconf.rpartition(".")[0])
    return packages


_urlconf_imported = False


def _engine_for(path: str) -> Engine | None:
    """Return the engine registered at *path*, importing only what may register it.

    A path is ``module.qualname``, so the module is one of its prefixes. Only the longest
    prefix that is an existing module inside the package of an installed app or of the
    ``ROOT_URLCONF`` is imported, and never a top-level module (an app's own package is
    imported by ``django.setup()``). Failing that, ``ROOT_URLCONF`` itself is imported once
    per process, which imports the views and what they use. Nothing else is ever imported.
    """
    global _urlconf_imported

    engine = registry.get(path)
    if engine is not None:
        return engine
    names = path.split(".")
    if len(names) < 2 or not all(name.isidentifier() for name in names):
        return None
    packages = _importable_packages()
    for end in range(len(names) - 1, 1, -1):
        module = ".".join(names[:end])
        if not any(module == package or module.startswith(package + ".") for package in packages):
            continue
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None  # a prefix that is a module, not a package: a shorter prefix is it
        if spec is None:
            continue
        try:
            importlib.import_module(module)
        except Exception:
            logger.exception("refill: importing %s, where %r should be registered, failed", module, path)
            return None
        return registry.get(path)
    if not _urlconf_imported:
        from django.conf import settings

        _urlconf_imported = True
        urlconf = getattr(settings, "ROOT_URLCONF", None)
        if isinstance(urlconf, str):
            try:
                importlib.import_module(urlconf)
            except Exception:
                logger.exception("refill: importing ROOT_URLCONF %r failed", urlconf)
        return registry.get(path)
    return None


def run_refill_task(
    path: Any, alias: Any, key: Any, token: Any, generation: Any, arguments: Any, primary: Any
) -> bool:
    """Run one refill for the Celery task ``django_scale.refresh``; return whether it wrote.

    Nothing in the message is trusted: the function is looked up in the registry (see
    :func:`_engine_for` for what may be imported to find it), the key is recomputed from the
    arguments with the engine's ``key_of`` and must equal the message's, and the cache must
    be the engine's own. A message that fails any of these is logged and dropped.
    """
    if not isinstance(path, str):
        return _reject_refill(path, key, "the path is not a string")
    engine = _engine_for(path)
    if engine is None or engine.rebuild is None:
        return _reject_refill(
            path, key, "no stale_while_revalidate function or swr_cache_page view is registered there"
        )
    if engine.key_of is None:
        return _reject_refill(path, key, "its engine cannot recompute keys from arguments (no key_of)")
    try:
        expected = engine.key_of(arguments)
    except Exception as error:
        return _reject_refill(path, key, f"its arguments do not make a key ({error})")
    if not isinstance(key, str) or key != expected:
        return _reject_refill(path, key, f"its arguments map to the key {expected!r}, not to this one")
    if alias != engine.alias():
        return _reject_refill(path, key, f"the cache {alias!r} is not the function's ({engine.alias()!r})")
    if not isinstance(token, str) or type(generation) is not int:
        return _reject_refill(path, key, "its claim token or generation is malformed")
    return engine.run_refill(
        alias, expected, token, generation, engine.rebuild(arguments), primary=bool(primary), swallow=False
    )
