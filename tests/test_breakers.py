"""Tests of django_scale.breakers: per-name circuit breakers, each outage logged once and counted."""

from __future__ import annotations

import logging
import time

import pytest
from support import counter, wait_until

from django_scale import metrics
from django_scale.breakers import Breakers

LOGGER = logging.getLogger("django_scale.tests.breakers")


@pytest.fixture(autouse=True)
def fresh_metrics() -> None:
    metrics.reset()


def test_a_tripped_name_is_open_until_its_retry_after_passes() -> None:
    breakers = Breakers(LOGGER)
    assert breakers.is_open("cache 'a'") is False
    assert breakers.trip("cache 'a'", "refused", 0.05, metric="tests.down") is True
    assert breakers.is_open("cache 'a'") is True
    assert breakers.is_open("cache 'b'") is False
    assert breakers.open_until("cache 'a'") > time.monotonic()
    wait_until(lambda: not breakers.is_open("cache 'a'"), "the retry-after to pass")
    assert breakers.open_until("cache 'a'") == 0.0
    assert counter("tests.down") == 1


def test_an_outage_is_logged_once_and_every_failure_counted(caplog: pytest.LogCaptureFixture) -> None:
    breakers = Breakers(LOGGER)
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        assert breakers.trip("the broker", "refused", 60, metric="tests.down") is True
        assert breakers.trip("the broker", "refused again", 60, metric="tests.down") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "the broker is unreachable (refused); not trying it for 60.0 s"
    ]
    assert counter("tests.down") == 2


def test_without_close_on_expiry_only_a_success_ends_the_outage(caplog: pytest.LogCaptureFixture) -> None:
    breakers = Breakers(LOGGER, close_on_expiry=False)
    breakers.trip("cache 'shared'", "timeout", 0.0)
    assert breakers.is_open("cache 'shared'") is False  # its time is up: try again
    # A second failure is the same outage: not logged again.
    assert breakers.trip("cache 'shared'", "timeout", 0.0) is False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        assert breakers.close("cache 'shared'") is True
        assert breakers.close("cache 'shared'") is False
    assert [r.getMessage() for r in caplog.records] == ["cache 'shared' answers again"]
    assert breakers.trip("cache 'shared'", "timeout", 0.0) is True  # a new outage


def test_reset_closes_every_breaker() -> None:
    breakers = Breakers(LOGGER)
    breakers.trip("a", "x", 60)
    breakers.trip("b", "x", 60)
    breakers.reset()
    assert not breakers.is_open("a")
    assert not breakers.is_open("b")
    assert breakers.trip("a", "x", 60) is True


def test_a_probe_retries_off_the_callers_path_and_a_success_closes_the_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    breakers = Breakers(LOGGER)
    answers = {"up": False}
    probes: list[float] = []

    def probe() -> None:
        probes.append(time.monotonic())
        if not answers["up"]:
            raise ConnectionError("still down")

    breakers.trip("cache 'a'", "timed out", 0.05, metric="tests.down", probe=probe)
    assert breakers.is_open("cache 'a'") and probes == []  # not before its retry time
    # Past it, the first caller starts the probe, callers go on skipping the service while it
    # runs, and a failed probe keeps the breaker open for another retry_after.
    wait_until(lambda: breakers.is_open("cache 'a'") and len(probes) >= 3, "three probes")
    assert breakers.is_open("cache 'a'")
    assert counter("tests.down") == 1  # a probe's failure is not a caller's
    answers["up"] = True
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        wait_until(lambda: not breakers.is_open("cache 'a'"), "the probe finding it back")
    assert "cache 'a' answers again" in caplog.text
    assert breakers.open_until("cache 'a'") == 0.0
    # The probe went with the outage: the next trip without one closes on expiry again.
    count = len(probes)
    breakers.trip("cache 'a'", "refused", 0.05)
    wait_until(lambda: not breakers.is_open("cache 'a'"), "the retry-after to pass")
    assert len(probes) == count
