"""The query sniper: cancel, then terminate, queries that run (or sit in a transaction) too long.

A web request that times out does not cancel its query: the query keeps its locks and its
CPU until it ends. The sniper reads ``pg_stat_activity`` on each database it watches and
signals the backends that match a :class:`Rule`: ``pg_cancel_backend()`` once a backend is
past the rule's ``max_duration``, ``pg_terminate_backend()`` once it is past
``max_duration + SNIPER_GRACE`` (a cancel did not end it, or it is idle in a transaction,
where a cancel does nothing).

**It never hits a later query.** Reading ``pg_stat_activity`` and signalling a pid in a second
statement cancels whatever that backend runs by the time the signal arrives, which may be the
next, innocent query on the same connection. The sniper signals in one statement that
re-checks the backend's identity (``pid``, ``backend_start``) and its query's identity
(``query_start``, ``state``, ``state_change``) in the same row it signals. ``pg_stat_activity``
is a per-transaction snapshot, so the sniper clears it (``pg_stat_clear_snapshot()``) right
before that statement: a snapshot taken when the candidates were read would still show the old
query. What remains is the time between the server reading the row and sending the signal,
inside one function call; a cancel that reaches a backend between two queries is discarded by
PostgreSQL.

**It never touches** its own backend, anything that is not a client backend (autovacuum,
walsenders, background and parallel workers: a parallel query is cancelled through its
leader), idle sessions, or backends whose ``application_name`` matches
``SNIPER_ALLOW_APPLICATIONS``. One sniper runs at a time across all processes and servers: a
run holds a transaction-scoped advisory lock (``pg_try_advisory_xact_lock``) in a transaction
on the primary that lasts the run, and skips when another holds it. The lock ends with that
transaction, whichever way the run ends, so it cannot leak: a session lock and its unlock
would be two statements that a transaction pooler (PgBouncer in transaction mode) may send to
two server connections, leaving the lock held for good. (Run inside an ``atomic()`` block on
the primary, the lock is held until that block's transaction ends.)
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from django.core.mail import mail_admins
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.dispatch import Signal

from django_scale import metrics
from django_scale.conf import conf, count_problem, seconds_problem
from django_scale.exceptions import SniperError
from django_scale.metrics.kills import record_kill

__all__ = [
    "LOCK_KEY",
    "Backend",
    "Kill",
    "Rule",
    "SnipeReport",
    "Sniper",
    "fingerprint",
    "kill_counts",
    "query_sniped",
    "run_loop",
    "snipe",
]

logger = logging.getLogger("django_scale.sniper")

#: The advisory lock key a sniper run holds on the primary ("djscsnpr" as bytes).
LOCK_KEY = 0x646A_7363_736E_7072

#: Sent for every backend the sniper signals, or in dry-run mode would signal, with
#: ``kill`` (a :class:`Kill`). Receivers run in the sniper's process; keep them fast.
#:
#: :meta hide-value:
query_sniped = Signal()

Action = Literal["cancel", "terminate"]

#: The states a rule may name (``pg_stat_activity.state``), idle excluded: an idle session
#: holds no snapshot or lock worth killing for.
STATES = (
    "active",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
)
RULE_KEYS = ("name", "max_duration", "state", "states", "databases", "applications", "users")

# Only client backends: autovacuum, walsenders, background and parallel workers have other
# backend_type values. A backend's age in its state: active queries from query_start, the
# others (idle in transaction) from when they entered the state.
CANDIDATES_SQL = """
SELECT pid, backend_start, xact_start, query_start, state_change, state, datname, usename,
       application_name, query, current_database(),
       EXTRACT(EPOCH FROM clock_timestamp()
               - CASE WHEN state = 'active' THEN query_start ELSE state_change END)
  FROM pg_stat_activity
 WHERE pid <> pg_backend_pid()
   AND backend_type = 'client backend'
   AND state IS NOT NULL
   AND state <> 'idle'
   AND state <> 'disabled'
"""

# One statement: the row is re-read and signalled only if it is still the same backend in the
# same query and state. Run after pg_stat_clear_snapshot(), so the row is read now.
KILL_SQL = """
SELECT pid, CASE WHEN %s THEN pg_terminate_backend(pid) ELSE pg_cancel_backend(pid) END
  FROM pg_stat_activity
 WHERE pid = %s
   AND backend_type = 'client backend'
   AND backend_start = %s
   AND state = %s
   AND query_start IS NOT DISTINCT FROM %s
   AND state_change IS NOT DISTINCT FROM %s
"""

# The sniper's counters are metrics named "sniper.<key>" (see django_scale.metrics).
_METRIC_PREFIX = "sniper."


def _count(key: str) -> None:
    metrics.increment(_METRIC_PREFIX + key)


def kill_counts() -> dict[str, int]:
    """Return how many backends this process's snipers cancelled, terminated, or would have.

    Keys: ``cancel``, ``terminate``, ``dry_run``, ``missed`` (the query had ended or moved on
    by the time of the signal), ``over_budget``, ``lock_busy`` (a run skipped for another sniper).
    They are the :mod:`django_scale.metrics` counters ``sniper.<key>``, so
    :func:`django_scale.metrics.reset` sets them back to zero too.
    """
    return {
        name.removeprefix(_METRIC_PREFIX): value
        for name, value in metrics.snapshot().items()
        if name.startswith(_METRIC_PREFIX) and isinstance(value, int)
    }


_LITERAL = re.compile(r"'(?:[^']|'')*'|\$\d+|%s|\b\d+(?:\.\d+)?\b")
_LIST = re.compile(r"\bIN\s*\(\s*\?(?:\s*,\s*\?)*\s*\)", re.IGNORECASE)
_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_SPACE = re.compile(r"\s+")


def fingerprint(sql: str) -> str:
    """Return *sql* with comments dropped, literals as ``?``, ``IN`` lists as ``IN (...)``, whitespace single.

    Two runs of the same query with different values get the same fingerprint.
    """
    text = _COMMENT.sub(" ", sql)
    text = _LITERAL.sub("?", text)
    text = _LIST.sub("IN (...)", text)
    return _SPACE.sub(" ", text).strip()


def _patterns(rule_name: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise SniperError(
        f"SNIPER_RULES rule {rule_name!r}: {key!r} must be a list of names or patterns, not "
        f"{type(value).__name__} ({value!r}). Set it to e.g. {key!r}: ['name', 'prefix-*']."
    )


@dataclass(frozen=True)
class Rule:
    """What the sniper kills: backends in one of ``states`` for longer than ``max_duration``.

    ``databases``, ``applications`` and ``users`` are :mod:`fnmatch` patterns matched against
    ``datname``, ``application_name`` and ``usename``; empty means any, except for
    ``databases``, where empty means the database of the alias being watched.
    """

    #: A name for logs, signals and mails.
    name: str
    #: Seconds a backend may spend in its state before it is cancelled.
    max_duration: float
    #: The ``pg_stat_activity.state`` values the rule applies to.
    states: tuple[str, ...] = ("active",)
    #: ``datname`` patterns; empty: only the watched alias's own database.
    databases: tuple[str, ...] = ()
    #: ``application_name`` patterns; empty: any application.
    applications: tuple[str, ...] = ()
    #: ``usename`` patterns; empty: any user.
    users: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, position: int = 0) -> Rule:
        """Build a rule from one ``SNIPER_RULES`` dict; raise :class:`SniperError` naming the bad key."""
        if not isinstance(data, Mapping):
            raise SniperError(
                f"SNIPER_RULES[{position}] must be a dict, not {type(data).__name__}. "
                'Set it to e.g. {"name": "long query", "max_duration": 30}.'
            )
        name = data.get("name", f"rule {position}")
        if not isinstance(name, str) or not name:
            raise SniperError(f"SNIPER_RULES[{position}]: 'name' must be a non-empty str, not {name!r}.")
        unknown = sorted(set(data) - set(RULE_KEYS))
        if unknown:
            raise SniperError(
                f"SNIPER_RULES rule {name!r} has unknown keys {', '.join(map(repr, unknown))}. "
                f"Known keys: {', '.join(RULE_KEYS)}."
            )
        duration = data.get("max_duration")
        if seconds_problem(duration, zero_allowed=True) is not None:
            raise SniperError(
                f"SNIPER_RULES rule {name!r}: 'max_duration' must be a number of seconds >= 0, not "
                f"{duration!r}. Set it to e.g. 'max_duration': 30."
            )
        if "state" in data and "states" in data:
            raise SniperError(f"SNIPER_RULES rule {name!r} sets both 'state' and 'states'; keep one.")
        states = _patterns(name, "states", data.get("states", data.get("state", "active")))
        wrong = [state for state in states if state not in STATES]
        if not states or wrong:
            raise SniperError(
                f"SNIPER_RULES rule {name!r}: {', '.join(map(repr, wrong)) or 'no state'} is not a "
                f"state the sniper acts on. Use some of: {', '.join(map(repr, STATES))}."
            )
        return cls(
            name=name,
            max_duration=float(cast(float, duration)),  # a number: seconds_problem checked it
            states=states,
            databases=_patterns(name, "databases", data.get("databases")),
            applications=_patterns(name, "applications", data.get("applications")),
            users=_patterns(name, "users", data.get("users")),
        )

    def matches(self, backend: Backend) -> bool:
        """Whether *backend* falls under this rule (its duration included)."""
        if backend.state not in self.states or backend.duration < self.max_duration:
            return False
        if self.databases:
            if not _match(backend.database, self.databases):
                return False
        elif backend.database != backend.current_database:
            return False
        if self.applications and not _match(backend.application_name, self.applications):
            return False
        return not (self.users and not _match(backend.user, self.users))


def _match(value: str | None, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value or "", pattern) for pattern in patterns)


@dataclass(frozen=True)
class Backend:
    """One client backend as ``pg_stat_activity`` showed it."""

    pid: int
    backend_start: datetime
    xact_start: datetime | None
    query_start: datetime | None
    state_change: datetime | None
    state: str
    database: str | None
    user: str | None
    application_name: str
    query: str
    #: The database of the connection that read this row.
    current_database: str
    #: Seconds in the current state (``active``: since ``query_start``).
    duration: float


@dataclass(frozen=True)
class Kill:
    """A backend the sniper signalled, or in dry-run mode would have."""

    #: The database alias it was found through.
    alias: str
    backend: Backend
    rule: Rule
    action: Action
    #: Whether the signal was sent (False in dry-run mode).
    signalled: bool
    dry_run: bool

    @property
    def fingerprint(self) -> str:
        """The killed query's :func:`fingerprint`."""
        return fingerprint(self.backend.query)

    @property
    def fingerprint_id(self) -> str:
        """A short stable hash of :attr:`fingerprint`, to group kills of the same query."""
        return hashlib.sha1(self.fingerprint.encode(), usedforsecurity=False).hexdigest()[:12]

    def describe(self) -> str:
        """Return one line for logs and mails."""
        backend = self.backend
        verb = f"would {self.action}" if self.dry_run else self.action
        return (
            f"{verb} pid {backend.pid} on {self.alias!r} (rule {self.rule.name!r}): "
            f"{backend.state} for {backend.duration:.1f} s, database {backend.database!r}, "
            f"user {backend.user!r}, application {backend.application_name!r}, "
            f"query [{self.fingerprint_id}] {self.fingerprint[:200]}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able summary (for the Celery task's result)."""
        return {
            "alias": self.alias,
            "pid": self.backend.pid,
            "rule": self.rule.name,
            "action": self.action,
            "signalled": self.signalled,
            "dry_run": self.dry_run,
            "state": self.backend.state,
            "duration": round(self.backend.duration, 3),
            "application_name": self.backend.application_name,
            "fingerprint": self.fingerprint,
        }


@dataclass
class SnipeReport:
    """What one sniper run did."""

    #: Backends signalled (or, in dry-run mode, that would have been).
    kills: list[Kill] = field(default_factory=list)
    #: Candidates whose query had ended or changed by the time of the signal: left alone.
    missed: list[Kill] = field(default_factory=list)
    #: Candidates left alone because the run's kill budget was spent.
    over_budget: list[Kill] = field(default_factory=list)
    #: True when another sniper held the lock, so this run did nothing.
    lock_busy: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-able summary."""
        return {
            "kills": [kill.as_dict() for kill in self.kills],
            "missed": [kill.as_dict() for kill in self.missed],
            "over_budget": [kill.as_dict() for kill in self.over_budget],
            "lock_busy": self.lock_busy,
        }


def _require_postgresql(alias: str) -> BaseDatabaseWrapper:
    if alias not in connections.settings:
        raise SniperError(f"The sniper was asked to watch {alias!r}, which is not in DATABASES.")
    connection = connections[alias]
    if connection.vendor != "postgresql":
        raise SniperError(
            f"The query sniper needs PostgreSQL; the database {alias!r} is {connection.vendor}. "
            "Set DJANGO_SCALE['SNIPER_DATABASES'] to PostgreSQL aliases only."
        )
    return connection


class Sniper:
    """Find and signal the backends that break the rules, on one or more database aliases.

    Every argument defaults to its ``DJANGO_SCALE`` setting, read when the sniper is built.
    """

    def __init__(
        self,
        *,
        using: Sequence[str] | str | None = None,
        rules: Sequence[Rule | Mapping[str, Any]] | None = None,
        grace: float | None = None,
        budget: int | None = None,
        allow_applications: Sequence[str] | None = None,
        dry_run: bool | None = None,
        mail_admins: bool | None = None,
    ) -> None:
        aliases = (using,) if isinstance(using, str) else using
        self.aliases: tuple[str, ...] = tuple(aliases) if aliases else conf.SNIPER_DATABASES
        raw_rules = conf.SNIPER_RULES if rules is None else rules
        self.rules: tuple[Rule, ...] = tuple(
            rule if isinstance(rule, Rule) else Rule.from_dict(rule, position=n)
            for n, rule in enumerate(raw_rules)
        )
        if grace is not None and seconds_problem(grace, zero_allowed=True) is not None:
            raise SniperError(f"grace must be a number of seconds >= 0, not {grace!r}.")
        self.grace = conf.SNIPER_GRACE if grace is None else float(grace)
        if budget is not None and count_problem(budget) is not None:
            raise SniperError(f"budget must be at least 1 kill per run (a whole number), not {budget!r}.")
        self.budget = conf.SNIPER_KILL_BUDGET if budget is None else budget
        self.allow_applications = tuple(
            conf.SNIPER_ALLOW_APPLICATIONS if allow_applications is None else allow_applications
        )
        self.dry_run = conf.SNIPER_DRY_RUN if dry_run is None else dry_run
        self.mail_admins = conf.SNIPER_MAIL_ADMINS if mail_admins is None else mail_admins

    # Reading -------------------------------------------------------------------------------

    def backends(self, alias: str) -> list[Backend]:
        """Return the client backends on *alias* that are not idle, the sniper's own excluded."""
        connection = _require_postgresql(alias)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(CANDIDATES_SQL)
            rows = cursor.fetchall()
        return [
            Backend(
                pid=row[0],
                backend_start=row[1],
                xact_start=row[2],
                query_start=row[3],
                state_change=row[4],
                state=row[5],
                database=row[6],
                user=row[7],
                application_name=row[8] or "",
                query=row[9] or "",
                current_database=row[10],
                duration=float(row[11] or 0.0),
            )
            for row in rows
        ]

    def candidates(self, alias: str) -> list[Kill]:
        """Return what the rules would do on *alias* now, longest-running first; signal nothing."""
        found = []
        for backend in self.backends(alias):
            if _match(backend.application_name, self.allow_applications):
                continue
            rule = next((rule for rule in self.rules if rule.matches(backend)), None)
            if rule is None:
                continue
            action: Action = "terminate" if backend.duration >= rule.max_duration + self.grace else "cancel"
            found.append(Kill(alias, backend, rule, action, signalled=False, dry_run=self.dry_run))
        found.sort(key=lambda kill: kill.backend.duration, reverse=True)
        return found

    # Signalling ----------------------------------------------------------------------------

    def signal(self, kill: Kill) -> bool:
        """Send *kill*'s signal if its backend is still in the same query and state.

        Return whether the signal was sent. The check and the signal are one statement.
        """
        backend = kill.backend
        with _require_postgresql(kill.alias).cursor() as cursor:
            # pg_stat_activity is read once per transaction; inside atomic() the kill statement
            # would otherwise re-check against the rows read for the candidates.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                KILL_SQL,
                [
                    kill.action == "terminate",
                    backend.pid,
                    backend.backend_start,
                    backend.state,
                    backend.query_start,
                    backend.state_change,
                ],
            )
            row = cursor.fetchone()
        return bool(row and row[1])

    @contextlib.contextmanager
    def _lock(self) -> Iterator[bool]:
        connection = _require_postgresql(conf.PRIMARY)
        # One transaction for the whole run: the lock is the transaction's, released by its
        # end on every path, on the server connection that took it (see the module docstring).
        with transaction.atomic(using=conf.PRIMARY):
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [LOCK_KEY])
                acquired = bool(cursor.fetchone()[0])
            yield acquired

    def run(self) -> SnipeReport:
        """Snipe once on every alias, holding the one-sniper lock; return what was done."""
        report = SnipeReport()
        with self._lock() as acquired:
            if not acquired:
                report.lock_busy = True
                _count("lock_busy")
                logger.info("another sniper holds the lock; skipping this run")
                return report
            budget = self.budget
            for alias in self.aliases:
                for kill in self.candidates(alias):
                    if budget <= 0:
                        report.over_budget.append(kill)
                        _count("over_budget")
                        continue
                    if self.dry_run:
                        report.kills.append(kill)
                        budget -= 1
                        self._notify(kill)
                        continue
                    if self.signal(kill):
                        done = Kill(kill.alias, kill.backend, kill.rule, kill.action, True, False)
                        report.kills.append(done)
                        budget -= 1
                        self._notify(done)
                    else:
                        report.missed.append(kill)
                        _count("missed")
        if report.over_budget:
            logger.warning(
                "sniper kill budget (%d per run) spent: %d more backends left alone",
                self.budget,
                len(report.over_budget),
            )
        return report

    def _notify(self, kill: Kill) -> None:
        _count("dry_run" if kill.dry_run else kill.action)
        # The host's recent kills, for the status page, scale_status and sketches.json.
        record_kill({"at": time.time(), **kill.as_dict(), "fingerprint_id": kill.fingerprint_id})
        line = kill.describe()
        logger.warning("sniper: %s", line)
        query_sniped.send(sender=Sniper, kill=kill)
        if self.mail_admins:
            backend = kill.backend
            try:
                mail_admins(
                    f"Query sniper: {'would ' if kill.dry_run else ''}{kill.action} a query of "
                    f"{backend.duration:.0f} s on {kill.alias}",
                    "\n".join(
                        [
                            line,
                            "",
                            f"Fingerprint ({kill.fingerprint_id}):",
                            kill.fingerprint,
                            "",
                            f"Duration: {backend.duration:.1f} s in state {backend.state!r}",
                            f"Application: {backend.application_name!r}",
                            f"User: {backend.user!r}, database: {backend.database!r}, pid: {backend.pid}",
                        ]
                    ),
                )
            except Exception:
                # A mail server that is down must not stop the sniper.
                logger.exception("sniper: could not mail ADMINS about pid %s", backend.pid)


def snipe(**options: Any) -> SnipeReport:
    """Run a :class:`Sniper` once with *options* (its keyword arguments) and the settings."""
    return Sniper(**options).run()


def run_loop(
    interval: float,
    *,
    stop: threading.Event | None = None,
    runs: int | None = None,
    **options: Any,
) -> Iterator[SnipeReport]:
    """Snipe every *interval* seconds until *stop* is set (or after *runs* runs); yield each report.

    The settings are read again for every run, so a changed ``DJANGO_SCALE`` takes effect.
    """
    if seconds_problem(interval) is not None:
        raise SniperError(f"interval must be a number of seconds > 0, not {interval!r}.")
    done = 0
    while stop is None or not stop.is_set():
        started = time.monotonic()
        yield snipe(**options)
        done += 1
        if runs is not None and done >= runs:
            return
        remaining = interval - (time.monotonic() - started)
        if remaining > 0:
            if stop is not None:
                stop.wait(remaining)
            else:
                time.sleep(remaining)
