"""Smoke tests of the example project, run as a user would: ``python example_project/manage.py``.

Each command runs in a subprocess from the repository root on the embedded default (a SQLite
file under ``tmp_path``, the local-memory cache, eager Celery), whatever backend the rest of
the suite uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import harness

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "example_project" / "manage.py"
#: Variables that would point the example project at real services.
SERVICE_VARIABLES = ("DATABASE_URL", "REPLICA_URL", "REDIS_URL", "CELERY_BROKER_URL")
ARTICLES = 40

# Run in the example project's shell after the demo: render the admin changelist as the demo
# superuser, the front page and a published article with comments, and print what was seen.
PAGES = """
from django.contrib.auth import get_user_model
from django.test import Client
from django.test.utils import setup_test_environment
from django.utils.html import escape
from news.models import Article

setup_test_environment()
client = Client()
client.force_login(get_user_model().objects.get(username="admin"))
changelist = client.get("/admin/news/article/")
print("changelist", changelist.status_code, changelist.context["cl"].result_count)
front = client.get("/")
print("front", front.status_code)
article = Article.objects.published().filter(comments__isnull=False).first()
detail = client.get(article.get_absolute_url())
page = detail.content.decode()
comment = article.comments.first()
print("detail", detail.status_code, escape(article.title) in page, escape(comment.author_name) in page)
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_scale.testing import forbid_n_plus_one
with CaptureQueriesContext(connection) as queries, forbid_n_plus_one():
    listing = client.get("/articles/")
article_queries = [q for q in queries.captured_queries if "news_" in q["sql"]]
print("list", listing.status_code, len(article_queries))
"""


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``example_project/manage.py`` with *args* from the repository root."""
    return subprocess.run(
        [sys.executable, str(MANAGE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def example_env(database: Path) -> dict[str, str]:
    """Return the environment for the example project on the SQLite file *database*."""
    env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    # pytest-django points DJANGO_SETTINGS_MODULE at the suite's settings.
    env["DJANGO_SETTINGS_MODULE"] = "newsroom.settings"
    env["DJANGO_SCALE_EXAMPLE_SQLITE"] = str(database)
    env["DJANGO_DEBUG"] = "1"
    return env


def article_count(output: str) -> int:
    match = re.search(r"^\s+articles\s+(\d+)\s", output, re.MULTILINE)
    assert match, f"no article count in the demo's summary:\n{output}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def seeded(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """Run the demo once on a fresh database; return its environment and the run."""
    env = example_env(tmp_path_factory.mktemp("example") / "db.sqlite3")
    return env, manage(env, "demo", "--articles", str(ARTICLES))


def test_check_passes_at_warning_level(tmp_path: Path) -> None:
    result = manage(example_env(tmp_path / "db.sqlite3"), "check", "--fail-level", "WARNING")
    assert result.returncode == 0, explain(result)


def test_migrations_are_up_to_date(tmp_path: Path) -> None:
    result = manage(example_env(tmp_path / "db.sqlite3"), "makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, explain(result)


def test_demo_seeds_and_summarises(seeded: tuple[dict[str, str], subprocess.CompletedProcess[str]]) -> None:
    _, result = seeded
    assert result.returncode == 0, explain(result)
    assert f"Seeded {ARTICLES} articles" in result.stdout, explain(result)
    assert article_count(result.stdout) == ARTICLES
    for expected in ("sections", "comments", "sqlite", "LocMemCache", "eager", "/admin/", "runserver"):
        assert expected in result.stdout, explain(result)
    assert "superuser created" in result.stdout, explain(result)


def test_demo_again_does_not_duplicate(
    seeded: tuple[dict[str, str], subprocess.CompletedProcess[str]],
) -> None:
    env, first = seeded
    assert first.returncode == 0, explain(first)
    result = manage(env, "demo", "--articles", str(ARTICLES))
    assert result.returncode == 0, explain(result)
    assert "not seeding" in result.stdout, explain(result)
    assert article_count(result.stdout) == ARTICLES


def test_admin_changelist_and_public_pages_render(
    seeded: tuple[dict[str, str], subprocess.CompletedProcess[str]],
) -> None:
    env, first = seeded
    assert first.returncode == 0, explain(first)
    result = manage(env, "shell", "-c", PAGES)
    assert result.returncode == 0, explain(result)
    lines = result.stdout.splitlines()
    assert f"changelist 200 {ARTICLES}" in lines, explain(result)
    assert "front 200" in lines, explain(result)
    assert "detail 200 True True" in lines, explain(result)
    # Articles, authors, tags and comment counts, with no lookups written in the view.
    assert "list 200 4" in lines, explain(result)


# `bench site`'s pages in one configuration: status, queries (cold cache, then warm) and a
# digest of the page's content, per page.
SITE_PAGES = """
import hashlib, re
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext, setup_test_environment
from news.models import Article, Section

setup_test_environment()
cache.clear()
client = Client()
article = Article.objects.published().filter(comments__isnull=False).first()
section = Section.objects.filter(articles__in=Article.objects.published()).first()
for url in ["/", f"/sections/{section.slug}/", article.get_absolute_url()]:
    counts = []
    for _ in range(2):
        with CaptureQueriesContext(connection) as queries:
            response = client.get(url)
        counts.append(len(queries))
    page = response.content.decode()
    main = re.search(r"<main>(.*)</main>", page, re.S).group(1)
    aside = " ".join(re.search(r"<aside>(.*)</aside>", page, re.S).group(1).split())
    print(url, response.status_code, *counts, hashlib.md5((main + aside).encode()).hexdigest())
"""


@pytest.mark.once
def test_bench_site_configurations_serve_the_same_pages(
    seeded: tuple[dict[str, str], subprocess.CompletedProcess[str]],
) -> None:
    """Stock, hand-tuned and django-scale: the same HTML, at different costs in queries."""
    env, first = seeded
    assert first.returncode == 0, explain(first)
    pages: dict[str, dict[str, tuple[str, int, int, str]]] = {}
    for config in ("stock", "tuned", "scale"):
        result = manage({**env, "DJANGO_SCALE_EXAMPLE_CONFIG": config}, "shell", "-c", SITE_PAGES)
        assert result.returncode == 0, explain(result)
        rows = [line.split() for line in result.stdout.splitlines() if line.startswith("/")]
        pages[config] = {
            url: (status, int(cold), int(warm), digest) for url, status, cold, warm, digest in rows
        }
    assert len(pages["stock"]) == 3
    for url, (status, cold, warm, digest) in pages["stock"].items():
        assert status == "200"
        for config in ("tuned", "scale"):
            assert pages[config][url][0] == "200"
            assert pages[config][url][3] == digest, (config, url)
            # Stock loads relations row by row and caches nothing: the most queries, every time.
            assert pages[config][url][1] < cold, (config, url)
        assert warm == cold, url
    front, section, _ = pages["stock"]
    for config in ("tuned", "scale"):
        # Cached: the front page takes no query when warm; the section page none through
        # cache_page (tuned), one through the swr function (scale: the section's row, for the 404).
        assert pages[config][front][2] == 0, config
    assert pages["tuned"][section][2] == 0
    assert pages["scale"][section][2] == 1


def test_demo_refuses_zero_articles(tmp_path: Path) -> None:
    result = manage(example_env(tmp_path / "db.sqlite3"), "demo", "--articles", "0")
    assert result.returncode != 0, explain(result)
    assert "--articles must be at least 1, not 0." in result.stderr, explain(result)


def test_bench_bulk_smoke_run(tmp_path: Path) -> None:
    result = manage(example_env(tmp_path / "db.sqlite3"), "bench", "bulk", "--quick", "--rows", "300")
    assert result.returncode == 0, explain(result)
    for expected in (
        "Inserts, 300 rows (sqlite)",
        "django-scale copy_from(instances)",
        "django-scale copy_from(tuples)",
        "django-scale copy_update(tuples)",
        "django-scale copy_to()",
    ):
        assert expected in result.stdout, explain(result)


def test_demo_shows_the_bulk_import_and_export(
    seeded: tuple[dict[str, str], subprocess.CompletedProcess[str]],
) -> None:
    _, result = seeded
    assert "copy_from(), through bulk_create in batches (the SQLite fallback)" in result.stdout, explain(
        result
    )
    assert re.search(r"copy_to\(\): \d+ rows", result.stdout), explain(result)
    assert "needs PostgreSQL (set DATABASE_URL); skipped" in result.stdout, explain(result)


def test_bench_cache_explains_that_it_needs_redis(tmp_path: Path) -> None:
    result = manage(example_env(tmp_path / "db.sqlite3"), "bench", "cache", "--quick")
    assert result.returncode == 0, explain(result)
    assert "bench cache needs Redis: set REDIS_URL or DJANGO_SCALE_EXAMPLE_HARNESS=1." in result.stdout


def test_bench_querycache_explains_that_it_needs_postgresql_and_a_replica(tmp_path: Path) -> None:
    result = manage(example_env(tmp_path / "db.sqlite3"), "bench", "querycache", "--quick")
    assert result.returncode == 2, explain(result)
    assert "bench querycache needs PostgreSQL with a streaming replica." in result.stdout, explain(result)


def _figure(output: str, label: str, unit: str) -> int:
    match = re.search(rf"^\s+{re.escape(label)}\s+(\d+) {unit}", output, re.MULTILINE)
    assert match, f"no {label!r} figure in the demo's output:\n{output}"
    return int(match.group(1))


def test_demo_shows_each_win_side_by_side(
    seeded: tuple[dict[str, str], subprocess.CompletedProcess[str]],
) -> None:
    """The demo's numbers: what django-scale changes, against stock Django, on the same data."""
    _, result = seeded
    out = result.stdout
    # The list page: the naive loop costs a query per row and relation; django-scale, with no
    # lookups written, a handful.
    naive = _figure(out, "naive loop (stock)", "queries")
    scaled = _figure(out, "django-scale, no lookups", "queries")
    assert naive > 100 and scaled <= 5, explain(result)
    # The changelist: fewer COUNT(*) with ScaleModelAdmin.
    stock_counts = int(re.search(r"ModelAdmin \(stock\)\s+\d+ queries\s+(\d+) COUNT", out).group(1))  # type: ignore[union-attr]
    scale_counts = int(re.search(r"ScaleModelAdmin\s+\d+ queries\s+(\d+) COUNT", out).group(1))  # type: ignore[union-attr]
    assert scale_counts < stock_counts, explain(result)
    # An expired key read by 50 callers at once: computed 50 times against once.
    assert _figure(out, "get_or_set (stock)", "computations") > 1, explain(result)
    assert _figure(out, "stale_while_revalidate", "computations") == 1, explain(result)
    assert "N+1 query: Article.comments was loaded row by row" in out, explain(result)
    assert re.search(r"^\s+stopped\s+after \d+ ms", out, re.MULTILINE), explain(result)


@pytest.mark.once
@pytest.mark.postgres
def test_demo_on_services_shows_the_replica_wins(tmp_path: Path) -> None:
    """``demo --services``: its own PostgreSQL primary, replica and Redis, and the wins they show."""
    env = example_env(tmp_path / "unused.sqlite3")
    env["PG_BIN"] = str(harness.PG_BIN)
    result = manage(env, "demo", "--services", "--articles", "300")
    assert result.returncode == 0, explain(result)
    out = result.stdout
    replica_share = re.search(r"replica \(replica\)\s+\d+ queries\s+(\d+)%", out)
    assert replica_share and int(replica_share.group(1)) >= 90, explain(result)
    assert re.search(r"the writer\s+read from default: views=\d+, sees the write", out), explain(result)
    assert re.search(r"another user\s+read from replica: .*older row", out), explain(result)
    assert re.search(r"runaway query\s+\w+ after [\d.]+ s \(1 cancelled by the sniper\)", out), explain(
        result
    )
    assert re.search(r"copy_from\(\)\s+[\d,]+ rows/s", out), explain(result)


def test_the_demo_runs_without_a_postgresql_driver(tmp_path: Path) -> None:
    """README's first command installs no driver (``pip install -e .``): the SQLite demo needs none."""
    blocked = (
        "import runpy, sys\n"
        "sys.modules['psycopg'] = sys.modules['psycopg2'] = None  # what an uninstalled package looks like\n"
        f"sys.argv = [{str(MANAGE)!r}, 'demo', '--articles', '40']\n"
        f"runpy.run_path({str(MANAGE)!r}, run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked],
        cwd=ROOT,
        env=example_env(tmp_path / "db.sqlite3"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, explain(result)
    assert "django-scale, no lookups" in result.stdout, explain(result)


#: The page a browser goes to after each write of bench site's mix (the redirect it follows).
FOLLOWS = {"article after comment": "comment (POST)", "changelist after edit": "admin edit (POST)"}


def _requests(phase: dict[str, Any], page: str) -> int:
    return int(phase["pages"].get(page, {"requests": 0})["requests"])


def _scheduled(phase: dict[str, Any]) -> int:
    """The requests of an open loop's schedule: all it recorded but the redirects followed."""
    return int(phase["all"]["requests"]) - sum(_requests(phase, page) for page in FOLLOWS)


@pytest.mark.once
@pytest.mark.postgres
def test_bench_site_runs_end_to_end(tmp_path: Path) -> None:
    """``bench site --quick`` on a tiny data set: three deployments, loaded, measured, stopped."""
    env = example_env(tmp_path / "unused.sqlite3")
    env["PG_BIN"] = str(harness.PG_BIN)
    env["DJANGO_SCALE_EXAMPLE_HARNESS"] = "1"
    figures_path = tmp_path / "site.json"
    result = subprocess.run(
        [
            sys.executable,
            str(MANAGE),
            "bench",
            "site",
            "--quick",
            "--articles",
            "200",
            "--json",
            str(figures_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, explain(result)
    assert "seeded: 200 articles, 600 tags of articles" in result.stdout, explain(result)
    # The goals, each judged from the run's own figures.
    assert "\nGoals (issue 15)\n" in result.stdout, explain(result)
    goals = result.stdout.split("\nGoals (issue 15)\n", 1)[1]
    for goal in (
        "capacity >= 5x stock",
        "p99 through cache expiry >= 3x lower than tuned",
        "faults: 0 stale reads",
    ):
        assert goal in goals, explain(result)
    figures = json.loads(figures_path.read_text())
    configs = figures["configs"]
    assert list(configs) == ["stock", "tuned", "scale"]
    stock_capacity = (
        configs["stock"]["capacity"]["rate"] or configs["stock"]["closed loop"]["all"]["throughput"]
    )
    assert figures["rates"] == [max(0.1, round(stock_capacity * load, 2)) for load in (0.5, 0.8)]
    for name, config in configs.items():
        # Capacity: the highest open-loop step whose p99 stayed under a second, without errors.
        steps = config["capacity"]["steps"]
        assert len(steps) == figures["durations"]["steps"], name
        assert steps[0]["rate"] == max(0.1, round(config["closed loop"]["all"]["throughput"], 2)), name
        assert config["capacity"]["rate"] == max(
            (step["rate"] for step in steps if step["p99"] < 1.0 and step["errors"] == 0), default=0.0
        ), name
        for phase in ("closed loop", "open 50%", "open 80%"):
            summary = config[phase]["all"]
            assert summary["requests"] > 0 and summary["errors"] == 0, (
                name,
                phase,
                config[phase]["statuses"],
            )
            assert 0 < summary["p50"] <= summary["p99"] <= summary["p99.9"] <= summary["max"]
        # The open loop sent its fixed schedule: rate x duration requests, all answered, and
        # the redirect each answered write asked for (a browser follows it at once).
        phase = config["open 50%"]
        assert _scheduled(phase) == max(1, round(figures["rates"][0] * figures["durations"]["open"]))
        for follow, write in FOLLOWS.items():
            assert _requests(phase, follow) == _requests(phase, write), (name, follow)
        # Each write alone: the admin saved the article (302 to the changelist), the comment
        # was taken (303 to the article); neither is an error the summaries would not count.
        assert set(config["pages"]["admin edit (POST)"]["statuses"]) == {"302"}, name
        assert set(config["pages"]["comment (POST)"]["statuses"]) == {"303"}, name
        assert {"front page", "section", "article"} <= set(config["closed loop"]["pages"]), name
        # Every process the deployment started is gone.
        for pid in config["pids"]:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "newsroom" not in Path(f"/proc/{pid}/cmdline").read_text()
            )
    # Faults (--quick: django-scale only), each during the fixed-rate run, the canary writing.
    assert "faults" not in configs["stock"] and "faults" not in configs["tuned"]
    faults = configs["scale"]["faults"]
    # At half of hand-tuned's capacity, after a run at that rate with no fault (their baseline).
    tuned = configs["tuned"]
    half = max(0.1, round(0.5 * (tuned["capacity"]["rate"] or tuned["closed loop"]["all"]["throughput"]), 2))
    assert faults["rate"] == half
    if half != figures["rates"][0]:
        # Tuned ran at that rate too: django-scale's primary time is held against it there.
        for name in ("tuned", "scale"):
            baseline = configs[name]["open at the faults' rate"]
            assert baseline["rate"] == half and baseline["all"]["errors"] == 0, name
            assert baseline["pages"]["front page"]["requests"] > 0, name
        assert "primary time per request <= 0.5x tuned (" + f"{half:g}/s)" in goals, explain(result)
    assert [fault["fault"] for fault in faults["faults"]] == [
        "replica killed", "replica paused", "redis stopped", "redis frozen", "broker stopped", "runaway lock",
    ]  # fmt: skip
    for fault in faults["faults"]:
        window = fault["window"]
        assert 0 < window["injected"] <= window["inject done"] <= window["recovering"] <= window["recovered"]
        assert fault["canary rounds"] > 0, fault["fault"]
        assert fault["timeline"][-1]["t"] >= window["recovered"], fault["fault"]
    # The sniper cancelled the runaway query (it sleeps for an hour otherwise).
    assert faults["faults"][-1]["notes"]["sniped"] >= 1
    assert faults["canary"]["ok"] > 0
    # The ASGI run: django-scale under uvicorn at the WSGI run's fixed rates, all answered.
    asgi = figures["asgi"]
    assert asgi["server"] == "uvicorn" and configs["scale"]["server"] == "gunicorn"
    for load, rate in zip(("open 50%", "open 80%"), figures["rates"], strict=True):
        assert asgi[load]["rate"] == rate
        assert _scheduled(asgi[load]) == max(1, round(rate * figures["durations"]["open"]))
        assert asgi[load]["all"]["errors"] == 0, asgi[load]["statuses"]
    for pid in asgi["pids"]:
        assert not Path(f"/proc/{pid}").exists() or "newsroom" not in Path(f"/proc/{pid}/cmdline").read_text()
    # Server against generator: every probed request was stamped with its send time, so the
    # server recorded a queue time for each; latency + queue time is beside the generator's.
    for run in (configs["scale"], asgi):
        for page, probe in run["pages"].items():
            assert probe["server"]["metrics_requests"] == probe["all"]["requests"] > 0, page
            assert probe["server"]["metrics_queued"] == probe["server"]["metrics_requests"], page
            assert probe["server side"]["p50"] <= probe["server + queue"]["p50"], page
    # Through cache expiry: tuned and scale again, their pages fresh for 2 s, at half of tuned's
    # capacity for the open phase's seconds (several expiries), all answered.
    expiry = figures["expiry"]
    assert list(expiry) == ["tuned", "scale"]
    tuned_capacity = (
        configs["tuned"]["capacity"]["rate"] or configs["tuned"]["closed loop"]["all"]["throughput"]
    )
    for name, run in expiry.items():
        assert run["ttl"] == 2 and run["rate"] == max(0.1, round(0.5 * tuned_capacity, 2)), name
        assert _scheduled(run) == max(1, round(run["rate"] * figures["durations"]["open"])), name
        assert run["all"]["errors"] == 0, (name, run["statuses"])
    assert "scale: through cache expiry" in [row["phase"] for row in figures["phases"]["phases"]]
    # The floor: a no-op app under each app server answered every request.
    assert set(figures["floor"]) == {"gunicorn", "uvicorn"}
    for floor in figures["floor"].values():
        assert floor["requests"] > 0 and floor["errors"] == 0 and 0 < floor["p50"] <= floor["p99"]
    # Each phase's seconds, and an estimate of the full run's.
    phases = [row["phase"] for row in figures["phases"]["phases"]]
    assert phases[0] == "seed" and "scale (uvicorn): open 80%" in phases and "floor (uvicorn)" in phases
    assert figures["phases"]["full run estimate without seeding"] > figures["seconds"]
    server = {name: config["closed loop"]["server"] for name, config in configs.items()}
    # Stock reads everything from the primary, row by row; the other two read from the replica.
    assert server["stock"]["replica_queries_per_request"] == 0
    assert server["stock"]["replica_connections_peak"] == 0
    assert server["stock"]["primary_connections_peak"] >= 1
    assert server["stock"]["primary_queries_per_request"] > 5 * server["scale"]["primary_queries_per_request"]
    for name in ("tuned", "scale"):
        assert server[name]["replica_queries_per_request"] > server[name]["primary_queries_per_request"], name
        assert server[name]["replica_connections_peak"] >= 1, name
