from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_scale.conf import SETTINGS, conf, count_problem, seconds_problem
from django_scale.exceptions import ConfigurationError, DjangoScaleError, UnknownSettingError
from django_scale.testing import override_scale_settings


@override_settings(DJANGO_SCALE={})
def test_defaults_when_keys_are_absent():
    assert conf.PRIMARY == "default"
    assert conf.REPLICAS == ()
    assert conf.MAX_REPLICA_LAG == 5.0
    assert conf.CACHE_ALIAS == "default"


def test_every_key_has_a_typed_property():
    assert set(SETTINGS) == {name for name in dir(type(conf)) if name.isupper()}


def test_unset_setting_means_defaults():
    with override_settings():
        from django.conf import settings

        del settings.DJANGO_SCALE
        assert conf.REPLICAS == ()


def test_read_at_access_time_not_import_time():
    with override_settings(DJANGO_SCALE={"REPLICAS": ["a", "b"], "MAX_REPLICA_LAG": 2}):
        assert conf.REPLICAS == ("a", "b")
        assert conf.MAX_REPLICA_LAG == 2.0
    with override_settings(DJANGO_SCALE={"REPLICAS": ["c"]}):
        assert conf.REPLICAS == ("c",)


@override_settings(DJANGO_SCALE=["REPLICAS"])
def test_not_a_dict_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="DJANGO_SCALE setting must be a dict, not list"):
        conf.REPLICAS  # noqa: B018
    assert issubclass(ConfigurationError, ImproperlyConfigured)


def test_unknown_name_is_a_key_error():
    with pytest.raises(UnknownSettingError, match="'NOPE' is not a DJANGO_SCALE key. Known keys: ") as raised:
        conf.get("NOPE")
    assert isinstance(raised.value, KeyError)
    assert isinstance(raised.value, DjangoScaleError)


@override_settings(DJANGO_SCALE={"REPLICAS": ["r1"], "CACHE_ALIAS": "other"})
def test_override_scale_settings_merges():
    with override_scale_settings(MAX_REPLICA_LAG=1.5):
        assert conf.MAX_REPLICA_LAG == 1.5
        assert conf.REPLICAS == ("r1",)
        assert conf.CACHE_ALIAS == "other"
    assert conf.MAX_REPLICA_LAG == 5.0


@override_settings(DJANGO_SCALE={"REPLICAS": ["r1"]})
@override_scale_settings(PRIMARY="main")
def test_override_scale_settings_as_decorator_stacks():
    assert conf.PRIMARY == "main"
    assert conf.REPLICAS == ("r1",)


@pytest.mark.parametrize(
    ("value", "zero_allowed", "problem"),
    [
        (1, False, None),
        (0.5, False, None),
        (0, True, None),
        (0, False, "it must be greater than zero"),
        (-1, True, "it must not be negative"),
        (True, False, "it must be a number of seconds (int or float)"),
        ("5", False, "it must be a number of seconds (int or float)"),
        (None, True, "it must be a number of seconds (int or float)"),
        (float("nan"), True, "it must be a number of seconds, not NaN"),
    ],
)
def test_seconds_problem_is_the_one_duration_validator(value, zero_allowed, problem):
    assert seconds_problem(value, zero_allowed=zero_allowed) == problem


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (1, None),
        (500, None),
        (0, "it must be at least 1"),
        (True, "it must be a whole number (int)"),
        (2.0, "it must be a whole number (int)"),
    ],
)
def test_count_problem_is_the_one_count_validator(value, problem):
    assert count_problem(value) == problem


def test_hot_settings_are_computed_once_until_django_scale_changes():
    """conf.hot() computes the request path's settings once, again after setting_changed."""
    from django.conf import settings
    from django.core.signals import setting_changed

    with override_settings(DJANGO_SCALE={"REPLICAS": ["a"]}):
        first = conf.hot()
        assert first.replicas == ("a",)
        assert conf.hot() is first  # computed once
        with override_settings(DJANGO_SCALE={"REPLICAS": ["b", "c"]}):
            assert conf.hot().replicas == ("b", "c")
        assert conf.hot().replicas == ("a",)
        # Another setting's change keeps what was computed.
        kept = conf.hot()
        with override_settings(USE_TZ=not settings.USE_TZ):
            assert conf.hot() is kept
        # Only the signal says DJANGO_SCALE changed: a mutation in place is seen once it is sent.
        settings.DJANGO_SCALE["REPLICAS"] = ["d"]
        assert conf.hot() is kept
        setting_changed.send(sender=None, setting="DJANGO_SCALE", value=settings.DJANGO_SCALE, enter=True)
        assert conf.hot().replicas == ("d",)
