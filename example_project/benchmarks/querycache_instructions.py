"""Instructions of a query cache miss and hit, and of their parts, under callgrind.

The figures of docs/querycache.md ("Instructions per miss and per hit"). Run from the
repository (valgrind installed)::

    DJANGO_SCALE_EXAMPLE_HARNESS=1 PATH=/usr/lib/postgresql/15/bin:$PATH \\
        python example_project/benchmarks/querycache_instructions.py [page|report]

This process starts the services, seeds the tables as ``bench querycache`` does, and runs
itself again under callgrind (``PYTHONHASHSEED=0``, one dump per thread at each
``os.getppid()``). The child times each segment, 50 calls after 10 to 30 of warm-up, and the
parent prints the main thread's instructions per call. A miss reads a parameter not seen
before (its SQL is new to the compile memo too, as in the benchmark). The entry writer's
delay is raised in the child: under callgrind 50 ms is a few calls, and its thread would send
the entries that, at full speed, the next miss's ``MGET`` carries.
"""

from __future__ import annotations

import gc
import itertools
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "newsroom.settings")

import django  # noqa: E402

django.setup()

CHILD = "DJANGO_SCALE_BENCH_QC_INSTRUCTIONS_CHILD"
CALLS = 50
WHOLE = ["build", "no cache", "no cache, new parameter", "hit", "miss", "PING"]
PARTS = [
    "build",
    "pickle the query",
    "compile (as_sql)",
    "compile memo, not found",
    "compile memo, found",
    "entry key",
    "MGET and decode",
    "MGET carrying one SET",
    "pickle the entry",
    "unpickle the entry",
    "from_db, every row",
    "PING",
]

#: The parts that build a queryset first (the table gives them minus "build").
BUILDS = {
    "pickle the query",
    "compile (as_sql)",
    "compile memo, not found",
    "compile memo, found",
    "entry key",
}


def _segments(functions: dict[str, Callable[[], Any]], names: list[str], warm: int) -> None:
    for name in names:
        function = functions[name]
        for _ in range(warm):
            function()
        gc.collect()
        gc.freeze()
        os.getppid()
        for _ in range(CALLS):
            function()
        os.getppid()
        gc.unfreeze()


def child(query: str) -> None:
    from django.db import connections

    from django_scale.cache.queries import compiled, reads, rows, storing
    from django_scale.cache.queries.shared import Entry, SharedPositions
    from django_scale.cache.queries.storing import Outgoing
    from django_scale.cache.store import RedisStore, store_for
    from django_scale.conf import conf
    from django_scale.replicas import use_primary
    from django_scale.testing import override_scale_settings

    from benchmarks.querycache import _pinger, _systems

    storing.DELAY = 30.0
    make = _systems()["django-scale"][query]
    ping = _pinger()
    new = itertools.count(int(os.environ[CHILD]))
    with override_scale_settings(QUERY_CACHE=True), use_primary():
        list(make().cached())
        list(make(next(new)).cached())  # the first miss on the connection asks its server
        _segments(
            {
                "build": lambda: make(),
                "no cache": lambda: list(make()),
                "no cache, new parameter": lambda: list(make(next(new))),
                "hit": lambda: list(make().cached()),
                "miss": lambda: list(make(next(new)).cached()),
                "PING": ping,
            },
            WHOLE,
            30,
        )
        store = store_for(conf.CACHE_ALIAS)
        assert isinstance(store, RedisStore)
        shared = SharedPositions(store)
        known = compiled.compile_query(make().query, "default")
        ((key, tables),) = known.keys.values()
        database = str(connections["default"].settings_dict["NAME"])
        payload = shared._redis().get(shared._key(key))
        entry = shared.client.decode(payload)
        options = reads.CacheOptions()
        carried = [Outgoing(conf.CACHE_ALIAS, key, payload, 3600.0, lambda error: None, 0.0)]
        assert known.shape is not None
        shape = known.shape
        _segments(
            {
                "build": lambda: make(next(new)),
                "pickle the query": lambda: pickle.dumps(make(next(new)).query, pickle.HIGHEST_PROTOCOL),
                "compile (as_sql)": lambda: make(next(new)).query.get_compiler("default").as_sql(),
                "compile memo, not found": lambda: compiled.compile_for_run(make(next(new)).query, "default"),
                "compile memo, found": lambda: compiled.compile_for_run(make().query, "default"),
                "entry key": lambda: reads._key_of(
                    make(next(new)), known, options, "default", database, True
                ),
                "MGET and decode": lambda: shared.fetch(key, "default", tables, database),
                "MGET carrying one SET": lambda: shared.fetch(
                    key, "default", tables, database, None, carried
                ),
                "pickle the entry": lambda: shared.encode(Entry(*entry)),
                "unpickle the entry": lambda: shared.client.decode(payload),
                "from_db, every row": lambda: rows.build(shape, "default", entry[-1], {}),
                "PING": ping,
            },
            PARTS,
            10,
        )


def parent(query: str) -> None:
    from django.core.management import call_command

    from django_scale.replicas import use_primary

    from benchmarks import rerun_under_callgrind
    from benchmarks.querycache import _setup

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed")
    call_command("migrate", verbosity=0, interactive=False)
    with use_primary():
        _setup()
    with tempfile.TemporaryDirectory() as directory:
        # Parameters no earlier run used: their entries are not in Redis.
        child = {CHILD: str(1 + int(time.time()) % 100000 * 10000)}
        rerun_under_callgrind(valgrind, directory, child, argv=[__file__, query])
        dumps: dict[int, int] = {}
        for file in Path(directory).glob("cg.*.*-01"):  # the main thread's dumps
            number = re.search(r"\.(\d+)-01$", file.name)
            summary = re.search(r"^(?:summary|totals): (\d+)", file.read_text(), re.MULTILINE)
            assert number is not None and summary is not None, file
            dumps[int(number.group(1))] = int(summary.group(1))
    segments = [dumps[number] / CALLS / 1e6 for number in sorted(dumps) if number % 2 == 0]
    whole = dict(zip(WHOLE, segments[: len(WHOLE)], strict=True))
    parts = dict(zip(PARTS, segments[len(WHOLE) :], strict=True))
    print(f"query cache, the {query} query: instructions per call (callgrind, {CALLS} calls)")
    for name, count in whole.items():
        print(f"  {name:28s} {count:7.3f} M")
    print(f"  miss - no cache (new param) {whole['miss'] - whole['no cache, new parameter']:+7.3f} M")
    print("parts (those that build the queryset: minus building it)")
    for name, count in parts.items():
        alone = count - parts["build"] if name in BUILDS else count
        print(f"  {name:28s} {alone:7.3f} M")


if __name__ == "__main__":
    chosen = sys.argv[1] if len(sys.argv) > 1 else "page"
    if os.environ.get(CHILD):
        child(chosen)
    else:
        parent(chosen)
