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
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal

from celery import Celery

from .errors import ConfigurationError

__all__ = ["PREFIX", "Settings", "seconds", "settings_of", "task_label"]

PREFIX = "celery_ext_"


def task_label(obj: Any) -> str:
    """How an error names a task: its name, or for a function not yet a task the name
    Celery will give it (``module.function``).

    Example::

        task_label(send)   # 'shop.send', with @app.task above or below the decorator
    """
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    module, function = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
    return f"{module}.{function}" if module and function else repr(obj)


FullPolicy = Literal["block", "raise", "shed"]
_POLICIES: tuple[str, ...] = ("block", "raise", "shed")


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected an integer >= 1")
    return value


def _count(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected an integer >= 0")
    return value


def _positive_duration(key: str, value: object) -> float:
    return seconds(f"{PREFIX}{key}", value, positive=True)


def _optional_positive_int(key: str, value: object) -> int | None:
    return None if value is None else _positive_int(key, value)


def _queue_name(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected a queue name")
    return value


def _optional_port(key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected a port 0..65535 or None")
    return value


def _address(key: str, value: object) -> str:
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        raise ConfigurationError(
            f"{PREFIX}{key}={value!r}: expected an IP address (127.0.0.1, 0.0.0.0, ::)"
        ) from None


def _optional_path(key: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected a file path or None")
    return value


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{PREFIX}{key}={value!r}: expected True or False")
    return value


def seconds(label: str, value: object, *, positive: bool = False, allow_inf: bool = False) -> float:
    """``value`` (int, float or ``timedelta``) as float seconds; the error names ``label``.

    The one check of every duration celery_ext takes: settings, task options, waits.

    Example::

        seconds("task 'shop.export': timeout", timedelta(minutes=1), positive=True)   # 60.0
    """
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{label}={value!r}: expected seconds (a number or a timedelta)")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ConfigurationError(f"{label}={value!r}: expected a finite number of seconds")
    if number <= 0 if positive else number < 0:
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"{label}={value!r}: expected seconds {bound}")
    return number


def _duration(key: str, value: object) -> float:
    return seconds(f"{PREFIX}{key}", value)


def _policy(key: str, value: object) -> str:
    if value not in _POLICIES:
        raise ConfigurationError(
            f"{PREFIX}{key}={value!r}: expected one of {', '.join(map(repr, _POLICIES))}"
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


_CHECKS = {
    "lane_max_queued": _positive_int,
    "lane_full_policy": _policy,
    "lane_block_timeout": _duration,
    "lane_concurrency": _positive_int,
    "drain_timeout": _duration,
    "prefetch_limit": _positive_int,
    "prefetch_bytes": _optional_positive_int,
    "eta_buffer": _optional_positive_int,
    "eta_horizon": _duration,
    "park_interval": _duration,
    "park_on_publish": _bool,
    "park_prefix": _queue_name,
    "queue_limits": _queue_limits,
    "queue_full_policy": _policy,
    "queue_block_timeout": _duration,
    "dead_letter_queue": _queue_name,
    "max_message_bytes": _optional_positive_int,
    "probe_port": _optional_port,
    "probe_address": _address,
    "probe_file": _optional_path,
    "probe_stale_after": _duration,
    "metrics_port": _optional_port,
    "metrics_address": _address,
    "leases": _bool,
    "lease_interval": _duration,
    "dead_worker_after": _duration,
    "replica_acks": _count,
    "replica_ack_timeout": _positive_duration,
}


@dataclass(frozen=True)
class Settings:
    """Validated celery_ext settings for one app.

    Attributes (``app.conf`` key = ``celery_ext_`` + name):

    - ``lane_max_queued``: messages one local-lane queue holds before it is full.
    - ``lane_full_policy``: ``"block"`` (wait up to ``lane_block_timeout``, then
      raise), ``"raise"`` (:class:`~celery_ext.errors.QueueFull` at once) or
      ``"shed"`` (drop and count) when a local-lane queue holds ``lane_max_queued``.
    - ``lane_block_timeout``: seconds a blocked publish waits for room.
    - ``lane_concurrency``: threads of the lane worker a ``celery worker`` starts
      for ``durable=False`` tasks (see :mod:`celery_ext.durability`).
    - ``drain_timeout``: seconds a warm shutdown waits for running tasks
      (``celery worker --drain-timeout``; see :mod:`celery_ext.shutdown`), and an
      embedded worker's ``stop()`` for queued and running work.
    - ``prefetch_limit``: messages one worker holds at once (ready, reserved and
      ETA-waiting); the broker QoS never exceeds it (nor 65,535).
    - ``prefetch_bytes``: optional cap on the body bytes of those messages
      (None: count only); a single message larger than it is still taken.
    - ``eta_buffer``: slots of ``prefetch_limit`` for ETA/countdown tasks due
      soon; the rest stay free for ready work. None (default): a tenth of the
      limit, at most 100.
    - ``eta_horizon``: seconds; an ETA further away is parked on the broker.
    - ``park_interval``: seconds between two runs of a worker's parking mover.
    - ``park_on_publish``: a producer parks an ETA beyond the horizon itself
      (Redis, local lane) instead of queueing it for a worker to park.
    - ``park_prefix``: RabbitMQ: names of the delay queues and exchanges parked
      messages wait in (``{prefix}_celery_delayed_{n}``); apps sharing them
      must agree on it.
    - ``queue_limits``: ``{queue: max messages}`` enforced when publishing.
    - ``queue_full_policy``: ``"block"``, ``"raise"`` or ``"shed"`` at that bound
      (on the local lane too, when it is tighter than ``lane_max_queued``).
    - ``queue_block_timeout``: seconds a blocked publish waits for room.
    - ``probe_port`` / ``probe_file``: readiness and liveness on
      ``probe_address``:port (0: any free port) or as a file (see :mod:`celery_ext.probes`).
    - ``probe_address`` / ``metrics_address``: the IP the probe / metrics server
      listens on: ``127.0.0.1`` (default), ``0.0.0.0`` or ``::`` for a pod's IP.
    - ``probe_stale_after``: seconds without an event-loop beat before liveness fails.
    - ``metrics_port``: serve Prometheus metrics on ``metrics_address``:port/metrics (0: any
      free port; see :mod:`celery_ext.metrics`).
    - ``leases``: on Redis, renew the lease of held messages while the worker
      lives and recover a dead worker's (see :mod:`celery_ext.leases`).
    - ``lease_interval``: seconds between two lease beats (at most a third of
      the transport's ``visibility_timeout`` is used).
    - ``dead_worker_after``: seconds without a beat after which a worker's held
      messages are restored for others; at least twice ``lease_interval``.
    - ``dead_letter_queue``: where tasks whose retries ran out are kept
      (on the app's broker; see :mod:`celery_ext.deadletter`), and the messages
      a worker could not run (see :mod:`celery_ext.intake`).
    - ``replica_acks``: Redis (``redis://``, ``rediss://``, ``sentinel://``): a
      publish returns only once this many replicas hold the message (``WAIT``),
      else raises :class:`~celery_ext.errors.NotReplicated`; 0 (default): as
      stock, the primary's acknowledgement only, which a failover can lose.
    - ``replica_ack_timeout``: seconds a publish waits for those replicas.
    - ``max_message_bytes``: optional cap on a task message's serialized body:
      a bigger publish raises :class:`~celery_ext.errors.MessageTooLarge`, a
      bigger received message is dead-lettered, not run (None: no cap, as stock).

    Example::

        Settings.from_app(app, {"lane_max_queued": 100}).lane_max_queued  # 100
    """

    lane_max_queued: int = 10_000
    lane_full_policy: FullPolicy = "block"
    lane_block_timeout: float = 1.0
    lane_concurrency: int = 4
    drain_timeout: float = 30.0
    prefetch_limit: int = 1000
    prefetch_bytes: int | None = None
    eta_buffer: int | None = None
    eta_horizon: float = 300.0
    park_interval: float = 0.5
    park_on_publish: bool = True
    park_prefix: str = "celery_ext"
    queue_limits: Mapping[str, int] = field(default_factory=dict)
    queue_full_policy: FullPolicy = "raise"
    queue_block_timeout: float = 1.0
    dead_letter_queue: str = "celery_ext.dead_letters"
    max_message_bytes: int | None = None
    probe_port: int | None = None
    probe_address: str = "127.0.0.1"
    probe_file: str | None = None
    probe_stale_after: float = 30.0
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    leases: bool = True
    lease_interval: float = 5.0
    dead_worker_after: float = 15.0
    replica_acks: int = 0
    replica_ack_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.lease_interval <= 0 or self.dead_worker_after < 2 * self.lease_interval:
            raise ConfigurationError(
                f"{PREFIX}dead_worker_after={self.dead_worker_after!r} must be at least twice "
                f"{PREFIX}lease_interval={self.lease_interval!r} (> 0): one late beat "
                "must not make a live worker look dead"
            )
        if self.eta_buffer is not None and self.eta_buffer >= self.prefetch_limit:
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
