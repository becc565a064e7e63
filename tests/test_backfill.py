"""Resumable backfills (``django_scale.contrib.backfill``): runs, checkpoints, the command, migrations."""

from __future__ import annotations

import importlib
import io
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.core.management.base import OutputWrapper
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.recorder import MigrationRecorder
from django.db.migrations.state import ProjectState
from support import subprocess_env, wait_until

from django_scale.bulk import copy_from
from django_scale.contrib.backfill.models import BackfillCheckpoint
from django_scale.contrib.backfill.runner import BackfillProgress, progress_bar, run_backfill
from django_scale.exceptions import BulkError
from django_scale.replicas import use_primary

from testapp.backfills import DoubleValues
from testapp.models import BackfillLog, BackfillSource

TESTS = Path(__file__).resolve().parent
TABLE = "django_scale_backfill_checkpoint"
ONLY_POSTGRES = pytest.mark.postgres


def assert_exactly_once(total: int) -> None:
    logged = Counter(BackfillLog.objects.values_list("source_id", flat=True))
    sources = set(BackfillSource.objects.values_list("pk", flat=True))
    assert set(logged) == sources, "a row was skipped (a gap)"
    assert set(logged.values()) == {1}, "a row was processed twice"
    assert len(sources) == total
    assert not BackfillSource.objects.filter(doubled__isnull=True).exists()


@pytest.mark.django_db
def test_backfill_resumes_from_its_checkpoint(capsys):
    copy_from(BackfillSource, [(n,) for n in range(203)], fields=["value"])
    first = run_backfill(DoubleValues(), max_batches=3)
    assert (first.rows_done, first.batches_done, first.finished_at) == (75, 3, None)
    call_command("scale_backfill", "status")
    assert "double-values: unfinished, 75 rows" in capsys.readouterr().out
    done = run_backfill(DoubleValues())
    assert done.rows_done == 203 and done.finished_at is not None
    assert_exactly_once(203)
    # Finished: running again does nothing; reset makes it start over.
    assert run_backfill(DoubleValues()).rows_done == 203
    call_command("scale_backfill", "reset", "double-values")
    assert not BackfillCheckpoint.objects.exists()


@pytest.mark.django_db
def test_backfill_refuses_when_another_runner_moved_the_checkpoint():
    copy_from(BackfillSource, [(n,) for n in range(100)], fields=["value"])
    progressed = []

    def other_runner(progress: Any) -> None:
        progressed.append(progress.rows_done)
        BackfillCheckpoint.objects.update(last_key=10**9)

    with pytest.raises(BulkError, match="another runner is processing it"):
        run_backfill(DoubleValues(), progress=other_runner)
    assert progressed == [25]
    assert BackfillLog.objects.count() == 25


@ONLY_POSTGRES
@pytest.mark.django_db(transaction=True, databases=["default", "replica"])
def test_backfill_killed_with_sigkill_resumes_without_duplicates_or_gaps():
    total = 2000
    copy_from(BackfillSource, [(n,) for n in range(total)], fields=["value"])
    command = [sys.executable, "-m", "django", "scale_backfill", "run", "testapp.backfills.DoubleValues"]
    env = subprocess_env(BACKFILL_BATCH_SLEEP="0.01")
    for kill_after in (300, 900):
        process = subprocess.Popen(
            command, env=env, cwd=TESTS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:

            def progressed(process: subprocess.Popen[bytes] = process, kill_after: int = kill_after) -> bool:
                assert process.poll() is None, process.communicate()[1].decode()
                return BackfillCheckpoint.objects.using("default").filter(rows_done__gte=kill_after).exists()

            wait_until(progressed, f"the backfill to pass {kill_after} rows", timeout=60)
        finally:
            process.send_signal(signal.SIGKILL)
            _, err = process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL
        with use_primary():
            checkpoint = BackfillCheckpoint.objects.get()
            assert checkpoint.finished_at is None and kill_after <= checkpoint.rows_done < total
            # Only whole batches were committed, each with its checkpoint.
            assert BackfillLog.objects.count() == checkpoint.rows_done
    env["BACKFILL_BATCH_SLEEP"] = "0"
    result = subprocess.run(
        command, env=env, cwd=TESTS, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "double-values: finished, 2,000 rows" in result.stdout
    with use_primary():
        assert_exactly_once(total)
        assert BackfillCheckpoint.objects.get().finished_at is not None


@pytest.mark.django_db
def test_scale_backfill_names_what_it_cannot_run():
    with pytest.raises(CommandError, match="Cannot import 'testapp.backfills.Nothing'"):
        call_command("scale_backfill", "run", "testapp.backfills.Nothing")
    with pytest.raises(CommandError, match="'testapp.models.Author' is not a subclass"):
        call_command("scale_backfill", "run", "testapp.models.Author")
    with pytest.raises(CommandError, match="No backfill checkpoint is named 'nothing'"):
        call_command("scale_backfill", "reset", "nothing")


def test_progress_bar_writes_through_a_commands_output_wrapper():
    out = io.StringIO()
    draw = progress_bar(OutputWrapper(out))
    draw(BackfillProgress("fill", rows_done=50, rows_total=100, batch_size=10, rows_per_second=5.0))
    # Unstyled, and no ending added to the line: one line, as on a plain file.
    assert out.getvalue() == "fill: [###############...............] 50/100~ rows (50%), 5 rows/s, batch 10\n"


def test_the_old_module_still_imports_with_a_deprecation_warning():
    sys.modules.pop("django_scale.backfill", None)
    with pytest.warns(DeprecationWarning, match="add 'django_scale.contrib.backfill' to INSTALLED_APPS"):
        old = importlib.import_module("django_scale.backfill")
    assert old.run_backfill is run_backfill


@pytest.mark.django_db(databases="__all__")
def test_models_and_migrations_agree():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def _tables() -> set[str]:
    with connection.cursor() as cursor:
        return set(connection.introspection.table_names(cursor))


def _migrate(*targets: tuple[str, str | None]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()  # the recorder's view of what is applied, afresh
    executor.migrate(list(targets))


def _latest(app: str) -> tuple[str, str]:
    [leaf] = MigrationExecutor(connection).loader.graph.leaf_nodes(app)
    return leaf


@pytest.mark.django_db(transaction=True)
def test_upgrade_keeps_the_backfill_table_and_its_rows_and_fresh_installs_get_none():
    core, backfill = _latest("django_scale"), _latest("django_scale_backfill")
    try:
        _migrate(("django_scale", None), ("django_scale_backfill", None))
        assert TABLE not in _tables()
        # A fresh install that does not list the backfill app gets no backfill table.
        _migrate(core)
        assert TABLE not in _tables()
        _migrate(("django_scale", None))

        # A database migrated with django_scale 0001 as it was: the table, with a checkpoint.
        old_0001 = importlib.import_module("django_scale.migrations.0001_initial").Migration
        [create] = old_0001.operations[0].state_operations
        before, after = ProjectState(), ProjectState()
        create.state_forwards("django_scale", after)
        with connection.schema_editor() as editor:
            create.database_forwards("django_scale", editor, before, after)
        MigrationRecorder(connection).record_applied("django_scale", "0001_initial")
        old = after.apps.get_model("django_scale", "BackfillCheckpoint")
        old.objects.create(name="still-running", last_key=41, rows_done=41, batches_done=3)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s::regclass::oid", [TABLE])
                oid = cursor.fetchone()

        _migrate(core, backfill)
        checkpoint = BackfillCheckpoint.objects.get()
        assert (checkpoint.name, checkpoint.last_key, checkpoint.rows_done) == ("still-running", 41, 41)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s::regclass::oid", [TABLE])
                assert cursor.fetchone() == oid, "the table was recreated"
    finally:
        _migrate(core, backfill)
    assert TABLE in _tables()
