"""Stale-while-revalidate caching: serve a value at once, refill it once, off the request path.

:func:`stale_while_revalidate` wraps a function (sync or async); :func:`swr_cache_page` wraps
a view; ``{% swrcache %}`` (in ``django_scale.templatetags.scale``) wraps a template fragment.
All three store an *envelope* ``(marker, value, created, fresh_until, stale_until)`` and:

* **fresh** (younger than ``fresh``): serve it. One cache read, nothing else.
* **stale** (younger than ``stale``): serve it, and claim the refill with an atomic ``SET NX``
  carrying a random token. Only the caller that wins the claim enqueues the Celery task
  ``django_scale.refresh`` with the key, the token and the key's generation; everyone else
  is counted as suppressed.
* **missing** (or older than ``stale``): a cold miss. One caller claims and computes; the
  others block on a per-key Redis list (``BLPOP``) until it is written or their ``wait``
  deadline passes, then compute themselves.

Writes are conditional on the key's *generation*: :meth:`SWRFunction.invalidate` increments
it, so a refill that started before the invalidation is discarded instead of overwriting
the newer state. On Redis (django-redis's default client) the claim, the conditional write,
the re-arm after a failure and the invalidation are Lua scripts, atomic across processes.
Other cache backends get the same logic through the Django cache API, which is atomic only
where ``cache.add()`` is, and waiters poll with a bounded backoff instead of blocking.

Failures degrade instead of failing: an unreachable cache opens a per-process circuit
breaker for ``CACHE_RETRY_AFTER`` seconds, during which the function is called and its
result kept in a small per-process map (one computation per process per key per ``fresh``);
an unreachable broker makes the claim holder refill inline (or, by option, serve stale); a
refill that raises re-arms the claim with exponential backoff and stale keeps being served;
a value that cannot be unpickled (a class renamed by a deploy) is a miss; an invalidation the
cache cannot take is journaled on the primary and replayed before any process reads the cache
again (:mod:`django_scale.cache.invalidations`).

The package's modules, one concept each: :mod:`~django_scale.cache.keys` (the key of an
entry), :mod:`~django_scale.cache.store` (the cache operations, and their Lua scripts on
Redis), :mod:`~django_scale.cache.degrade` (what a process keeps to itself: circuit breakers,
the fallback while the cache is down), :mod:`~django_scale.cache.invalidations` (the journal),
:mod:`~django_scale.cache.publisher` (the thread that sends refills),
:mod:`~django_scale.cache.engine` (the protocol for one key), :mod:`~django_scale.cache.task`
(what the Celery task runs), :mod:`~django_scale.cache.functions`,
:mod:`~django_scale.cache.pages` and :mod:`~django_scale.cache.fragments` (the three ways to
cache; :mod:`~django_scale.cache.page_refill` renders a page refill through the WSGI stack).
Nothing in the package imports :mod:`django_scale.tasks`: the engine sends the task
``django_scale.refresh`` by name, and the task calls :func:`django_scale.cache.task.run_refill_task`.
"""

from __future__ import annotations

from django_scale.cache.degrade import reset_state
from django_scale.cache.functions import SWRFunction, stale_while_revalidate
from django_scale.cache.pages import swr_cache_page
from django_scale.cache.publisher import wait_for_refills

__all__ = ["SWRFunction", "reset_state", "stale_while_revalidate", "swr_cache_page", "wait_for_refills"]
