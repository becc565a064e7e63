"""The compatibility job: Django's own test suites with django-scale's classes swapped in.

    python tests/compat/run.py [--profile admin|orm] [--update] [--stock] [LABEL ...]

For each profile (compat_swap.PROFILES) it runs the test apps of the sdist of the *installed*
Django version with Django's ``tests/runtests.py`` on SQLite (``test_sqlite`` settings), with
every ``ModelAdmin`` a ``ScaleModelAdmin`` (admin) or every default manager prefetch-aware
and, on Django <= 6.0, every FK/O2O a PrefetchAware field (orm). It fails on a failure the
profile's list of known differences (admin.txt, orm.txt) does not name, on a listed test
that now passes, and on an entry still UNEXPLAINED. ``--update`` rewrites the list from the
run (for this Django version), keeping reasons. ``--stock`` runs without the swap, to see
whether a failure is Django's own on this machine. LABELs narrow the run (``admin_views``,
``queries.tests.Queries1Tests``); the list is then checked for the tests that ran only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import django

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compat_swap import PROFILES  # noqa: E402
from known_differences import KnownDifferences  # noqa: E402


def django_tests_dir(cache: Path) -> Path:
    """Django's ``tests/`` from the sdist of the installed version, downloaded once into *cache*."""
    version = django.get_version()
    target = cache / f"django-{version}"
    tests = target / "tests"
    if (tests / "runtests.py").exists():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"Django=={version}", "--dest", download], check=True)
        (sdist,) = Path(download).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            top = archive.getnames()[0].split("/")[0]
            members = [m for m in archive.getmembers() if m.name.startswith(f"{top}/tests/")]
            archive.extractall(download, members=members, filter="data")
        Path(download, top).rename(target)
    return tests


def run_profile(
    profile: str, tests: Path, labels: list[str], parallel: int, stock: bool
) -> tuple[dict, float]:
    """Run *profile* in a subprocess; Django's own output goes to a log, shown when the run breaks."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp, "result.json"), Path(tmp, "output.log")
        command = [sys.executable, str(HERE / "compat_worker.py"), profile, str(tests), str(out)]
        started = time.monotonic()
        with log.open("w") as output:
            completed = subprocess.run(
                [*command, str(parallel), "1" if stock else "0", *labels],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        elapsed = time.monotonic() - started
        if not out.exists() or json.loads(out.read_text())["problems"]:
            print(log.read_text()[-20000:])
            problems = json.loads(out.read_text())["problems"] if out.exists() else []
            raise SystemExit(
                f"compat: the {profile} run broke (exit {completed.returncode}): " + "; ".join(problems)
            )
        record = json.loads(out.read_text())
        # The harness's own lines (what the swap covered) and Django's summary lines.
        for line in log.read_text().splitlines():
            if line.startswith(("compat:", "Ran ", "OK", "FAILED (", "Found ")):
                print(line)
    return record, elapsed


def check_django_version() -> None:
    """Refuse to run another Django than the tox env's name says (``compat-django42``: 4.2)."""
    env = os.environ.get("DJANGO_SCALE_COMPAT_ENV", "")
    match = re.search(r"django(\d)(\d+)", env)
    if match:
        expected = f"{match.group(1)}.{match.group(2)}"
        if not django.get_version().startswith(expected + "."):
            raise SystemExit(
                f"compat: {env} must run Django {expected}, but Django {django.get_version()} is installed"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("labels", nargs="*", help="test labels to run instead of the whole profiles")
    parser.add_argument("--profile", action="append", choices=sorted(PROFILES), help="default: all")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir(), "django-scale-compat"))
    parser.add_argument("--django-tests", type=Path, help="Django's tests/ directory (instead of the sdist)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--update", action="store_true", help="rewrite the lists from this run")
    parser.add_argument(
        "--stock", action="store_true", help="run Django's classes (no swap), report failures"
    )
    options = parser.parse_args()

    check_django_version()
    version = ".".join(django.get_version().split(".")[:2])
    tests = options.django_tests or django_tests_dir(options.cache)
    profiles = options.profile or sorted(PROFILES)
    ok = True
    for profile in profiles:
        labels = [label for label in options.labels if label.split(".")[0] in PROFILES[profile]]
        if options.labels and not labels:
            continue
        record, elapsed = run_profile(profile, tests, labels, options.parallel, options.stock)
        failed: dict[str, str] = record["failed"]
        print(
            f"\ncompat: {profile} on Django {django.get_version()}: {len(record['ran'])} tests ran, "
            f"{len(failed)} failed, in {elapsed:.0f} s{' (stock classes)' if options.stock else ''}"
        )
        if options.stock:
            for test in sorted(failed):
                print(f"  {test}  # {failed[test]}")
            ok = ok and not failed
            continue
        path = HERE / f"{profile}.txt"
        known = KnownDifferences.read(path)
        if options.update:
            known.update(version, record["ran"], failed)
            known.write(path)
            print(f"compat: wrote {path.name}: {len(known.expected(version))} entries for Django {version}")
        comparison = known.compare(version, record["ran"], failed)
        print(
            f"compat: {profile}.txt lists {len(known.expected(version))} known differences for Django {version}"
        )
        for test in comparison.unexpected:
            print(
                f"\n{'=' * 70}\nFAILED, NOT LISTED: {test}\n{record['tracebacks'].get(test, failed[test])[-6000:]}"
            )
        for test in comparison.unexpected:
            print(f"  FAILED, NOT LISTED: {test}  # {failed[test]}")
        for test in comparison.passing:
            print(f"  LISTED, NOW PASSES (remove it, or run --update): {test}")
        for test in comparison.unexplained:
            print(f"  LISTED AS UNEXPLAINED (write the reason): {test}  # {failed.get(test, '')}")
        ok = ok and comparison.ok
    print(f"\ncompat: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
