"""The ``COPY`` pipe's wire: one connection's ``COPY ... TO STDOUT`` fed into another's ``COPY ... FROM STDIN``.

* psycopg 3: the source's ``COPY`` is read through libpq (:func:`_copy_out_blocks`) in blocks
  of about :data:`BLOCK_BYTES`, each written to the target's ``Copy``, in one thread.
* psycopg2: ``copy_expert`` blocks, so the source side runs in a thread and hands blocks to the
  target's ``copy_expert`` through a bounded queue (:class:`_Pipe`).

Either way memory holds a few blocks whatever the size, and a failure on either side ends
both ``COPY`` statements with an error: the target never commits a stream cut short.

A source that is one of ``REPLICAS`` is watched, for the whole stream, by the replica guard's
watchdog: a standby that hangs (accepts, never answers) is cut off once its monitor finds it
unresponsive for ``REPLICA_DEADLINE``, as a query on it would be, and the pipe fails instead of
waiting for ever. (A ``COPY`` goes through no execute wrapper, so the guard itself never sees it.)
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import select
import threading
from collections.abc import Generator, Iterator
from contextlib import closing
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from django_scale.conf import conf
from django_scale.replicas.guard import watchdog

__all__ = ["BLOCK_BYTES", "QUEUE_BLOCKS", "pump_psycopg2", "pump_psycopg3"]

#: Blocks of COPY data queued between the two connections (psycopg2): bounds the memory.
QUEUE_BLOCKS = 16
#: Bytes of COPY data gathered before they are handed on.
BLOCK_BYTES = 1 << 16


class _Pipe:
    """COPY data from a thread (``write``, the source's ``copy_expert``) to a reader (``read``).

    psycopg2 calls ``write`` once per row: rows are gathered into blocks of about
    :data:`BLOCK_BYTES` before crossing the queue, so the threads meet a few times per block.
    """

    def __init__(self) -> None:
        self.blocks: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUE_BLOCKS)
        self.aborted = threading.Event()
        self._pending = bytearray()

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self.aborted.is_set():
            try:
                self.blocks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        # Aborted: dropped, the source COPY is being cancelled.

    def write(self, data: bytes) -> int:
        pending = self._pending
        pending += data
        if len(pending) >= BLOCK_BYTES:
            self._put(bytes(pending))
            pending.clear()
        return len(data)

    def close_writing(self, error: BaseException | None = None) -> None:
        """End the stream: the rest of the data, then ``error`` or the end."""
        if error is None and self._pending:
            self._put(bytes(self._pending))
            self._pending.clear()
        self._put(error)

    def read(self, size: int = -1) -> bytes:
        block = self.blocks.get()
        if block is None:
            return b""
        if isinstance(block, BaseException):
            # Raised inside copy_expert: psycopg2 ends the COPY with an error, writing nothing.
            raise block
        return block


@contextlib.contextmanager
def _watched(alias: str, connection: BaseDatabaseWrapper) -> Iterator[None]:
    """Have the watchdog cut *connection* off if replica *alias* hangs (a no-op for other aliases)."""
    if alias not in conf.REPLICAS:
        yield
        return
    ticket = watchdog.watch(alias, connection)
    try:
        yield
    finally:
        watchdog.unwatch(ticket)


def pump_psycopg2(source_alias: str, target_alias: str, out_sql: str, in_sql: str) -> int:
    """Stream ``COPY ... TO STDOUT`` on *source_alias* into ``COPY ... FROM STDIN`` on *target_alias* (psycopg2)."""
    source = connections[source_alias]
    target = connections[target_alias]
    pipe = _Pipe()
    with source.cursor() as source_wrapper, target.cursor() as target_wrapper:
        raw_source: Any = source_wrapper.cursor
        raw_target: Any = target_wrapper.cursor

        def produce() -> None:
            try:
                with _watched(source_alias, source):
                    raw_source.copy_expert(out_sql, pipe, size=BLOCK_BYTES)
            except BaseException as error:  # noqa: BLE001 - handed to the reader, which raises it
                pipe.close_writing(error)
            else:
                pipe.close_writing()

        thread = threading.Thread(target=produce, name="django-scale-copy-pipe", daemon=True)
        thread.start()
        try:
            raw_target.copy_expert(in_sql, pipe, size=BLOCK_BYTES)
        except BaseException:
            pipe.aborted.set()
            if thread.is_alive():
                source.connection.cancel()
            thread.join()
            raise
        thread.join()
        return int(raw_target.rowcount)


#: How long the psycopg 3 reader waits on the source's socket at a time (it waits again after).
POLL_SECONDS = 1.0


def _receive(pgconn: Any) -> None:
    """Wait until the source's socket has data (or hung up), then read it into libpq's buffer.

    ``select()`` releases the GIL while it waits; libpq's blocking calls (``PQexec``,
    ``PQgetCopyData`` in blocking mode) do not in psycopg 3's C implementation, so a source that
    hangs would stop every thread of the process, the watchdog that is to cut it off included.
    Raises psycopg's ``OperationalError`` once the connection is broken (cut off).
    """
    select.select([pgconn.socket], [], [], POLL_SECONDS)
    pgconn.consume_input()


def _results(pgconn: Any) -> Generator[Any, None, None]:
    """Yield the results of the source's current command, waiting without holding the GIL."""
    while True:
        while pgconn.is_busy():
            _receive(pgconn)
        result = pgconn.get_result()
        if result is None:
            return
        yield result


def _copy_out_blocks(raw_cursor: Any, sql: str) -> Generator[bytes, None, None]:
    """Run ``COPY ... TO STDOUT`` on psycopg 3's libpq connection; yield its data in ~64 KB blocks.

    ``Copy`` hands out one row per Python call through psycopg's wait loop (a few microseconds
    a row: more than the rest of the pipe); libpq's own ``PQgetCopyData``, through psycopg's
    documented low-level ``Connection.pgconn``, costs a fraction of that. It runs in libpq's
    non-blocking form, waiting in :func:`_receive`, so the process's other threads run while the
    source is slow or hangs. The connection is left as ``Copy`` would leave it: idle, or in its
    transaction (aborted on an error).
    """
    pq = importlib.import_module("psycopg.pq")
    errors = importlib.import_module("psycopg.errors")
    connection = raw_cursor.connection
    pgconn = connection.pgconn
    encoding = getattr(connection.info, "encoding", "utf-8")
    pgconn.send_query(sql.encode(encoding))
    result = next(_results(pgconn))
    if result.status != pq.ExecStatus.COPY_OUT:
        failure = errors.error_from_result(result, encoding=encoding)
        for _ in _results(pgconn):
            pass
        raise failure
    finished = False
    try:
        pending = bytearray()
        while True:
            size, data = pgconn.get_copy_data(1)
            if size > 0:
                pending += data
                if len(pending) >= BLOCK_BYTES:
                    yield bytes(pending)
                    pending.clear()
            elif size == 0:
                _receive(pgconn)
            else:
                break
        finished = True
        if pending:
            yield bytes(pending)
    finally:
        failure = None
        # A connection cut off (the watchdog) or lost has nothing left to read or cancel.
        if pgconn.status == pq.ConnStatus.OK:
            if not finished:
                # Stopped early (the target failed): cancel the COPY and read what is left.
                cancel = getattr(connection, "cancel_safe", connection.cancel)
                with contextlib.suppress(Exception):
                    cancel()
                with contextlib.suppress(Exception):
                    while (size := pgconn.get_copy_data(1)[0]) >= 0:
                        if size == 0:
                            _receive(pgconn)
            for result in _results(pgconn):
                if result.status == pq.ExecStatus.FATAL_ERROR and failure is None:
                    failure = errors.error_from_result(result, encoding=encoding)
    if failure is not None:
        raise failure


def pump_psycopg3(source_alias: str, target_alias: str, out_sql: str, in_sql: str) -> int:
    """Stream ``COPY ... TO STDOUT`` on *source_alias* into ``COPY ... FROM STDIN`` on *target_alias* (psycopg 3)."""
    source, target = connections[source_alias], connections[target_alias]
    with source.cursor() as source_wrapper, target.cursor() as target_wrapper:
        raw_target: Any = target_wrapper.cursor
        # closing(): on the target's error the source's COPY is cancelled now, not when the
        # generator is collected.
        with (
            _watched(source_alias, source),
            raw_target.copy(in_sql) as into,
            closing(_copy_out_blocks(source_wrapper.cursor, out_sql)) as blocks,
        ):
            for block in blocks:
                into.write(block)
        return int(raw_target.rowcount)
