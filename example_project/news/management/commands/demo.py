"""Build the newsroom's data set and show what django-scale does to it.

``python example_project/manage.py demo [--articles N] [--seed S] [--flush]`` migrates the
database, seeds a deterministic news site (the same seed gives the same site), prints a summary
of the data and the services in use, then runs each feature's part of the demo.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import caches
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.db import connections, transaction
from django.utils import timezone
from django.utils.text import slugify

from django_scale.bulk import copy_from, copy_to
from django_scale.conf import conf
from django_scale.exceptions import SniperError
from django_scale.replicas import monitor
from django_scale.sniper import snipe

from news.models import Article, Author, Comment, Section, Tag
from news.wins import WINS
from news.wins_services import SERVICE_WINS

#: Articles written per batch, together with their tags and comments.
BATCH_SIZE = 200
#: The share of articles that are published; the others are drafts.
PUBLISHED_SHARE = 0.9
#: How far back publication times go.
HISTORY = timedelta(days=730)
#: The superuser the demo creates when DEBUG is on.
DEMO_SUPERUSER = ("admin", "admin")

SECTIONS = ("News", "Politics", "Business", "Sport", "Culture", "Science", "Technology", "Opinion")
AUTHOR_COUNT = 50
FIRST_NAMES = (
    "Amara", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kemi", "Liam", "Mei", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
    "Uma", "Victor", "Wen", "Yusuf", "Zoe",
)  # fmt: skip
LAST_NAMES = (
    "Adeyemi", "Bauer", "Costa", "Dubois", "Eriksen", "Fischer", "García", "Haddad", "Ito",
    "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "O'Brien", "Petrov", "Rossi",
    "Schmidt", "Tanaka", "Walsh",
)  # fmt: skip
TAGS = (
    "Africa", "AI", "Analysis", "Architecture", "Art", "Asia", "Basketball", "Books", "Budget",
    "Climate", "Courts", "Cricket", "Crime", "Cycling", "Data", "Design", "Economy", "Education",
    "Elections", "Energy", "Environment", "Europe", "Fashion", "Film", "Food", "Football",
    "Gaming", "Health", "History", "Housing", "Interviews", "Investigations", "Jobs", "Local",
    "Markets", "Medicine", "Middle East", "Music", "Obituaries", "Oceans", "Olympics",
    "Parliament", "Photography", "Podcasts", "Privacy", "Rugby", "Space", "Startups", "Tax",
    "Television", "Tennis", "Theatre", "The Americas", "Trade", "Transport", "Travel", "Weather",
    "Wildlife", "Women's sport", "Workplace",
)  # fmt: skip
SUBJECTS = (
    "Council", "Minister", "City club", "Researchers", "Union leaders", "National museum",
    "Local start-up", "Film festival", "Supreme court", "Mayor", "Head coach", "Orchestra",
    "Hospital trust", "Regulator", "Star striker", "Novelist", "Central bank", "Rail operator",
    "Space agency", "Students",
)  # fmt: skip
VERBS = (
    "approves", "rejects", "unveils", "delays", "questions", "celebrates", "backs",
    "warns over", "plans", "wins", "defends", "reviews", "launches", "scraps", "signs",
)  # fmt: skip
OBJECTS = (
    "new budget", "stadium plan", "climate target", "transfer deal", "rail timetable",
    "autumn exhibition", "housing scheme", "data law", "cup final", "tax reform",
    "vaccine trial", "summer season", "river clean-up", "school reforms", "season opener",
    "interest rates", "night-train route", "library closures", "record-breaking run",
    "satellite launch",
)  # fmt: skip
QUALIFIERS = (
    "", "", "", " after long debate", " amid protests", " in surprise move", " despite criticism",
    " as costs rise", " ahead of key vote", " for the first time",
)  # fmt: skip
WORDS = (
    "the", "a", "city", "report", "week", "plan", "officials", "said", "people", "new", "year",
    "government", "market", "team", "season", "local", "public", "growth", "policy", "support",
    "council", "results", "cost", "record", "future", "against", "after", "before", "while",
    "residents", "expected", "announced", "figures", "show", "latest", "critics", "argue",
    "months", "decision", "industry", "change", "pressure", "early", "final", "players",
    "audience", "research", "data", "risk", "higher", "lower", "across", "region", "national",
    "according", "sources", "statement", "evidence", "reform", "debate", "investment", "project",
    "schools", "services", "trial", "study", "in", "on", "with", "for", "to", "of", "and", "but",
)  # fmt: skip


def show_operations(command: Command) -> None:
    """Operations: the bulk import and export, and a dry run of the query sniper."""
    db = conf.PRIMARY
    command.heading("Operations")
    vendor = connections[db].vendor
    how = "COPY" if vendor == "postgresql" else "bulk_create in batches (the SQLite fallback)"
    command.row("bulk import", f"django_scale.bulk.copy_from(), through {how}")
    buffer = io.StringIO()
    started = time.perf_counter()
    exported = copy_to(Article.objects.using(db).published().values_list("id", "slug", "views"), buffer)
    command.row(
        "bulk export",
        f"copy_to(): {exported} rows, {len(buffer.getvalue()):,} bytes of CSV in "
        f"{(time.perf_counter() - started) * 1000:.0f} ms",
    )
    try:
        report = snipe(dry_run=True, using=[db])
    except SniperError:
        command.row("query sniper", "needs PostgreSQL (set DATABASE_URL); skipped")
        return
    command.row(
        "sniper dry run",
        f"{len(report.kills)} queries over the rules; runs every 10 s as the beat task django_scale.snipe",
    )


#: Each feature's part of the demo, run in order after the summary. A section is a callable
#: that takes the command (for its ``stdout`` and ``style``) and shows one django-scale feature
#: at work on the data set. Add one here per feature.
FEATURE_SECTIONS: tuple[Callable[[Command], None], ...] = (*WINS, *SERVICE_WINS, show_operations)


class ProgressBar:
    """Draw ``label [#####.....] done/total`` on a command's stdout.

    On a terminal the bar is redrawn in place with ``\\r``; otherwise (a pipe, a log file) a
    line is printed at each quarter, so logs stay short.
    """

    def __init__(self, stdout: OutputWrapper, label: str, total: int, width: int = 30) -> None:
        self.stdout = stdout
        self.label = label
        self.total = total
        self.width = width
        self.interactive = stdout.isatty()
        self.quarters_shown = 0

    def line(self, done: int) -> str:
        """Return the bar for *done* of the total."""
        filled = self.width * done // self.total
        return f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}"

    def update(self, done: int) -> None:
        """Show that *done* of the total are done."""
        if self.interactive:
            self.stdout.write(f"\r{self.line(done)}", ending="\n" if done >= self.total else "")
            self.stdout.flush()
            return
        quarters = 4 * done // self.total
        if quarters > self.quarters_shown:
            self.quarters_shown = quarters
            self.stdout.write(self.line(done))


def sentence(rng: random.Random, low: int = 8, high: int = 18) -> str:
    """Return a sentence of newsroom filler words."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + "."


def article_body(rng: random.Random) -> str:
    """Return three to six paragraphs, separated by blank lines."""
    paragraphs = (" ".join(sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(3, 6)))
    return "\n\n".join(paragraphs)


def headline(rng: random.Random) -> str:
    """Return a headline such as "Council approves new budget amid protests"."""
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(QUALIFIERS)}"


def seed_people_and_places(rng: random.Random, db: str) -> tuple[list[Section], list[Author], list[Tag]]:
    """Create the sections, authors and tags in database *db*, and return them."""
    Section.objects.using(db).bulk_create(Section(name=name, slug=slugify(name)) for name in SECTIONS)
    names = rng.sample(list(itertools.product(FIRST_NAMES, LAST_NAMES)), AUTHOR_COUNT)
    Author.objects.using(db).bulk_create(
        Author(
            name=f"{first} {last}",
            email=f"{slugify(first)}.{slugify(last)}@newsroom.example",
            bio=f"{first} {last} writes about {rng.choice(SECTIONS).lower()} for the Newsroom.",
        )
        for first, last in names
    )
    Tag.objects.using(db).bulk_create(Tag(name=name, slug=slugify(name)) for name in TAGS)
    # Read them back: backends that cannot return primary keys from a bulk insert leave them unset.
    return (
        list(Section.objects.using(db)),
        list(Author.objects.using(db).order_by("pk")),
        list(Tag.objects.using(db)),
    )


def seed_articles(
    rng: random.Random,
    total: int,
    sections: Sequence[Section],
    authors: Sequence[Author],
    tags: Sequence[Tag],
    now: datetime,
    progress: ProgressBar,
    db: str,
) -> None:
    """Create *total* articles in *db*, in batches, each with 0-5 tags and 0-6 comments."""
    tagging = Article.tags.through
    start = now - HISTORY
    for first in range(0, total, BATCH_SIZE):
        articles: list[Article] = []
        article_tags: list[list[Tag]] = []
        # (author_name, body, minutes after publication) per comment, per article.
        article_comments: list[list[tuple[str, str, float]]] = []
        for number in range(first + 1, min(first + BATCH_SIZE, total) + 1):
            title = headline(rng)
            published = rng.random() < PUBLISHED_SHARE
            articles.append(
                Article(
                    section=rng.choice(sections),
                    author=rng.choice(authors),
                    title=title,
                    slug=f"{slugify(title)}-{number}",
                    body=article_body(rng),
                    published_at=start + timedelta(seconds=rng.uniform(0, HISTORY.total_seconds())),
                    status=Article.Status.PUBLISHED if published else Article.Status.DRAFT,
                    views=min(int(rng.paretovariate(1.3) * 25), 10**6) if published else 0,
                )
            )
            article_tags.append(rng.sample(list(tags), rng.randint(0, 5)))
            article_comments.append(
                [
                    (
                        f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)[0]}.",
                        " ".join(sentence(rng, 5, 14) for _ in range(rng.randint(1, 3))),
                        rng.uniform(5, 3 * 24 * 60),
                    )
                    for _ in range(rng.randint(0, 6) if published else 0)
                ]
            )
        Article.objects.using(db).bulk_create(articles)
        if any(article.pk is None for article in articles):
            slugs = [article.slug for article in articles]
            pks = dict(Article.objects.using(db).filter(slug__in=slugs).values_list("slug", "pk"))
            for article in articles:
                article.pk = pks[article.slug]
        tagging.objects.using(db).bulk_create(
            tagging(article_id=article.pk, tag_id=tag.pk)
            for article, chosen in zip(articles, article_tags, strict=True)
            for tag in chosen
        )
        # A bulk import: COPY on PostgreSQL, bulk_create in batches on SQLite.
        copy_from(
            Comment,
            (
                (article.pk, author_name, body, min(article.published_at + timedelta(minutes=minutes), now))
                for article, comments in zip(articles, article_comments, strict=True)
                for author_name, body, minutes in comments
            ),
            fields=["article", "author_name", "body", "created_at"],
            using=db,
        )
        progress.update(first + len(articles))


def flush_news(db: str) -> None:
    """Delete every row of the news app in database *db*, dependants first."""
    Comment.objects.using(db).delete()
    Article.tags.through.objects.using(db).delete()
    Article.objects.using(db).only("pk").delete()
    for model in (Tag, Author, Section):
        model.objects.using(db).delete()


def redact(url: str) -> str:
    """Return *url* with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


class Command(BaseCommand):
    help = "Migrate the database, seed a deterministic news site, and show what django-scale does to it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--articles", type=int, default=2000, help="How many articles to seed (default: 2000)."
        )
        parser.add_argument(
            "--seed", type=int, default=42, help="The random seed; one seed, one site (default: 42)."
        )
        parser.add_argument(
            "--flush", action="store_true", help="Delete the news data first and seed it again."
        )
        parser.add_argument(
            "--services",
            action="store_true",
            help="Run on a throwaway PostgreSQL primary, streaming replica and Redis started for the "
            "demo (needs the repository checkout and PostgreSQL's server programs, PG_BIN).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        articles: int = options["articles"]
        seed: int = options["seed"]
        if articles < 1:
            raise CommandError(f"--articles must be at least 1, not {articles}.")
        if options["services"] and os.environ.get("DJANGO_SCALE_EXAMPLE_HARNESS") != "1":
            # Settings pick the databases when they load: run the demo again in a process whose
            # settings start the services (DJANGO_SCALE_EXAMPLE_HARNESS, see newsroom/settings.py).
            manage = str(settings.BASE_DIR / "manage.py")
            argv = [sys.executable, manage, "demo", "--articles", str(articles), "--seed", str(seed)]
            if options["flush"]:
                argv.append("--flush")
            env = {**os.environ, "DJANGO_SCALE_EXAMPLE_HARNESS": "1"}
            raise SystemExit(subprocess.run(argv, env=env, check=False).returncode)

        # The demo writes and counts on the primary: a replica may not have replayed its writes yet.
        db = conf.PRIMARY
        call_command("migrate", database=db, interactive=False, verbosity=0)
        self.seed(db, articles=articles, seed=seed, flush=options["flush"])
        superuser = self.ensure_superuser(db)
        self.summarise(db)

        # Feature sections: each django-scale feature's part of the demo (see FEATURE_SECTIONS).
        for show_feature in FEATURE_SECTIONS:
            show_feature(self)

        self.show_next_steps(superuser)
        # Stop the replica monitors before the services go away with the process (--services).
        for alias in conf.REPLICAS:
            monitor(alias).stop()

    def seed(self, db: str, *, articles: int, seed: int, flush: bool) -> None:
        """Seed the data set of *seed* in *db*, unless news data exists and *flush* is false."""
        if flush:
            with transaction.atomic(using=db):
                flush_news(db)
            self.stdout.write("Deleted the existing news data (--flush).")
        elif Section.objects.using(db).exists() or Article.objects.using(db).exists():
            self.stdout.write(
                f"The database already has news data ({Article.objects.using(db).count()} articles): "
                "not seeding. Pass --flush to delete it and seed again."
            )
            return

        started = time.perf_counter()
        rng = random.Random(seed)
        # Publication times count back from the start of today, so one seed gives one site per day.
        now = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
        progress = ProgressBar(self.stdout, "seeding articles", articles)
        with transaction.atomic(using=db):
            sections, authors, tags = seed_people_and_places(rng, db)
            seed_articles(rng, articles, sections, authors, tags, now, progress, db)
        self.stdout.write(
            self.style.SUCCESS(
                f"Seeded {articles} articles (seed {seed}) in {time.perf_counter() - started:.1f} s."
            )
        )

    def ensure_superuser(self, db: str) -> str | None:
        """Create the demo superuser in *db* when DEBUG is on; return a line saying how to log in."""
        if not settings.DEBUG:
            return None
        username, password = DEMO_SUPERUSER
        users = get_user_model().objects.db_manager(db)
        if users.filter(username=username).exists():
            return f"log in as {username} / {password} (DEBUG is on)"
        users.create_superuser(username=username, email=f"{username}@newsroom.example", password=password)
        return f"log in as {username} / {password} (DEBUG is on; superuser created)"

    def heading(self, text: str) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(text))

    def row(self, label: str, value: object) -> None:
        self.stdout.write(f"  {label:<16}{value}")

    def summarise(self, db: str) -> None:
        """Print the row counts in *db* and the database, cache and Celery setup in use."""
        articles = Article.objects.using(db)
        published = articles.filter(status=Article.Status.PUBLISHED).count()
        total = articles.count()
        self.heading("Data set")
        self.row("sections", Section.objects.using(db).count())
        self.row("authors", Author.objects.using(db).count())
        self.row("tags", Tag.objects.using(db).count())
        self.row("articles", f"{total}  ({published} published, {total - published} drafts)")
        self.row("article tags", Article.tags.through.objects.using(db).count())
        self.row("comments", Comment.objects.using(db).count())

        self.heading("Services")
        for alias in settings.DATABASES:
            connection = connections[alias]
            details = connection.settings_dict
            if connection.vendor == "sqlite":
                where = str(details["NAME"])
            else:
                where = (
                    f"{details['HOST'] or 'localhost'}:{details['PORT'] or 'default port'}/{details['NAME']}"
                )
            role = "replica" if alias in conf.REPLICAS else "primary" if alias == conf.PRIMARY else "other"
            self.row(f"db {alias}", f"{connection.vendor} ({role}) {where}")
        cache = settings.CACHES[conf.CACHE_ALIAS]
        location = f" {redact(str(cache['LOCATION']))}" if cache.get("LOCATION") else ""
        self.row(f"cache {conf.CACHE_ALIAS}", f"{type(caches[conf.CACHE_ALIAS]).__name__}{location}")
        if settings.CELERY_TASK_ALWAYS_EAGER:
            self.row("celery", "eager: tasks run in the calling process (set CELERY_BROKER_URL for a worker)")
        else:
            self.row("celery", f"broker {redact(settings.CELERY_BROKER_URL)}")

    def show_next_steps(self, superuser: str | None) -> None:
        """Print the admin URL and how to run the development server."""
        manage = os.path.relpath(settings.BASE_DIR / "manage.py")
        self.heading("Try it")
        self.row("run", f"python {manage} runserver")
        self.row("site", "http://127.0.0.1:8000/")
        self.row("admin", "http://127.0.0.1:8000/admin/")
        self.row("login", superuser or f"DEBUG is off: python {manage} createsuperuser")
