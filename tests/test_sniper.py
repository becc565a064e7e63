"""The query sniper against the real PostgreSQL primary and standby.

Victims are separate connections (made by Django's connection handler, so with the driver under
test) that run queries in threads; the sniper reads ``pg_stat_activity`` and signals them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.core import mail
from django.core.management import CommandError, call_command
from django.db import OperationalError, connections
from django.test import override_settings
from support import wait_until

from django_scale import metrics
from django_scale.exceptions import SniperError
from django_scale.sniper import (
    KILL_SQL,
    LOCK_KEY,
    Kill,
    Rule,
    Sniper,
    fingerprint,
    kill_counts,
    query_sniped,
    run_loop,
)
from django_scale.testing import override_scale_settings

import harness

POSTGRES = pytest.mark.postgres
DB = pytest.mark.django_db(transaction=True, databases=["default", "mirror"])
VICTIM_APP = "django-scale-victim"
# Django 6.0 takes addresses; (name, address) pairs are deprecated there.
ADMINS: list[Any] = ["dba@example.com"] if django.VERSION >= (6, 0) else [("DBA", "dba@example.com")]
#: A rule that matches every victim at once.
VICTIMS = Rule(name="victims", max_duration=0, applications=(VICTIM_APP,))

#: Poll fast: the sniper races against queries that start and end.
POLL = 0.0005


class Victim:
    """A separate connection that runs queries in a thread and records how they ended."""

    def __init__(self, alias: str = "default", application_name: str = VICTIM_APP) -> None:
        self.connection = connections.create_connection(alias)
        pooler = harness.services().pooler if harness.BACKEND != "sqlite" else None
        if pooler is not None:
            # A victim is a session (its pid, application_name, session advisory locks), which a
            # transaction pooler does not keep: victims connect to the server itself. The
            # sniper under test still goes through PgBouncer.
            server = (
                pooler.direct_replica if alias in ("replica", "custom_backend") else pooler.direct_primary
            )
            self.connection.settings_dict = {**self.connection.settings_dict, "PORT": str(server.port)}
        self.connection.inc_thread_sharing()
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('application_name', %s, false), pg_backend_pid()", [application_name]
            )
            self.pid: int = cursor.fetchone()[1]
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.results: list[Any] = []

    def execute(self, sql: str, params: list[Any] | None = None) -> Any:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else None

    def start(self, sql: str, params: list[Any] | None = None) -> Victim:
        def run() -> None:
            try:
                self.results.append(self.execute(sql, params))
            except BaseException as error:
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float = 30.0) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the victim's query did not end"

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, OperationalError) and "due to user request" in str(self.error)

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            with connections["mirror"].cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [self.pid])
            self.thread.join(10)
        self.connection.dec_thread_sharing()
        self.connection.close()


@pytest.fixture
def victims() -> Iterator[Callable[..., Victim]]:
    made: list[Victim] = []

    def make(alias: str = "default", application_name: str = VICTIM_APP) -> Victim:
        victim = Victim(alias, application_name)
        made.append(victim)
        return victim

    yield make
    for victim in made:
        victim.close()


def state_of(pid: int, alias: str = "mirror") -> tuple[str | None, str | None]:
    """Return ``(state, query)`` of backend *pid*, read fresh on another connection."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return (row[0], row[1]) if row else (None, None)


def running(victim: Victim, marker: str, alias: str = "mirror") -> bool:
    state, query = state_of(victim.pid, alias)
    return state == "active" and query is not None and marker in query


def find(sniper: Sniper, victim: Victim, alias: str = "default") -> Kill:
    return wait_until(
        lambda: next((kill for kill in sniper.candidates(alias) if kill.backend.pid == victim.pid), None),
        f"pid {victim.pid} becoming a candidate",
        interval=POLL,
    )


# -- Without a database ------------------------------------------------------------------


def test_fingerprint_drops_literals_comments_and_lists():
    first = fingerprint("SELECT * FROM t WHERE a = 1 AND b = 'x''y' /* view */ AND c IN (1, 2, 3)")
    second = fingerprint("SELECT  *\nFROM t WHERE a = 22 AND b = 'z' AND c IN (4)")
    assert first == second == "SELECT * FROM t WHERE a = ? AND b = ? AND c IN (...)"


def test_rule_from_dict_defaults_and_patterns():
    rule = Rule.from_dict({"name": "r", "max_duration": 5, "applications": "web-*"})
    assert rule == Rule(name="r", max_duration=5.0, states=("active",), applications=("web-*",))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_duration": -1}, "'max_duration' must be a number of seconds >= 0"),
        ({"max_duration": "30"}, "'max_duration' must be a number of seconds >= 0"),
        ({"max_duration": 1, "state": "idle"}, "'idle' is not a state the sniper acts on"),
        ({"max_duration": 1, "colour": "red"}, "unknown keys 'colour'"),
        ({"max_duration": 1, "users": 3}, "'users' must be a list of names or patterns"),
        ({"max_duration": 1, "state": "active", "states": ["active"]}, "sets both 'state' and 'states'"),
    ],
)
def test_rule_from_dict_names_the_bad_key(data, message):
    with pytest.raises(SniperError, match=message):
        Rule.from_dict(data)


def test_sniper_refuses_a_database_that_is_not_postgresql():
    if harness.BACKEND == "sqlite":
        with pytest.raises(SniperError, match="needs PostgreSQL; the database 'default' is sqlite"):
            Sniper(using="default").run()
    else:
        with pytest.raises(SniperError, match="'nowhere', which is not in DATABASES"):
            Sniper(using="nowhere").candidates("nowhere")


# -- The innocent query ------------------------------------------------------------------


def innocent_runs(runs: int, kill: Callable[[Sniper, Kill, Victim], None], victims: Any) -> Victim:
    """Run *runs* times: a long query, then an innocent one on the same connection.

    Both block on advisory locks held by a gate connection, so each run is deterministic: the
    sniper finds the long query as a candidate, the long query ends, the innocent one starts,
    and only then is *kill* called with the stale candidate.
    """
    victim = victims()
    gate = victims(application_name="django-scale-gate")
    sniper = Sniper(using="default", rules=[VICTIMS], allow_applications=(), dry_run=False)
    outcomes: list[str] = []
    ready = threading.Semaphore(0)

    def victim_loop() -> None:
        for run in range(runs):
            if not ready.acquire(timeout=30):
                return
            victim.execute("SELECT 'long', pg_advisory_xact_lock(1, %s)", [run])
            try:
                victim.execute("SELECT 'innocent', pg_advisory_xact_lock(2, %s)", [run])
                outcomes.append("ok")
            except OperationalError as error:
                outcomes.append("cancelled" if "due to user request" in str(error) else repr(error))

    thread = threading.Thread(target=victim_loop, daemon=True)
    thread.start()
    try:
        for run in range(runs):
            gate.execute("SELECT pg_advisory_lock(1, %s), pg_advisory_lock(2, %s)", [run, run])
            ready.release()
            wait_until(lambda: running(victim, "'long'"), "the long query", interval=POLL)
            candidate = find(sniper, victim)
            assert "'long'" in candidate.backend.query
            gate.execute("SELECT pg_advisory_unlock(1, %s)", [run])
            wait_until(lambda: running(victim, "'innocent'"), "the innocent query", interval=POLL)
            kill(sniper, candidate, victim)
            gate.execute("SELECT pg_advisory_unlock(2, %s)", [run])
            wait_until(lambda run=run: len(outcomes) > run, "the innocent query's end", interval=POLL)
    finally:
        gate.execute("SELECT pg_advisory_unlock_all()")
        thread.join(30)
    victim.results = outcomes
    return victim


@POSTGRES
@pytest.mark.django_db(databases=["default", "mirror"])
def test_1000_innocent_queries_are_never_cancelled(victims):
    sent: list[bool] = []

    def snipe_stale(sniper: Sniper, candidate: Kill, victim: Victim) -> None:
        # The sniper's connection is inside the test's transaction, where pg_stat_activity
        # would still show the long query if the snapshot were not cleared.
        assert connections["default"].in_atomic_block
        sent.append(sniper.signal(candidate))

    victim = innocent_runs(1000, snipe_stale, victims)
    assert victim.results == ["ok"] * 1000
    assert sent == [False] * 1000


@POSTGRES
@pytest.mark.django_db(databases=["default", "mirror"])
def test_kill_by_pid_cancels_the_innocent_query(victims):
    """The control: the two-statement design this sniper avoids does cancel the next query."""

    def kill_by_pid(sniper: Sniper, candidate: Kill, victim: Victim) -> None:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT pg_cancel_backend(%s)", [candidate.backend.pid])

    assert innocent_runs(20, kill_by_pid, victims).results == ["cancelled"] * 20


@POSTGRES
@pytest.mark.django_db(databases=["default", "mirror"])
def test_recheck_without_clearing_the_snapshot_cancels_the_innocent_query(victims):
    """The control for pg_stat_clear_snapshot(): in a transaction, the re-check reads stale rows."""

    def recheck_stale_snapshot(sniper: Sniper, candidate: Kill, victim: Victim) -> None:
        backend = candidate.backend
        with connections["default"].cursor() as cursor:
            # No pg_stat_clear_snapshot(): the transaction still sees the long query.
            cursor.execute(
                KILL_SQL,
                [
                    False,
                    backend.pid,
                    backend.backend_start,
                    backend.state,
                    backend.query_start,
                    backend.state_change,
                ],
            )

    assert innocent_runs(20, recheck_stale_snapshot, victims).results == ["cancelled"] * 20


# -- Who gets killed, and when ----------------------------------------------------------


@POSTGRES
@DB
def test_long_query_is_cancelled_within_threshold_plus_interval(victims):
    victim = victims().start("SELECT pg_sleep(60)")
    wait_until(lambda: running(victim, "pg_sleep"), "the victim's query", interval=POLL)
    kills: list[Kill] = []
    stop = threading.Event()
    threshold, interval = 0.3, 0.2

    def loop() -> None:
        for report in run_loop(
            interval, stop=stop, using="default", rules=[Rule("slow", threshold, applications=(VICTIM_APP,))]
        ):
            kills.extend(report.kills)
            if report.kills:
                stop.set()
        connections.close_all()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    victim.join()
    stop.set()
    thread.join(10)
    assert victim.cancelled, victim.error
    [kill] = kills
    assert kill.backend.pid == victim.pid
    assert kill.action == "cancel" and kill.signalled
    # Seen past the threshold, and by the first run after it (with generous room for the CI).
    assert threshold <= kill.backend.duration < threshold + interval + 2.0


@POSTGRES
@DB
def test_never_touches_itself_walsenders_autovacuum_or_allowed_applications(victims):
    allowed = victims(application_name="pg_dump").start("SELECT pg_sleep(30)")
    victim = victims().start("SELECT pg_sleep(30)")
    wait_until(
        lambda: running(allowed, "pg_sleep") and running(victim, "pg_sleep"), "both queries", interval=POLL
    )
    everything = Rule("everything", 0, states=("active", "idle in transaction"), databases=("*",))
    sniper = Sniper(using="default", rules=[everything], dry_run=True)
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        own = cursor.fetchone()[0]
        cursor.execute(
            "SELECT pid, backend_type FROM pg_stat_activity WHERE backend_type <> 'client backend'"
        )
        others = dict(cursor.fetchall())
    # The standby streams from a walsender; the autovacuum launcher always runs.
    assert "walsender" in others.values() and "autovacuum launcher" in others.values()
    report = sniper.run()
    pids = {kill.backend.pid for kill in report.kills}
    assert victim.pid in pids
    assert own not in pids
    assert allowed.pid not in pids
    assert not pids & set(others)
    assert all(kill.dry_run and not kill.signalled for kill in report.kills)
    # Dry run: nothing was signalled.
    assert running(victim, "pg_sleep") and victim.error is None


@POSTGRES
@DB
def test_parallel_query_is_cancelled_through_its_leader_only(victims):
    victim = victims()
    victim.execute("CREATE TABLE sniper_parallel AS SELECT n FROM generate_series(1, 200000) AS n")
    try:
        victim.execute(
            "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; "
            "SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0"
        )
        victim.start("SELECT count(*) FROM sniper_parallel WHERE pg_sleep(0.001) IS NOT NULL")

        def workers() -> set[int]:
            with connections["mirror"].cursor() as cursor:
                cursor.execute("SELECT pg_stat_clear_snapshot()")
                cursor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE leader_pid = %s AND pid <> %s",
                    [victim.pid, victim.pid],
                )
                return {row[0] for row in cursor.fetchall()}

        parallel = wait_until(workers, "parallel workers starting", interval=POLL)
        report = Sniper(using="default", rules=[VICTIMS]).run()
        assert [kill.backend.pid for kill in report.kills] == [victim.pid]
        assert not parallel & {kill.backend.pid for kill in report.kills + report.missed + report.over_budget}
        victim.join()
        assert victim.cancelled, victim.error
    finally:
        victim.execute("DROP TABLE IF EXISTS sniper_parallel")


@POSTGRES
@DB
def test_idle_in_transaction_escalates_to_terminate(victims):
    victim = victims()
    victim.execute("BEGIN; SELECT 1")
    rule = Rule("idle tx", 0.2, states=("idle in transaction",), applications=(VICTIM_APP,))
    sniper = Sniper(using="default", rules=[rule], grace=0.5)
    wait_until(
        lambda: state_of(victim.pid)[0] == "idle in transaction", "the open transaction", interval=POLL
    )
    first = wait_until(lambda: sniper.run().kills, "the first kill", interval=POLL)
    assert [(kill.backend.pid, kill.action) for kill in first] == [(victim.pid, "cancel")]
    # A cancel does nothing to an idle session: still there, still in its transaction.
    assert state_of(victim.pid)[0] == "idle in transaction"
    second = wait_until(
        lambda: [kill for kill in sniper.run().kills if kill.action == "terminate"],
        "the terminate",
        interval=POLL,
    )
    assert [kill.backend.pid for kill in second] == [victim.pid]
    wait_until(lambda: state_of(victim.pid) == (None, None), "the backend exiting", interval=POLL)
    with pytest.raises(Exception):  # noqa: B017 - the driver's "connection closed" differs by version
        victim.execute("SELECT 1")


@POSTGRES
@DB
def test_kill_budget_leaves_the_rest_for_the_next_run(victims):
    three = [victims().start("SELECT pg_sleep(30)") for _ in range(3)]
    wait_until(lambda: all(running(victim, "pg_sleep") for victim in three), "three queries", interval=POLL)
    before = kill_counts().get("over_budget", 0)
    report = Sniper(using="default", rules=[VICTIMS], budget=2).run()
    assert len(report.kills) == 2 and len(report.over_budget) == 1
    assert kill_counts()["over_budget"] == before + 1
    # The counts are django_scale.metrics counters, exported with the others.
    assert metrics.snapshot()["sniper.over_budget"] == kill_counts()["over_budget"]
    for victim in three:
        if victim.pid in {kill.backend.pid for kill in report.kills}:
            victim.join()
            assert victim.cancelled
    [left] = report.over_budget
    assert running(next(v for v in three if v.pid == left.backend.pid), "pg_sleep")


@POSTGRES
@DB
def test_one_sniper_at_a_time(victims):
    victim = victims().start("SELECT pg_sleep(30)")
    wait_until(lambda: running(victim, "pg_sleep"), "the victim's query", interval=POLL)
    other = victims(application_name="other-sniper")
    other.execute("SELECT pg_advisory_lock(%s)", [LOCK_KEY])
    report = Sniper(using="default", rules=[VICTIMS]).run()
    assert report.lock_busy and report.kills == []
    assert running(victim, "pg_sleep")
    other.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])
    assert [kill.backend.pid for kill in Sniper(using="default", rules=[VICTIMS]).run().kills] == [victim.pid]


@POSTGRES
@pytest.mark.django_db(transaction=True, databases=["default", "replica", "mirror"])
def test_cancels_on_the_read_only_standby(victims, replica):
    victim = victims("replica").start("SELECT pg_sleep(30)")
    wait_until(
        lambda: running(victim, "pg_sleep", alias="replica"), "the query on the standby", interval=POLL
    )
    report = Sniper(using="replica", rules=[VICTIMS]).run()
    assert [(kill.alias, kill.backend.pid) for kill in report.kills] == [("replica", victim.pid)]
    victim.join()
    assert victim.cancelled, victim.error


@POSTGRES
@DB
@override_settings(ADMINS=ADMINS)
def test_every_kill_is_logged_signalled_counted_and_mailed(victims, caplog):
    # The Celery test worker sets the root logger to ERROR for the rest of the session.
    caplog.set_level(logging.WARNING, logger="django_scale.sniper")
    victim = victims().start("SELECT pg_sleep(30) /* report */")
    wait_until(lambda: running(victim, "pg_sleep"), "the victim's query", interval=POLL)
    received: list[Kill] = []

    def receiver(sender: Any, kill: Kill, **kwargs: Any) -> None:
        received.append(kill)

    query_sniped.connect(receiver)
    before = kill_counts().get("cancel", 0)
    try:
        with override_scale_settings(
            SNIPER_MAIL_ADMINS=True,
            SNIPER_RULES=[{"name": "victims", "max_duration": 0, "applications": [VICTIM_APP]}],
        ):
            report = Sniper(using="default").run()
    finally:
        query_sniped.disconnect(receiver)
    assert received == report.kills and len(received) == 1
    assert kill_counts()["cancel"] == before + 1
    assert f"cancel pid {victim.pid}" in caplog.text
    [message] = mail.outbox
    assert "dba@example.com" in message.to
    assert "SELECT pg_sleep(?)" in message.body and VICTIM_APP in message.body
    victim.join()
    assert victim.cancelled


@POSTGRES
@DB
def test_scale_snipe_command_dry_run(victims, capsys):
    victim = victims().start("SELECT pg_sleep(30)")
    wait_until(lambda: running(victim, "pg_sleep"), "the victim's query", interval=POLL)
    with override_scale_settings(
        SNIPER_RULES=[{"name": "victims", "max_duration": 0, "applications": [VICTIM_APP]}]
    ):
        call_command("scale_snipe", "--dry-run", "--database", "default")
    out = capsys.readouterr().out
    assert f"would cancel pid {victim.pid} on 'default'" in out
    assert running(victim, "pg_sleep")


@POSTGRES
@DB
def test_celery_beat_task_snipes(victims, celery_worker):
    from django_scale.tasks import snipe

    victim = victims().start("SELECT pg_sleep(30)")
    wait_until(lambda: running(victim, "pg_sleep"), "the victim's query", interval=POLL)
    with override_scale_settings(
        SNIPER_DATABASES=["default"],
        SNIPER_RULES=[{"name": "victims", "max_duration": 0, "applications": [VICTIM_APP]}],
    ):
        result = snipe.delay().get(timeout=30)
    assert [(kill["pid"], kill["action"], kill["signalled"]) for kill in result["kills"]] == [
        (victim.pid, "cancel", True)
    ]
    victim.join()
    assert victim.cancelled


def test_scale_snipe_refuses_a_loop_of_zero_seconds():
    with pytest.raises(CommandError, match="--loop must be a number of seconds greater than zero, not 0.0"):
        call_command("scale_snipe", "--loop", "0")
