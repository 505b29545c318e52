"""celery_ext: make stock Celery workers safe under load.

One entry point, :func:`install`; nothing happens on import.

Example::

    from celery import Celery
    import celery_ext

    app = Celery("shop", broker="local://")      # or redis://, amqp://
    celery_ext.install(app, lane_max_queued=1000)
"""

from __future__ import annotations

import ipaddress
import typing

import click
import kombu.transport

from . import (
    _compat,
    _settings,
    _tasks,
    _versions,
    backpressure,
    durability,
    intake,
    lane,
    leases,
    metrics,
    probes,
    shutdown,
    sizes,
    timeouts,
    transports,
)
from ._settings import Settings, settings_of
from .bulk import enqueue_many
from .deadletter import DeadLetters
from .embedded import DrainReport, LocalWorker
from .errors import (
    CeleryExtError,
    ConfigurationError,
    DrainInterrupted,
    HandedBack,
    LaneNotInstalled,
    MessageTooLarge,
    NotReplicated,
    PoolNotAllowed,
    PortInUse,
    QueueFull,
    RetryAfter,
    RetryScheduled,
    TaskTimeout,
)
from .metrics import stats_section
from .observability import start_flower
from .retry_policy import (
    RetryPolicy,
    RetryState,
    attempts,
    deadline,
    exponential,
    fixed,
    linear,
    retry,
)
from .timeouts import remaining, timeout

if typing.TYPE_CHECKING:
    from typing import Any

    from celery import Celery

__all__ = [
    "CeleryExtError",
    "ConfigurationError",
    "DeadLetters",
    "DrainInterrupted",
    "DrainReport",
    "HandedBack",
    "LaneNotInstalled",
    "LocalWorker",
    "MessageTooLarge",
    "NotReplicated",
    "PoolNotAllowed",
    "PortInUse",
    "QueueFull",
    "RetryAfter",
    "RetryPolicy",
    "RetryScheduled",
    "RetryState",
    "Settings",
    "TaskTimeout",
    "__version__",
    "attempts",
    "deadline",
    "enqueue_many",
    "exponential",
    "fixed",
    "install",
    "linear",
    "remaining",
    "retry",
    "settings_of",
    "start_flower",
    "stats_section",
    "timeout",
]

__version__ = "0.1.0"

_STOCK_AMQP = "celery.app.amqp:AMQP"


def _ip_address(ctx: Any, param: Any, value: str | None) -> str | None:
    """Click callback: ``--probe-address`` / ``--metrics-address`` must be an IP."""
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an IP address (127.0.0.1, 0.0.0.0, ::)"
        ) from None


#: ``celery worker`` options install() adds: flag, type, help.
_WORKER_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("--prefetch-limit", click.IntRange(min=1), "most messages this worker holds at once."),
    ("--prefetch-bytes", click.IntRange(min=1), "most message body bytes held at once."),
    ("--drain-timeout", click.FloatRange(min=0), "seconds a warm shutdown waits for tasks."),
    ("--probe-port", click.IntRange(0, 65535), "serve /ready and /live on PORT."),
    ("--probe-address", click.STRING, "the probes' IP (127.0.0.1; 0.0.0.0: all)."),
    ("--probe-file", click.STRING, "keep FILE while ready, refreshed at every loop beat."),
    ("--metrics-port", click.IntRange(0, 65535), "serve Prometheus /metrics on PORT."),
    ("--metrics-address", click.STRING, "the metrics' IP (127.0.0.1; 0.0.0.0: all)."),
)


def install(app: Celery, **overrides: Any) -> Settings:
    """Install celery_ext on ``app`` and return its validated settings.

    Reads ``celery_ext_*`` keys from ``app.conf`` (``overrides`` win, given
    without the prefix), registers the ``local://`` transport, the plugin's
    worker bootsteps and per-app lanes. Idempotent: a second call returns the
    same settings and adds nothing; a second call with different overrides
    raises :class:`ConfigurationError`. Call it after configuring ``app``.

    Example::

        app = Celery("shop", broker="local://")
        settings = celery_ext.install(app, lane_full_policy="raise")
        settings.lane_max_queued   # 10000
    """
    existing = _settings.installed(app)
    if existing is not None:
        if overrides and Settings.from_app(app, overrides) != existing:
            raise ConfigurationError(
                "celery_ext is already installed on this app with other settings; "
                "pass every override to the first install(app, ...)"
            )
        return existing
    settings = Settings.from_app(app, overrides)
    transports.check(app, settings)  # a broker setup that cannot hold: refused, unchanged
    _versions.warn_if_untested()
    # kombu resolves URL schemes through this registry; 'local' names our transport.
    kombu.transport.TRANSPORT_ALIASES.setdefault("local", "celery_ext.transports.local:Transport")
    options = dict(app.conf.broker_transport_options or {})
    options[lane.LANES_OPTION] = lane.Lanes(settings)
    app.conf.broker_transport_options = options
    app.steps["worker"].add(lane.LaneGuard)
    app.steps["worker"].add(timeouts.Timeouts)
    app.steps["worker"].add(durability.LaneWorker)
    _tasks.add_task_options(app)
    app.steps["consumer"].add(backpressure.Backpressure)
    app.steps["consumer"].add(shutdown.Drain)
    app.steps["consumer"].add(probes.Probes)
    app.steps["consumer"].add(leases.Leases)
    app.steps["consumer"].add(metrics.Section)
    app.steps["consumer"].add(intake.Intake)
    for flag, kind, help_text in _WORKER_OPTIONS:  # each reaches the steps as a keyword
        check = _ip_address if flag.endswith("-address") else None
        option = click.Option(
            [flag], type=kind, default=None, callback=check, help=f"celery_ext: {help_text}"
        )
        app.user_options["worker"].add(option)
    if app.amqp_cls == _STOCK_AMQP and not _compat.amqp_created(app):
        app.amqp_cls = "celery_ext.transports.local:LaneAMQP"  # a faster publish path on local://
    transports.setup(app, settings)
    sizes.setup(app, settings)  # after bounds chose the transports it checks on
    _settings.remember(app, settings)
    return settings
