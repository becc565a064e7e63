"""The files of known differences between django-scale's classes and Django's (admin.txt, orm.txt).

One line per test: its full id, optionally the Django versions it applies to in brackets
(all of the matrix when absent), then ``#`` and the reason, the documented difference::

    admin_changelist.tests.ChangeListTests.test_result_list_html  # approximate count: "50+"
    queries.tests.Queries1Tests.test_ticket7181  [4.2 5.2]  # fewer queries: peer loading

A reason starting with ``UNEXPLAINED`` was written by ``--update`` for a new failure; the job
fails while one remains. Comment lines before the first entry are kept as the file's header.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

#: The Django versions of the tox matrix; an entry for all of them carries no brackets.
MATRIX = ("4.2", "5.2", "6.0", "6.1")
UNEXPLAINED = "UNEXPLAINED"


@dataclasses.dataclass
class Entry:
    test: str
    versions: frozenset[str] | None  # None: every version
    reason: str

    def applies(self, version: str) -> bool:
        return self.versions is None or version in self.versions

    def line(self) -> str:
        versions = "" if self.versions is None else "  [" + " ".join(sorted(self.versions, key=_key)) + "]"
        return f"{self.test}{versions}  # {self.reason}"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclasses.dataclass
class KnownDifferences:
    header: list[str]
    entries: dict[str, Entry]

    @classmethod
    def read(cls, path: Path) -> KnownDifferences:
        header: list[str] = []
        entries: dict[str, Entry] = {}
        text = path.read_text() if path.exists() else ""
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                if not entries:
                    header.append(raw)
                continue
            body, _, reason = line.partition("#")
            test, _, rest = body.strip().partition(" ")
            rest = rest.strip()
            versions: frozenset[str] | None = None
            if rest:
                if not (rest.startswith("[") and rest.endswith("]")):
                    raise ValueError(f"{path}:{number}: expected '[4.2 5.2]' after the test id, got {rest!r}")
                versions = frozenset(rest[1:-1].split())
            if not reason.strip():
                raise ValueError(f"{path}:{number}: {test} has no reason ('# ...')")
            if test in entries:
                raise ValueError(f"{path}:{number}: {test} is listed twice")
            entries[test] = Entry(test, versions, reason.strip())
        return cls(header, entries)

    def write(self, path: Path) -> None:
        lines = [*self.header, *(self.entries[test].line() for test in sorted(self.entries))]
        path.write_text("\n".join(lines) + "\n")

    def expected(self, version: str) -> dict[str, Entry]:
        return {test: entry for test, entry in self.entries.items() if entry.applies(version)}

    def compare(self, version: str, ran: Iterable[str], failed: Iterable[str]) -> Comparison:
        """Compare a run's failures with the entries for *version*, for the tests that ran."""
        ran_set, failed_set = set(ran), set(failed)
        expected = self.expected(version)
        unexpected = sorted(failed_set - set(expected))
        passing = sorted(test for test in expected if test not in failed_set and _ran(test, ran_set))
        unexplained = sorted(test for test, entry in expected.items() if entry.reason.startswith(UNEXPLAINED))
        return Comparison(unexpected, passing, unexplained)

    def update(self, version: str, ran: Iterable[str], failed: Iterable[str]) -> None:
        """Make the entries for *version* exactly the failures of a run, keeping reasons."""
        ran_set, failed_set = set(ran), set(failed)
        for test, entry in list(self.entries.items()):
            if entry.applies(version) and test not in failed_set and _ran(test, ran_set):
                remaining = (frozenset(MATRIX) if entry.versions is None else entry.versions) - {version}
                if remaining:
                    entry.versions = remaining
                else:
                    del self.entries[test]
        for test in failed_set:
            entry = self.entries.get(test)
            if entry is None:
                self.entries[test] = Entry(test, frozenset({version}), UNEXPLAINED)
            elif entry.versions is not None:
                entry.versions = entry.versions | {version}
        for entry in self.entries.values():
            if entry.versions is not None and entry.versions >= frozenset(MATRIX):
                entry.versions = None


def _ran(test: str, ran: set[str]) -> bool:
    """Whether *test* ran; a class fixture (``...Class.setUpClass``) ran if its class did."""
    if test in ran:
        return True
    parent = test.rpartition(".")[0] + "."
    return test.rpartition(".")[2].startswith(("setUp", "tearDown")) and any(
        r.startswith(parent) for r in ran
    )


@dataclasses.dataclass
class Comparison:
    #: Failures the list does not name.
    unexpected: list[str]
    #: Listed tests that ran and passed: the list must drop them.
    passing: list[str]
    #: Listed tests whose reason is still UNEXPLAINED.
    unexplained: list[str]

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.passing or self.unexplained)
