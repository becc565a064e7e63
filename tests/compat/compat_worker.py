"""Run one profile of Django's own test suite with django-scale's classes swapped in.

Part of the compatibility harness (see run.py, which starts this in a subprocess per profile):
it imports Django's ``tests/runtests.py`` as a module and patches it, which is allowed in the
harness only: ``django_scale`` joins ``ALWAYS_INSTALLED_APPS`` (its templates and tags), the
classes are swapped right after ``django.setup()`` (before the test apps are imported), and
the test runner records which tests ran and which failed, in a JSON file.

    python compat_worker.py PROFILE DJANGO_TESTS_DIR RESULT_JSON PARALLEL STOCK [LABEL ...]
"""

from __future__ import annotations

import atexit
import inspect
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import traceback
from typing import Any

import compat_swap

_SPECIAL = re.compile(r"^(\w+) \((.+)\)$")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failure|Exit|Warning)\b")


def test_id(test: Any) -> str:
    """The id a known-differences list uses: a subtest's parent, a class fixture's class."""
    parent = getattr(test, "test_case", None)  # unittest's _SubTest
    if parent is not None:
        test = parent
    name = str(test.id())
    # _ErrorHolder for a failed setUpClass/setUpModule: "setUpClass (module.Class)".
    match = _SPECIAL.match(name)
    if match:
        return f"{match.group(2)}.{match.group(1)}"
    return name


def summary(text: str) -> str:
    """The exception line of a traceback (its type and the start of its message)."""
    lines = text.strip().splitlines()
    for line in reversed(lines):
        if _EXCEPTION.match(line):
            return line.strip()[:240]
    return lines[-1].strip()[:240] if lines else ""


def main(argv: list[str]) -> int:
    profile, tests_dir, out_path, parallel_arg, stock_arg, *labels = argv
    parallel = int(parallel_arg)
    stock = stock_arg == "1"
    tests_dir = os.path.abspath(tests_dir)
    os.chdir(tests_dir)
    sys.path.insert(0, tests_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "test_sqlite"
    # What runtests.py's __main__ block does first since Django 5.2.x (earlier, at import).
    tmpdir = tempfile.mkdtemp(prefix="django_")
    tempfile.tempdir = os.environ["TMPDIR"] = tmpdir
    atexit.register(shutil.rmtree, tmpdir, ignore_errors=True)
    # The swap made in this process must reach the test workers: fork them (the default on
    # Linux up to Python 3.13; spawn would re-import runtests.py without it).
    multiprocessing.set_start_method("fork", force=True)

    import runtests  # Django's tests/runtests.py, from the sdist
    from django.test.utils import get_runner, iter_test_cases

    record: dict[str, Any] = {"ran": [], "failed": {}, "tracebacks": {}, "problems": []}
    runtests.ALWAYS_INSTALLED_APPS.append("django_scale")
    original_setup = runtests.setup_collect_tests

    def setup_collect_tests(*args: Any, **kwargs: Any) -> Any:
        result = original_setup(*args, **kwargs)  # django.setup(): contrib apps only
        if not stock:
            compat_swap.swap(profile)
        return result

    runtests.setup_collect_tests = setup_collect_tests

    def compat_runner(settings: Any, test_runner_class: Any = None) -> Any:
        base = get_runner(settings, test_runner_class)

        class CompatRunner(base):  # type: ignore[misc,valid-type]
            def run_suite(self, suite: Any, **kwargs: Any) -> Any:
                record["ran"] = sorted({test_id(test) for test in iter_test_cases(suite)})
                if not stock:
                    problems = compat_swap.verify(profile)
                    if problems:
                        record["problems"] = problems
                        raise SystemExit("compat: the swap did not happen:\n  " + "\n  ".join(problems))
                result = super().run_suite(suite, **kwargs)
                failed: dict[str, str] = {}
                tracebacks: dict[str, str] = record["tracebacks"]
                for test, text in [*result.errors, *result.failures]:
                    failed.setdefault(test_id(test), summary(text))
                    tracebacks[test_id(test)] = tracebacks.get(test_id(test), "") + f"{test}\n{text}\n"
                for test in result.unexpectedSuccesses:
                    failed.setdefault(test_id(test), "unexpected success")
                record["failed"] = failed
                return result

        return CompatRunner

    runtests.get_runner = compat_runner
    values = {
        "verbosity": 1,
        "interactive": False,
        "failfast": False,
        "keepdb": False,
        "reverse": False,
        "test_labels": labels or compat_swap.PROFILES[profile],
        "debug_sql": False,
        "parallel": parallel,
        "tags": None,
        "exclude_tags": None,
        "test_name_patterns": None,
        "start_at": None,
        "start_after": None,
        "pdb": False,
        "buffer": False,
        "timing": False,
        "shuffle": False,
        "durations": None,
    }
    parameters = inspect.signature(runtests.django_tests).parameters
    unknown = [name for name, p in parameters.items() if name not in values and p.default is p.empty]
    if unknown:
        raise SystemExit(
            f"compat: runtests.django_tests() of this Django needs {unknown}; teach compat_worker.py"
        )
    try:
        runtests.django_tests(**{name: value for name, value in values.items() if name in parameters})
    except SystemExit as exit:
        if not record["problems"]:
            raise
        print(exit, file=sys.stderr)
    except Exception:
        traceback.print_exc()
        record["problems"].append("the test run crashed (traceback above)")
    with open(out_path, "w") as out:
        json.dump(record, out, indent=1)
    return 1 if record["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
