"""The known-differences lists of the compatibility job (tests/compat/) and their updates."""

from __future__ import annotations

from pathlib import Path

import pytest
from compat.compat_swap import PROFILES
from compat.known_differences import MATRIX, UNEXPLAINED, KnownDifferences

COMPAT = Path(__file__).parent / "compat"

LIST = """\
# header line
admin_views.tests.A.test_everywhere  # approximate count
admin_views.tests.A.test_old  [4.2 5.2]  # facets off before 5.0
admin_views.tests.B.setUpClass  [6.1]  # fewer queries
"""


def known(tmp_path: Path, text: str = LIST) -> tuple[KnownDifferences, Path]:
    path = tmp_path / "admin.txt"
    path.write_text(text)
    return KnownDifferences.read(path), path


def test_entries_apply_to_their_versions(tmp_path: Path) -> None:
    differences, _ = known(tmp_path)
    assert sorted(differences.expected("4.2")) == [
        "admin_views.tests.A.test_everywhere",
        "admin_views.tests.A.test_old",
    ]
    assert sorted(differences.expected("6.1")) == [
        "admin_views.tests.A.test_everywhere",
        "admin_views.tests.B.setUpClass",
    ]


def test_compare_reports_unlisted_failures_and_listed_passes(tmp_path: Path) -> None:
    differences, _ = known(tmp_path)
    ran = [
        "admin_views.tests.A.test_everywhere",
        "admin_views.tests.A.test_old",
        "admin_views.tests.C.test_new",
    ]
    result = differences.compare(
        "5.2", ran, ["admin_views.tests.A.test_everywhere", "admin_views.tests.C.test_new"]
    )
    assert result.unexpected == ["admin_views.tests.C.test_new"]
    assert result.passing == ["admin_views.tests.A.test_old"]
    assert result.unexplained == []
    assert not result.ok


def test_compare_ignores_listed_tests_that_did_not_run(tmp_path: Path) -> None:
    differences, _ = known(tmp_path)
    result = differences.compare(
        "6.1", ["admin_views.tests.A.test_everywhere"], ["admin_views.tests.A.test_everywhere"]
    )
    # B.setUpClass did not run (no test of class B ran): not reported as passing.
    assert result.ok


def test_a_class_fixture_ran_when_a_test_of_its_class_ran(tmp_path: Path) -> None:
    differences, _ = known(tmp_path)
    ran = ["admin_views.tests.A.test_everywhere", "admin_views.tests.B.test_x"]
    result = differences.compare("6.1", ran, ["admin_views.tests.A.test_everywhere"])
    assert result.passing == ["admin_views.tests.B.setUpClass"]


def test_update_keeps_reasons_marks_new_failures_and_narrows_versions(tmp_path: Path) -> None:
    differences, path = known(tmp_path)
    ran = [
        "admin_views.tests.A.test_everywhere",
        "admin_views.tests.A.test_old",
        "admin_views.tests.C.test_new",
    ]
    differences.update("5.2", ran, ["admin_views.tests.A.test_old", "admin_views.tests.C.test_new"])
    differences.write(path)
    assert path.read_text() == (
        "# header line\n"
        "admin_views.tests.A.test_everywhere  [4.2 6.0 6.1]  # approximate count\n"
        "admin_views.tests.A.test_old  [4.2 5.2]  # facets off before 5.0\n"
        "admin_views.tests.B.setUpClass  [6.1]  # fewer queries\n"
        f"admin_views.tests.C.test_new  [5.2]  # {UNEXPLAINED}\n"
    )
    result = KnownDifferences.read(path).compare(
        "5.2", ran, ["admin_views.tests.A.test_old", "admin_views.tests.C.test_new"]
    )
    assert result.unexplained == ["admin_views.tests.C.test_new"]
    assert not result.ok


def test_update_drops_an_entry_passing_everywhere_and_widens_to_all(tmp_path: Path) -> None:
    differences, _ = known(tmp_path, "x.T.test_a  [4.2]  # r\nx.T.test_b  [4.2 5.2 6.0]  # r\n")
    differences.update("4.2", ["x.T.test_a", "x.T.test_b"], [])
    assert "x.T.test_a" not in differences.entries
    differences.update("6.1", ["x.T.test_b"], ["x.T.test_b"])
    assert differences.entries["x.T.test_b"].versions == frozenset({"5.2", "6.0", "6.1"})
    differences.update("4.2", ["x.T.test_b"], ["x.T.test_b"])
    assert differences.entries["x.T.test_b"].versions is None
    assert differences.entries["x.T.test_b"].line() == "x.T.test_b  # r"


def test_a_line_without_reason_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "orm.txt"
    path.write_text("queries.tests.T.test_a\n")
    with pytest.raises(ValueError, match="has no reason"):
        KnownDifferences.read(path)


def test_the_lists_name_tests_of_their_profile_and_versions_of_the_matrix() -> None:
    for profile, labels in PROFILES.items():
        differences = KnownDifferences.read(COMPAT / f"{profile}.txt")
        for test, entry in differences.entries.items():
            assert test.split(".")[0] in labels, test
            assert entry.versions is None or entry.versions <= set(MATRIX), test
            assert entry.reason, test
