"""Settings: read once from app.conf under one prefix, validated with clear errors."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery

import celery_ext
from celery_ext import ConfigurationError, Settings


def make_app(**conf: object) -> Celery:
    app = Celery("settings_test", broker="local://", set_as_current=False)
    app.conf.update(conf)
    return app


def test_defaults_are_finite_and_documented() -> None:
    s = Settings()
    assert s.lane_max_queued == 10_000
    assert s.lane_full_policy == "block"
    assert 0 < s.lane_block_timeout < 60
    assert 0 < s.drain_timeout < 600


def test_reads_prefixed_conf_and_overrides_win() -> None:
    app = make_app(celery_ext_lane_max_queued=7, celery_ext_drain_timeout=timedelta(seconds=3))
    s = celery_ext.install(app, lane_full_policy="raise", drain_timeout=2.5)
    assert (s.lane_max_queued, s.lane_full_policy, s.drain_timeout) == (7, "raise", 2.5)
    assert celery_ext.settings_of(app) is s


def test_timedelta_is_normalised_to_seconds() -> None:
    s = Settings.from_app(make_app(celery_ext_lane_block_timeout=timedelta(milliseconds=250)))
    assert s.lane_block_timeout == pytest.approx(0.25)


def test_misspelt_key_names_it_and_the_closest_valid_key() -> None:
    app = make_app(celery_ext_lane_max_queue=5)
    with pytest.raises(ConfigurationError) as info:
        celery_ext.install(app)
    message = str(info.value)
    assert "'celery_ext_lane_max_queue'" in message
    assert "did you mean 'celery_ext_lane_max_queued'" in message


def test_misspelt_override_is_refused_too() -> None:
    with pytest.raises(ConfigurationError, match="celery_ext_drain_timout"):
        celery_ext.install(make_app(), drain_timout=3)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lane_max_queued", 0, "integer >= 1"),
        ("lane_max_queued", "10", "integer >= 1"),
        ("lane_max_queued", True, "integer >= 1"),
        ("lane_full_policy", "drop", "'block', 'raise'"),
        ("lane_block_timeout", "1s", "seconds"),
        ("lane_block_timeout", -1, ">= 0"),
        ("drain_timeout", float("nan"), "finite"),
        ("prefetch_bytes", 0, "integer >= 1"),
        ("eta_buffer", -3, "integer >= 1"),
        ("queue_full_policy", "drop", "'block', 'raise', 'shed'"),
        ("dead_letter_queue", "", "a queue name"),
        ("dead_letter_queue", 5, "a queue name"),
        ("park_prefix", "", "a queue name"),
        ("probe_port", 70000, "a port"),
        ("probe_address", "localhost", "an IP address"),
        ("metrics_address", 0, "an IP address"),
        ("probe_file", "", "a file path"),
        ("max_message_bytes", 0, "integer >= 1"),
        ("max_message_bytes", "1MB", "integer >= 1"),
        ("max_message_bytes", 1.5e6, "integer >= 1"),
    ],
)
def test_wrong_type_or_range_names_key_value_and_expectation(
    key: str, value: object, expected: str
) -> None:
    app = make_app(**{f"celery_ext_{key}": value})
    with pytest.raises(ConfigurationError) as info:
        celery_ext.install(app)
    message = str(info.value)
    assert f"celery_ext_{key}={value!r}" in message
    assert expected in message


class _Wrong:
    """A value no setting accepts."""

    def __repr__(self) -> str:
        return "<wrong>"


@pytest.mark.parametrize("key", Settings.names())
def test_every_setting_refuses_a_value_of_the_wrong_type_at_install(key: str) -> None:
    app = make_app(**{f"celery_ext_{key}": _Wrong()})
    with pytest.raises(ConfigurationError, match=f"celery_ext_{key}=<wrong>"):
        celery_ext.install(app)


def test_max_message_bytes_is_off_by_default_and_takes_an_int() -> None:
    assert Settings().max_message_bytes is None
    settings = celery_ext.install(make_app(celery_ext_max_message_bytes=1_000_000))
    assert settings.max_message_bytes == 1_000_000


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Settings.from_app(make_app(celery_ext_nope=1))


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.lane_max_queued = 3  # type: ignore[misc]
