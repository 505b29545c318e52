"""celery_ext settings: one frozen dataclass read once from ``app.conf``.

Every key lives under the ``celery_ext_`` prefix in ``app.conf`` (or is passed
without the prefix to ``install(app, **overrides)``, which wins). Durations
accept seconds (int/float) or :class:`datetime.timedelta` and are stored as
float seconds. A misspelt key raises :class:`ConfigurationError` naming the
closest valid key; a wrong type or range names key, value and expectation.

Example::

    app.conf.celery_ext_lane_max_queued = 500
    settings = Settings.from_app(app, {"lane_full_policy": "raise"})
    settings.lane_max_queued   # 500
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal

from celery import Celery

from .errors import ConfigurationError

__all__ = ["PREFIX", "Settings", "settings_of"]

PREFIX = "celery_ext_"

FullPolicy = Literal["block", "raise"]
QueuePolicy = Literal["block", "raise", "shed"]
_POLICIES: tuple[str, ...] = ("block", "raise")


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected an integer >= 1")
    return value


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected True or False")
    return value


def _duration(key: str, value: object) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(
            f"{PREFIX}{key}={value!r}: expected seconds (int or float) or a timedelta"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected a finite duration >= 0")
    return seconds


def _policy(key: str, value: object) -> str:
    if value not in _POLICIES:
        raise ConfigurationError(
            f"{PREFIX}{key}={value!r}: expected one of {', '.join(map(repr, _POLICIES))}"
        )
    return str(value)


def _queue_policy(key: str, value: object) -> str:
    if value not in _QUEUE_POLICIES:
        raise ConfigurationError(
            f"{PREFIX}{key}={value!r}: expected one of {', '.join(map(repr, _QUEUE_POLICIES))}"
        )
    return str(value)


def _queue_limits(key: str, value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected a mapping queue name -> int")
    limits: dict[str, int] = {}
    for queue, limit in value.items():
        if not isinstance(queue, str):
            raise ConfigurationError(f"{PREFIX}{key}={value!r}: queue names must be strings")
        limits[queue] = _positive_int(f"{key}[{queue!r}]", limit)
    return limits


_QUEUE_POLICIES: tuple[str, ...] = ("block", "raise", "shed")

_CHECKS = {
    "lane_max_queued": _positive_int,
    "lane_full_policy": _policy,
    "lane_block_timeout": _duration,
    "drain_timeout": _duration,
    "prefetch_limit": _positive_int,
    "eta_buffer": _positive_int,
    "eta_horizon": _duration,
    "park_interval": _duration,
    "park_on_publish": _bool,
    "queue_limits": _queue_limits,
    "queue_full_policy": _queue_policy,
    "queue_block_timeout": _duration,
}


@dataclass(frozen=True)
class Settings:
    """Validated celery_ext settings for one app.

    Attributes (``app.conf`` key = ``celery_ext_`` + name):

    - ``lane_max_queued``: messages one local-lane queue holds before it is full.
    - ``lane_full_policy``: ``"block"`` (wait up to ``lane_block_timeout``, then
      raise) or ``"raise"`` (:class:`~celery_ext.errors.QueueFull` at once).
    - ``lane_block_timeout``: seconds a blocked publish waits for room.
    - ``drain_timeout``: seconds an embedded worker's ``stop()`` waits for queued
      and running work before giving up and reporting what was dropped.
    - ``prefetch_limit``: messages one worker holds at once (ready, reserved and
      ETA-waiting); the broker QoS never exceeds it (nor 65,535).
    - ``eta_buffer``: slots of ``prefetch_limit`` for ETA/countdown tasks due
      soon; the rest stay free for ready work.
    - ``eta_horizon``: seconds; an ETA further away is parked on the broker.
    - ``park_interval``: seconds between two runs of a worker's parking mover.
    - ``park_on_publish``: a producer parks an ETA beyond the horizon itself
      (Redis, local lane) instead of queueing it for a worker to park.
    - ``queue_limits``: ``{queue: max messages}`` enforced when publishing.
    - ``queue_full_policy``: ``"block"``, ``"raise"`` or ``"shed"`` at that bound.
    - ``queue_block_timeout``: seconds a blocked publish waits for room.

    Example::

        Settings.from_app(app, {"lane_max_queued": 100}).lane_max_queued  # 100
    """

    lane_max_queued: int = 10_000
    lane_full_policy: FullPolicy = "block"
    lane_block_timeout: float = 1.0
    drain_timeout: float = 30.0
    prefetch_limit: int = 1000
    eta_buffer: int = 100
    eta_horizon: float = 300.0
    park_interval: float = 0.5
    park_on_publish: bool = True
    queue_limits: Mapping[str, int] = field(default_factory=dict)
    queue_full_policy: QueuePolicy = "raise"
    queue_block_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.eta_buffer >= self.prefetch_limit:
            raise ConfigurationError(
                f"{PREFIX}eta_buffer={self.eta_buffer!r} must be smaller than "
                f"{PREFIX}prefetch_limit={self.prefetch_limit!r}: ready work needs slots too"
            )

    @classmethod
    def names(cls) -> list[str]:
        """The setting names, without prefix.

        Example::

            "drain_timeout" in Settings.names()  # True
        """
        return [f.name for f in fields(cls)]

    @classmethod
    def from_app(cls, app: Celery, overrides: Mapping[str, Any] | None = None) -> Settings:
        """Read, validate and freeze the settings of ``app`` (overrides win).

        Example::

            Settings.from_app(app, {"drain_timeout": timedelta(seconds=5)}).drain_timeout  # 5.0
        """
        raw: dict[str, Any] = {}
        for key in list(app.conf.keys()):
            if isinstance(key, str) and key.startswith(PREFIX):
                raw[key[len(PREFIX) :]] = app.conf[key]
        for key, value in (overrides or {}).items():
            raw[key[len(PREFIX) :] if key.startswith(PREFIX) else key] = value
        values: dict[str, Any] = {}
        for name, value in raw.items():
            check = _CHECKS.get(name)
            if check is None:
                raise ConfigurationError(_unknown(name))
            values[name] = check(name, value)
        return cls(**values)


def _unknown(name: str) -> str:
    names = Settings.names()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{PREFIX}{close[0]}'?" if close else ""
    return f"unknown setting '{PREFIX}{name}'{hint} (valid: {', '.join(names)})"


_MARK = "_celery_ext_settings"


def settings_of(app: Celery) -> Settings:
    """The settings ``celery_ext.install`` validated for ``app``.

    Example::

        celery_ext.settings_of(app).drain_timeout   # 30.0
    """
    settings = installed(app)
    if settings is None:
        raise ConfigurationError("celery_ext.install(app) has not been called for this app")
    return settings


def remember(app: Celery, settings: Settings) -> None:
    """Record ``settings`` as installed on ``app`` (used by ``install``)."""
    app.__dict__[_MARK] = settings


def installed(app: Celery) -> Settings | None:
    """The installed settings of ``app``, or None."""
    settings: Settings | None = app.__dict__.get(_MARK)
    return settings
