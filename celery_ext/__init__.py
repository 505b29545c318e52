"""celery_ext: make stock Celery workers safe under load.

One entry point, :func:`install`; nothing happens on import.

Example::

    from celery import Celery
    import celery_ext

    app = Celery("shop", broker="local://")      # or redis://, amqp://
    celery_ext.install(app, lane_max_queued=1000)
"""

from __future__ import annotations

import typing

import click
import kombu.transport

from . import _settings, backpressure, bounds, local
from ._settings import Settings, settings_of
from .bounds import enqueue_many
from .errors import CeleryExtError, ConfigurationError, LaneNotInstalled, QueueFull
from .local import DrainReport, LocalWorker
from .observability import start_flower

if typing.TYPE_CHECKING:
    from typing import Any

    from celery import Celery

__all__ = [
    "CeleryExtError",
    "ConfigurationError",
    "DrainReport",
    "LaneNotInstalled",
    "LocalWorker",
    "QueueFull",
    "Settings",
    "__version__",
    "enqueue_many",
    "install",
    "settings_of",
    "start_flower",
]

__version__ = "0.1.0"

_STOCK_AMQP = "celery.app.amqp:AMQP"


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
    # kombu resolves URL schemes through this registry; 'local' names our transport.
    kombu.transport.TRANSPORT_ALIASES.setdefault("local", "celery_ext.local:Transport")
    options = dict(app.conf.broker_transport_options or {})
    options[local.LANES_OPTION] = local.Lanes(settings)
    app.conf.broker_transport_options = options
    app.steps["worker"].add(local.LaneGuard)
    app.steps["consumer"].add(backpressure.Backpressure)
    app.user_options["worker"].add(
        click.Option(
            ["--prefetch-limit"],
            type=click.IntRange(min=1),
            default=None,
            help="celery_ext: most messages this worker holds at once (ready + ETA).",
        )
    )
    if app.amqp_cls == _STOCK_AMQP and "amqp" not in app.__dict__:
        app.amqp_cls = "celery_ext.local:LaneAMQP"  # a faster publish path on local://
    bounds.setup(app, settings)
    _settings.remember(app, settings)
    return settings
