"""The sketch and the per-slot shared store, across real processes (multiprocessing, fork)."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
from array import array
from pathlib import Path
from typing import Any

import pytest
from ddsketch import DDSketch

from django_scale.exceptions import MetricsDocumentError
from django_scale.metrics.sketch import (
    _EDGES,
    BUCKETS,
    MAX_VALUE,
    MIN_VALUE,
    DenseSketch,
    Sketch,
    bucket_of,
    bucket_value,
    buckets_of,
)
from django_scale.metrics.store import SlotStore

QUANTILES = (0.5, 0.95, 0.99, 0.999)
FORK = multiprocessing.get_context("fork")


def exact(values: list[float], q: float) -> float:
    """The value of rank q * (n - 1), rounded down: the rank DDSketch's guarantee is about."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def latencies(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    # Lognormal around 20 ms with a long tail, and a few slow outliers.
    return [min(rng.lognormvariate(math.log(0.02), 1.0), 100.0) for _ in range(n)]


def open_store(directory: Path, slots: int = 8, series: int = 64, memory: int = 1) -> SlotStore:
    return SlotStore(directory, slots, series, memory)


def record_values(directory: str, slots: int, seed: int, n: int, name: str, together: Any = None) -> None:
    store = open_store(Path(directory), slots)
    values = latencies(seed, n)
    for index, value in enumerate(values):
        assert store.record([(name, bucket_of(value), value)], [("requests", 1)])
        if index == 0 and together is not None:
            together.wait(30)  # every worker holds its slot at once


def schedule(seed: int) -> list[tuple[int, str, float]]:
    """A worker's values, oldest minute first: ``(minutes ago, series, value)``."""
    rng = random.Random(seed)
    out = []
    for minutes_ago in (20, 14, 9, 5, 4, 2, 1, 0):
        for series in rng.sample(range(8), rng.randrange(1, 6)):
            for _ in range(rng.randrange(1, 4)):
                # From 10 µs to 100 s: chunks far apart, gaps between them.
                out.append((minutes_ago, f"s{series}", 10 ** rng.uniform(-5, 2)))
    return out


def record_schedule(directory: str, seed: int, now: float, together: Any) -> None:
    store = open_store(Path(directory))
    assert store.record([], [], now=now)  # each worker holds its own slot (minutes never go back in one)
    together.wait(30)
    for minutes_ago, name, value in schedule(seed):
        assert store.record([(name, bucket_of(value), value)], [], now=now - 60 * minutes_ago)


def record_wide(directory: str, seed: int, now: float, together: Any) -> None:
    """Values over many chunks of 40 series, in an order of the seed's (pools differ per slot)."""
    store = open_store(Path(directory), memory=4)
    assert store.record([], [], now=now)
    together.wait(30)
    values = [(f"w{series}", 10 ** (-5 + 7 * step / 60)) for series in range(40) for step in range(60)]
    random.Random(seed).shuffle(values)
    for name, value in values[: len(values) - 100 * seed]:
        assert store.record([(name, bucket_of(value), value)], [], now=now)


class TestDenseSketch:
    """The store's window sketches: counts in a row, quantiles without building the dict."""

    def dense_and_sparse(self, seed: int) -> tuple[DenseSketch, Sketch]:
        rng = random.Random(seed)
        first = rng.randrange(0, 100)
        # Runs of empty buckets inside, as between the chunks a series reached.
        counts = array("I", [rng.choice((0, 0, 0, 1, 2, 7, 300)) for _ in range(rng.randrange(1, 500))])
        counts[0] = counts[-1] = 1
        sparse = Sketch(buckets={first + i: c for i, c in enumerate(counts) if c}, count=sum(counts))
        return DenseSketch(first, counts), sparse

    def test_quantiles_and_count_are_those_of_the_same_buckets(self) -> None:
        qs = (0.0, 0.001, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
        for seed in range(200):
            dense, sparse = self.dense_and_sparse(seed)
            assert dense.quantiles(qs) == sparse.quantiles(qs)  # before the dict exists
            assert dense.to_json() == sparse.to_json()
            assert dense.count == sparse.count
            assert dense.buckets == sparse.buckets
            assert dense == sparse
            assert dense.quantiles(qs) == sparse.quantiles(qs)  # after it does

    def test_count_before_or_after_quantiles_is_the_sum_of_the_counts(self) -> None:
        # The sketch keeps its count, not its running sums (an export would keep a list per series).
        for seed in range(50):
            dense, sparse = self.dense_and_sparse(seed)
            assert dense.count == sparse.count  # before any quantile
            assert dense.quantiles(QUANTILES) == sparse.quantiles(QUANTILES)
            assert dense.count == sparse.count
            dense, sparse = self.dense_and_sparse(seed)
            assert dense.quantiles(QUANTILES) == sparse.quantiles(QUANTILES)
            assert dense.count == sparse.count  # after, first asked then
        assert DenseSketch(3, array("I")).count == 0

    def test_changes_through_buckets_or_merge_count(self) -> None:
        dense, sparse = self.dense_and_sparse(1)
        extra = Sketch.of([0.5] * 1000)
        dense.merge(extra)
        sparse.merge(extra)
        assert dense == sparse
        assert dense.count == sparse.count
        assert dense.quantiles(QUANTILES) == sparse.quantiles(QUANTILES)
        assert dense.quantile(0.99) == bucket_value(bucket_of(0.5))

    def test_empty(self) -> None:
        empty = DenseSketch(0, array("I"))
        assert empty.count == 0
        assert empty.quantile(0.5) is None
        assert empty.buckets == {}
        assert DenseSketch(7, array("I", [0, 0])).quantiles((0.5,)) == {0.5: None}


class TestSketch:
    def test_every_value_is_within_one_percent_of_its_bucket(self) -> None:
        value = MIN_VALUE * 1.0001
        while value < MAX_VALUE:
            assert abs(bucket_value(bucket_of(value)) - value) <= 0.01 * value
            value *= 1.37
        assert bucket_of(0.0) == 0
        assert bucket_of(MAX_VALUE * 10) == BUCKETS - 1

    def test_buckets_of_is_bucket_of_at_every_edge_and_between(self) -> None:
        # buckets_of() searches the largest value of each bucket: at each, and the float after it,
        # it must give what bucket_of() gives, as for random values, tiny, huge and negative ones.
        sweep = []
        value = MIN_VALUE / 10
        while value < MAX_VALUE * 10:
            sweep.append(value)
            value *= 1.0001
        assert len(_EDGES) == BUCKETS - 1
        probes = [*_EDGES, *(math.nextafter(edge, math.inf) for edge in _EDGES)]
        probes += [*(math.nextafter(edge, 0.0) for edge in _EDGES), *sweep, 0.0, -1.0, MIN_VALUE]
        assert list(buckets_of(probes)) == [bucket_of(value) for value in probes]
        assert list(buckets_of(_EDGES)) == list(range(BUCKETS - 1))

    def test_quantiles_match_ddsketch_and_exact_values(self) -> None:
        values = latencies(1, 20_000)
        ours = Sketch.of(values)
        oracle = DDSketch(relative_accuracy=0.01)
        for value in values:
            oracle.add(value)
        for q in QUANTILES:
            found = ours.quantile(q)
            assert found is not None
            assert found == pytest.approx(oracle.get_quantile_value(q), rel=1e-9)
            assert abs(found - exact(values, q)) <= 0.01 * exact(values, q)
        assert ours.quantiles(QUANTILES) == {q: ours.quantile(q) for q in QUANTILES}
        assert ours.count == 20_000
        assert ours.total == pytest.approx(sum(values))

    def test_merge_is_the_sketch_of_all_values(self) -> None:
        first, second = latencies(2, 1000), latencies(3, 3000)
        merged = Sketch.of(first)
        merged.merge(Sketch.of(second))
        assert merged.buckets == Sketch.of(first + second).buckets

    def test_json_round_trip_and_malformed_documents(self) -> None:
        sketch = Sketch.of(latencies(4, 500))
        assert Sketch.from_json(sketch.to_json()) == sketch
        broken = sketch.to_json()
        broken["count"] += 1
        with pytest.raises(MetricsDocumentError, match="count"):
            Sketch.from_json(broken)
        with pytest.raises(MetricsDocumentError, match="out of range"):
            Sketch.from_json({"count": 1, "buckets": {str(BUCKETS): 1}})
        with pytest.raises(MetricsDocumentError, match="not a sketch"):
            Sketch.from_json({"buckets": []})
        assert Sketch().quantile(0.5) is None


class TestStore:
    def test_four_processes_merge_to_the_exact_percentiles(self, tmp_path: Path) -> None:
        together = FORK.Barrier(4)
        processes = [
            FORK.Process(
                target=record_values, args=(str(tmp_path), 8, seed, 5000, "request\x1fr\x1fGET", together)
            )
            for seed in range(4)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0
        everything = [value for seed in range(4) for value in latencies(seed, 5000)]
        snapshot = open_store(tmp_path).snapshot()
        assert snapshot.used_slots == 4
        assert snapshot.live_slots == 0  # every writer exited
        assert snapshot.counters == {"requests": 20_000}
        count, total = snapshot.totals["request\x1fr\x1fGET"]
        assert count == 20_000
        assert total == pytest.approx(sum(everything))
        for window in (1, 5, 15):
            sketch = snapshot.windows["request\x1fr\x1fGET"][window]
            assert sketch.count == 20_000
            assert sketch.buckets == Sketch.of(everything).buckets
        # The quantiles as the export reads them, off a fresh snapshot's counts (no dict built).
        fresh = open_store(tmp_path).snapshot(windows=(5,)).windows["request\x1fr\x1fGET"][5]
        assert fresh.quantiles(QUANTILES) == Sketch.of(everything).quantiles(QUANTILES)
        sketch = snapshot.windows["request\x1fr\x1fGET"][5]
        # One window alone (what the Prometheus export reads) is the same sketch.
        assert open_store(tmp_path).snapshot(windows=(5,)).windows["request\x1fr\x1fGET"] == {5: sketch}
        for q in QUANTILES:
            found = sketch.quantile(q)
            assert found is not None
            assert abs(found - exact(everything, q)) <= 0.01 * exact(everything, q), q

    def test_recycled_workers_keep_totals_and_the_file_bounded(self, tmp_path: Path) -> None:
        size = None
        for generation in range(30):
            process = FORK.Process(target=record_values, args=(str(tmp_path), 2, generation, 10, "t"))
            process.start()
            process.join(30)
            assert process.exitcode == 0
            files = list(tmp_path.iterdir())
            assert len(files) == 1
            size = size or files[0].stat().st_size
            assert files[0].stat().st_size == size
            snapshot = open_store(tmp_path, slots=2).snapshot()
            # Counts are folded into the slot the next worker takes: never lost, never rewound.
            assert snapshot.counters["requests"] == 10 * (generation + 1)
            assert snapshot.totals["t"][0] == 10 * (generation + 1)
        assert snapshot.used_slots == 1

    def test_a_live_worker_keeps_its_slot_and_a_full_file_drops(self, tmp_path: Path) -> None:
        ready, done = FORK.Event(), FORK.Event()

        def hold() -> None:
            store = open_store(tmp_path, slots=1)
            assert store.record([], [("held", 1)])
            ready.set()
            done.wait(30)

        holder = FORK.Process(target=hold)
        holder.start()
        try:
            assert ready.wait(30)
            store = open_store(tmp_path, slots=1)
            assert store.snapshot().live_slots == 1
            assert not store.record([], [("mine", 1)])  # no free slot: nothing written
            assert "mine" not in store.snapshot().counters
        finally:
            done.set()
            holder.join(30)
        assert store.unrecorded == 1
        store.retry_after = 0  # (it waits a second between attempts otherwise)
        assert store.record([], [("mine", 1)])  # the slot is free again: this process takes it
        snapshot = store.snapshot()
        assert snapshot.counters == {"held": 1, "mine": 1}
        assert snapshot.live_slots == 1

    def test_a_forked_child_claims_its_own_slot(self, tmp_path: Path) -> None:
        store = open_store(tmp_path)
        assert store.record([], [("parent", 1)])
        parent_slot = store.slot()
        child = FORK.Process(
            target=lambda: os._exit(
                0 if store.record([], [("child", 1)]) and store.slot() != parent_slot else 1
            )
        )
        child.start()
        child.join(30)
        assert child.exitcode == 0
        snapshot = store.snapshot()
        assert snapshot.used_slots == 2
        assert snapshot.counters == {"parent": 1, "child": 1}

    def test_windows_slide_by_the_minute(self, tmp_path: Path) -> None:
        store = open_store(tmp_path)
        now = 1_800_000_000.0
        for minutes_ago, value in ((20, 1.0), (10, 0.1), (3, 0.01), (0, 0.001)):
            store.record([("t", bucket_of(value), value)], [], now=now - 60 * minutes_ago)
        windows = store.snapshot(now=now).windows["t"]
        # Quantiles read before anything builds the buckets dict: values in three chunks apart.
        assert windows[15].quantiles(QUANTILES) == Sketch.of([0.001, 0.01, 0.1]).quantiles(QUANTILES)
        assert windows[5].quantiles(QUANTILES) == Sketch.of([0.001, 0.01]).quantiles(QUANTILES)
        assert {w: windows[w].count for w in windows} == {1: 1, 5: 2, 15: 3}
        assert store.snapshot(now=now).totals["t"][0] == 4
        # 16 minutes on, the ring entry of "now" is reused: its checkpoint is the new minute's.
        later = now + 16 * 60
        store.record([("t", bucket_of(0.5), 0.5)], [], now=later)
        windows = store.snapshot(now=later).windows["t"]
        assert windows[1].buckets == {bucket_of(0.5): 1}
        assert windows[15].count == 1  # minute 0.001 was 16 minutes ago; the others older still

    def test_a_minute_before_the_series_latest_counts_in_the_latest(self, tmp_path: Path) -> None:
        # A clock set back, or a request whose record comes after a later one's: checkpoints
        # only grow, so the value counts in the latest minute the series has in the slot, and
        # no window goes wrong.
        store = open_store(tmp_path)
        now = 1_800_000_000.0
        minute = int(now // 60)
        store.record([("t", bucket_of(0.2), 0.2)], [], now=now)
        store.record([("t", bucket_of(0.003), 0.003)], [], now=now - 5 * 60)
        store.record([("t", bucket_of(0.04), 0.04)], [], now=now - 60)
        windows = store.snapshot(now=now).windows["t"]
        assert {w: windows[w].buckets for w in windows} == {
            w: {bucket_of(0.2): 1, bucket_of(0.003): 1, bucket_of(0.04): 1} for w in (1, 5, 15)
        }
        assert {at: s.count for at, s in store.history(["t"], now=now)["t"].items()} == {minute: 3}
        store.record([("t", bucket_of(0.5), 0.5)], [], now=now + 60)
        assert store.snapshot(now=now + 60).windows["t"][1].count == 4
        assert {at: s.count for at, s in store.history(["t"], now=now + 60)["t"].items()} == {
            minute: 3,
            minute + 1: 1,
        }

    def test_running_counts_wrap_and_windows_stay_exact(self, tmp_path: Path) -> None:
        # Running counts are kept modulo 2**31 (store.py, SlotStore.record): set one just below the wrap
        # through the store's own view, before the windows, then cross it inside them.
        store = open_store(tmp_path)
        now = 1_800_000_000.0
        minute = int(now // 60)
        bucket = bucket_of(0.01)
        store.record([("t", bucket, 0.01)], [], now=now - 20 * 60)
        base = store._slots_offset + store.slot() * store.slot_bytes
        at = ((base + store._running_offset) >> 2) + (bucket & 63)
        assert store._i32[at] == 1  # the series' first chunk is pool chunk 1
        store._i32[at] = 2**31 - 3
        store.record([("t", bucket, 0.01)], [], now=now - 120)  # checkpoint 2**31 - 3
        store.record([("t", bucket, 0.01)], [], now=now - 60)  # checkpoint 2**31 - 2
        for _ in range(5):
            store.record([("t", bucket, 0.01)], [], now=now)  # checkpoint 2**31 - 1, then 0 ... 4
        assert store._i32[at] == 4
        windows = store.snapshot(now=now).windows["t"]
        assert {w: windows[w].buckets for w in windows} == {1: {bucket: 6}, 5: {bucket: 7}, 15: {bucket: 7}}
        history = store.history(["t"], now=now)["t"]
        assert {at: s.count for at, s in history.items()} == {minute - 2: 1, minute - 1: 1, minute: 5}

    def test_a_series_added_at_once_is_the_same_as_its_values_one_by_one(self, tmp_path: Path) -> None:
        # SlotStore.add() (a batch of requests, summed by series) against record() per value.
        values = latencies(7, 500)
        now = 1_800_000_000.0
        one_by_one = open_store(tmp_path / "a")
        for value in values:
            one_by_one.record([("t", bucket_of(value), value)], [("n", 1)], now=now)
        summed = open_store(tmp_path / "b")
        sketch = Sketch.of(values)  # its buckets counted in C: the same as add() value by value
        one_at_a_time = Sketch()
        for value in values:
            one_at_a_time.add(value)
        assert sketch == one_at_a_time
        summed.add([("t", sketch)], [("n", len(values))], now=now)
        a, b = one_by_one.snapshot(now=now), summed.snapshot(now=now)
        assert a.windows == b.windows and a.counters == b.counters
        assert a.totals["t"][0] == b.totals["t"][0] == 500
        assert a.totals["t"][1] == pytest.approx(b.totals["t"][1])

    def test_a_count_added_across_the_wrap_stays_exact(self, tmp_path: Path) -> None:
        # Running counts are modulo 2**31: a bucket's count added many at once past 2**31 - 1.
        store = open_store(tmp_path)
        now = 1_800_000_000.0
        bucket = bucket_of(0.01)
        store.add([("t", Sketch({bucket: 1}, 1, 0.01))], [], now=now - 120)
        base = store._slots_offset + store.slot() * store.slot_bytes
        at = ((base + store._running_offset) >> 2) + (bucket & 63)
        store._i32[at] = 2**31 - 3
        store.add([("t", Sketch({bucket: 1}, 1, 0.01))], [], now=now)  # checkpoint 2**31 - 3, then 2**31 - 2
        store.add([("t", Sketch({bucket: 10}, 10, 0.1))], [], now=now)
        assert store._i32[at] == 8  # 2**31 - 2 + 10, modulo 2**31
        assert store.snapshot(now=now).windows["t"][1].buckets == {bucket: 11}

    def test_values_that_find_the_pool_full_are_all_counted_as_dropped(self, tmp_path: Path) -> None:
        # 1 MiB of pool is 256 chunks: 256 series of one chunk each fill it; a sketch of ten
        # values in a chunk of its own then finds no room, and all ten are dropped and counted.
        store = open_store(tmp_path, series=300)
        bucket = bucket_of(0.01)
        store.add([(f"s{i}", Sketch({bucket: 1}, 1, 0.01)) for i in range(256)], [])
        assert store.snapshot().dropped == 0
        store.add([("late", Sketch({bucket: 10}, 10, 0.1))], [])
        snapshot = store.snapshot()
        assert snapshot.dropped == 10
        assert snapshot.totals["late"][0] == 10  # counted and summed; its buckets had no room

    def test_windows_of_many_slots_series_and_checkpoints_are_exact(self, tmp_path: Path) -> None:
        # The export reads every series of a slot at once (windows.py): within one slot, series
        # whose windows start at different checkpoints, series with chunks but no value in a
        # window, series a slot never had, chunks far apart; across slots, different pools.
        now = 1_800_000_000.0
        together = FORK.Barrier(3)
        processes = [
            FORK.Process(target=record_schedule, args=(str(tmp_path), seed, now, together))
            for seed in range(3)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0
        expected: dict[int, dict[str, dict[int, int]]] = {length: {} for length in (1, 5, 15)}
        totals: dict[str, int] = {}
        for seed in range(3):
            for minutes_ago, name, value in schedule(seed):
                totals[name] = totals.get(name, 0) + 1
                for length, per_series in expected.items():
                    if minutes_ago <= length:
                        buckets = per_series.setdefault(name, {})
                        buckets[bucket_of(value)] = buckets.get(bucket_of(value), 0) + 1
        for windows in ((1, 5, 15), (5,), (1,), (15, 1)):
            snapshot = open_store(tmp_path).snapshot(windows=windows, now=now)
            assert {name: count for name, (count, _) in snapshot.totals.items()} == totals
            for length in windows:
                found = {name: w[length].buckets for name, w in snapshot.windows.items() if length in w}
                assert found == expected[length], (windows, length)
        # The cases the schedule is for did occur, in one slot: in window 5, a series without
        # values there (but with chunks), series starting at different checkpoints, and a
        # series the slot never had.
        minutes = [
            {name: [m for m, each, _ in schedule(seed) if each == name] for name in totals}
            for seed in range(3)
        ]
        assert any(
            len(found) > 0 and min(found) > 5 for per_series in minutes for found in per_series.values()
        )
        assert any(
            len(
                {
                    min(m for m in found if m <= 5)
                    for found in per_series.values()
                    if found and min(found) <= 5
                }
            )
            > 1
            for per_series in minutes
        )
        assert any(not found for per_series in minutes for found in per_series.values())

    def test_a_snapshot_holds_one_slot_s_rows_at_a_time(self, tmp_path: Path) -> None:
        # Its peak memory is the first export's page faults: it must not grow with the slots
        # beyond the sums (one slot's rows, then the next's, not both; one struct for all).
        import tracemalloc

        now = 1_800_000_000.0

        def peak(directory: Path, workers: int) -> tuple[int, int]:
            together = FORK.Barrier(workers)
            processes = [
                FORK.Process(target=record_wide, args=(str(directory), seed, now, together))
                for seed in range(workers)
            ]
            for process in processes:
                process.start()
            for process in processes:
                process.join(60)
                assert process.exitcode == 0
            store = open_store(directory, memory=4)
            store.snapshot(windows=(5,), now=now)  # the names, kept, and the caches
            tracemalloc.start()
            try:
                snapshot = store.snapshot(windows=(5,), now=now)
                used = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert snapshot.used_slots == workers
            rows = max(
                store._u32[(store._slots_offset + slot * store.slot_bytes) // 4 + 2] for slot in range(8)
            )
            return used, rows * 256 * 2  # a slot's running rows and one checkpoint's

        (tmp_path / "one").mkdir()
        (tmp_path / "four").mkdir()
        one, _ = peak(tmp_path / "one", 1)
        four, slot_rows = peak(tmp_path / "four", 4)
        assert slot_rows > 200_000
        assert four - one < slot_rows // 2, (one, four, slot_rows)

    def test_a_name_added_during_a_snapshot_waits_for_the_next(self, tmp_path: Path) -> None:
        # Another thread of the process may add a series while a snapshot reads the slots
        # (names() appends to the list it returns): the snapshot keeps the names it started with.
        class AddsANameMidway(SlotStore):
            def live_slots(self) -> list[int]:  # called between reading the slots and the result
                self.series("late counter", timing=False)
                self.series("late timing", timing=True)
                self.names(False)  # what the other thread's next new name does
                self.names(True)
                return super().live_slots()

        store = AddsANameMidway(tmp_path, 2, 16, 1)
        assert store.record([("t", 5, 0.001)], [("c", 1)])
        snapshot = store.snapshot()
        assert snapshot.counters == {"c": 1}
        assert set(snapshot.totals) == {"t"}
        assert "late counter" in store.names(False)

    def test_names_added_in_steps_are_read_by_another_store_in_order(self, tmp_path: Path) -> None:
        writer, reader = open_store(tmp_path), open_store(tmp_path)
        names = ["a", "é" * 200, "x" * 300, "z\x1fGET"]  # a name past 256 bytes is cut at a character
        for name in names[:2]:
            writer.series(name, timing=True)
        assert reader.names(True) == ["\x1foverflow", "a", "é" * 128]
        for name in names[2:]:
            writer.series(name, timing=True)
        writer.series("counter", timing=False)
        assert reader.names(True) == ["\x1foverflow", "a", "é" * 128, "x" * 256, "z\x1fGET"]
        assert reader.names(False) == ["\x1foverflow", "counter"]

    def test_series_past_the_limit_share_the_overflow_series(self, tmp_path: Path) -> None:
        store = open_store(tmp_path, series=4)
        for index in range(10):
            store.record([(f"route{index}", 5, 0.001)], [])
        snapshot = store.snapshot()
        assert len(snapshot.totals) == 4  # the overflow series and three routes
        assert sum(count for count, _ in snapshot.totals.values()) == 10
        assert snapshot.totals["\x1foverflow"][0] == 7

    def test_history_gives_each_minute_its_own_sketch(self, tmp_path: Path) -> None:
        store = open_store(tmp_path)
        now = 1_800_000_000.0
        minute = int(now // 60)
        for minutes_ago, values in ((20, [9.0]), (2, [0.5]), (0, [0.001, 0.002])):
            for value in values:
                store.record([("t", bucket_of(value), value)], [], now=now - 60 * minutes_ago)
        history = store.history(["t", "unknown"], now=now)["t"]
        assert {at: sketch.count for at, sketch in history.items()} == {minute: 2, minute - 2: 1}
        assert history[minute - 2].quantile(0.5) == pytest.approx(0.5, rel=0.01)


#: The sha256 of pinned_output(): the same from the v1 store (a ring of per-minute counts) as
#: from the v2 store (running counts and checkpoints) and the v3 store (a checkpoint's rows
#: together, read a slot at a time). Changing the output is changing a format.
PINNED = "edb2ff8ee4d9f4c719cc16fe5901f90d334bdf23754da9c91297d177786f3287"


def pinned_output(directory: Path) -> str:
    """Prometheus text of every window, sketches.json and the per-minute history of a fixed store."""
    from django_scale.metrics.export import prometheus_text
    from django_scale.metrics.merge import to_document

    store = SlotStore(directory, 2, 16, 1)
    now = 1_800_000_000.0
    rng = random.Random(7)
    for minutes_ago in range(17, -1, -1):
        for index in range(30):
            value = rng.lognormvariate(math.log(0.02), 1.2)
            labels = f"r{index % 3}\x1fGET"
            store.record(
                [
                    (f"request\x1f{labels}", bucket_of(value), value),
                    (f"db\x1f{labels}\x1fdefault", bucket_of(value / 4), value / 4),
                ],
                [(f"requests\x1f{labels}\x1f2xx", 1), (f"queries\x1f{labels}\x1fdefault", 2)],
                now=now - 60 * minutes_ago,
            )
    snapshot = store.snapshot(now=now)
    parts = [prometheus_text(snapshot, window=window) for window in (1, 5, 15)]
    parts.append(json.dumps(to_document(snapshot, host="web-1"), sort_keys=True))
    history = store.history([f"request\x1fr{i}\x1fGET" for i in range(3)], now=now)
    parts.append(
        json.dumps(
            {
                name: {str(at): sketch.to_json() for at, sketch in sorted(per_minute.items())}
                for name, per_minute in sorted(history.items())
            },
            sort_keys=True,
        )
    )
    return "".join(parts)


def test_the_exposition_json_and_history_are_byte_for_byte_pinned(tmp_path: Path) -> None:
    output = pinned_output(tmp_path)
    assert 'django_scale_request_seconds{route="r0",method="GET",quantile="0.99"}' in output
    assert hashlib.sha256(output.encode()).hexdigest() == PINNED
