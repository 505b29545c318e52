"""kombu transports, one module per broker, and which one an app's URL gets.

``install(app)`` selects celery_ext's transports for ``redis://``, ``rediss://``,
``sentinel://``, ``amqp://``, ``pyamqp://`` and ``amqps://`` brokers (one URL, or
failover URLs of one scheme) when ``broker_transport`` is unset (:func:`setup`);
``local://`` is registered as a kombu alias. Each transport publishes exactly as
kombu's when no bound applies. :func:`guarantees` says which guarantees hold on
an app's broker setup (``inspect stats``, ``celery ext status``).

- :mod:`celery_ext.transports.redis`: bounds, parking, atomic delivery;
- :mod:`celery_ext.transports.amqp`: bounds, parking, pipelined confirms;
- :mod:`celery_ext.transports.local`: the local lane (:mod:`celery_ext.lane`).

Example::

    setup(app, settings_of(app))
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

import kombu.connection
from celery import Celery

from .._settings import PREFIX, Settings, settings_of
from ..bounds import BOUNDS_OPTION, Bounds
from ..errors import ConfigurationError
from ..lane import is_local
from .failover import OURS, FailoverConnection

__all__ = ["check", "guarantees", "setup"]

logger = logging.getLogger(__name__)


_TRANSPORTS = OURS
_SHOWN_AS = {
    "celery_ext.transports.redis:SentinelTransport": "sentinel",
    "celery_ext.transports.redis:RedisTransport": "redis",
    "celery_ext.transports.redis:RedissTransport": "rediss",
    "celery_ext.transports.amqp:AmqpTransport": "amqp",
    "celery_ext.transports.amqp:AmqpsTransport": "amqps",
}


def _transport_for(app: Celery) -> str | None:
    """The bounded transport for ``app``'s broker URLs, or None to stay stock."""
    conf = app.conf
    if conf.broker_transport:
        return None
    return _TRANSPORTS.get(_scheme_of(app) or "")


def _scheme_of(app: Celery) -> str | None:
    """The one scheme of ``app``'s broker URLs (failover lists included), or None."""
    conf = app.conf
    urls = [u for u in (conf.broker_url, conf.broker_read_url, conf.broker_write_url) if u]
    schemes = set()
    for url in urls or ["amqp://"]:  # Celery's default broker
        if not isinstance(url, str):
            return None
        for part in url.split(";"):  # failover URLs, or Sentinel's list of sentinels
            if "://" not in part:
                return None
            schemes.add(urlparse(part.strip()).scheme)
    return schemes.pop() if len(schemes) == 1 else None


def check(app: Celery, settings: Settings) -> None:
    """Refuse, naming the reason, a broker setup that cannot give what was asked for.

    Called by ``install(app)`` before anything is changed. ``sentinel://`` needs
    ``broker_transport_options["master_name"]``; ``replica_acks`` needs a Redis
    broker on celery_ext's transports; ``queue_limits`` a broker they bound.

    Example::

        check(app, settings_of(app))   # raises ConfigurationError, or returns
    """
    transport = _transport_for(app)
    options = app.conf.broker_transport_options or {}
    if transport == _TRANSPORTS["sentinel"] and not options.get("master_name"):
        raise ConfigurationError(
            "broker sentinel:// needs broker_transport_options={'master_name': ...}: "
            "the name the sentinels monitor the primary under"
        )
    redis_family = transport in {_TRANSPORTS[s] for s in ("redis", "rediss", "sentinel")}
    if settings.replica_acks and not redis_family:
        raise ConfigurationError(
            f"{PREFIX}replica_acks={settings.replica_acks}: waits for Redis replicas, so it "
            "needs a redis://, rediss:// or sentinel:// broker with broker_transport unset "
            f"(broker: {app.conf.broker_url!r}). RabbitMQ: use quorum queues "
            "(task_default_queue_type='quorum'), whose publisher confirms come from a "
            "majority of nodes"
        )
    if settings.queue_limits and transport is None and not is_local(app):
        raise ConfigurationError(
            f"{PREFIX}queue_limits cannot be enforced on broker {app.conf.broker_url!r}: "
            "celery_ext bounds redis://, rediss://, sentinel://, amqp:// and amqps:// "
            "brokers with broker_transport unset, and the local lane"
        )


def guarantees(app: Celery) -> dict[str, Any]:
    """What holds on ``app``'s broker setup, in a few words (``inspect stats`` row
    ``celery_ext.broker``; the README's table says it at length).

    Example::

        guarantees(app)
        # {"transport": "sentinel", "bounds": "exact", "replica_acks": 1,
        #  "publish": "primary + 1 replica(s)", "deliveries": "atomic, leased", ...}
    """
    if is_local(app):
        return {"transport": "local", "bounds": "exact", "publish": "this process only"}
    chosen = app.conf.broker_transport  # set by setup() when it chose one of ours
    transport = chosen if chosen in _SHOWN_AS else _transport_for(app)
    if transport is None:
        return {"transport": "stock", "bounds": "none", "publish": "stock", "deliveries": "stock"}
    shown = _SHOWN_AS[transport]
    out: dict[str, Any] = {"transport": shown, "bounds": "exact"}
    if shown in ("redis", "rediss", "sentinel"):
        wanted = settings_of(app).replica_acks
        out["replica_acks"] = wanted
        out["publish"] = f"primary + {wanted} replica(s)" if wanted else "primary only"
        out["deliveries"] = "atomic, leased"
        out["parked"] = "sorted sets"
    else:
        from .amqp import queue_type_of

        kind = queue_type_of(app)
        out["queue_type"] = kind
        if kind == "quorum":
            out["bounds"] = "exact per producer"
        out["publish"] = "confirmed (majority)" if kind == "quorum" else "confirmed"
        out["deliveries"] = "acks_late"
        out["parked"] = f"{kind} delay queues"
    return out


def setup(app: Celery, settings: Settings) -> None:
    """Wire producer-side queue bounds into ``app`` (called by ``celery_ext.install``).

    Hands a :class:`Bounds` to the transports through ``broker_transport_options``
    and, for Redis and RabbitMQ URLs with no ``broker_transport`` set, selects
    the bounded transports (pass-through when no bound applies). With
    ``queue_limits`` on RabbitMQ it turns on publisher confirms.

    Example::

        setup(app, settings_of(app))
    """
    options = dict(app.conf.broker_transport_options or {})
    options[BOUNDS_OPTION] = Bounds(app, settings)
    transport = _transport_for(app)
    if transport is not None:
        # Connection.as_uri() (worker banner, Flower) shows the scheme, not our class path.
        kombu.connection.resolve_aliases.setdefault(transport, _SHOWN_AS[transport])
        app.conf.broker_transport = transport
        if app.amqp_cls != "celery_ext.transports.local:LaneAMQP":
            # A custom AMQP class (LaneAMQP has it already): failover keeps our transport.
            app.amqp.Connection = FailoverConnection
        if transport.startswith("celery_ext.transports.amqp:Amqp") and settings.queue_limits:
            if options.get("confirm_publish") is False:
                raise ConfigurationError(
                    f"{PREFIX}queue_limits on RabbitMQ needs publisher confirms: "
                    "remove broker_transport_options['confirm_publish']=False"
                )
            options["confirm_publish"] = True
    app.conf.broker_transport_options = options
