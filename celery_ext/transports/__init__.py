"""kombu transports, one module per broker, and which one an app's URL gets.

``install(app)`` selects celery_ext's transports for single-URL ``redis://``,
``rediss://``, ``amqp://``, ``pyamqp://`` and ``amqps://`` brokers when
``broker_transport`` is unset (:func:`setup`); ``local://`` is registered as a
kombu alias. Each transport publishes exactly as kombu's when no bound applies.

- :mod:`celery_ext.transports.redis`: bounds, parking, atomic delivery;
- :mod:`celery_ext.transports.amqp`: bounds, parking, pipelined confirms;
- :mod:`celery_ext.transports.local`: the local lane (:mod:`celery_ext.lane`).

Example::

    setup(app, settings_of(app))
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

import kombu.connection
from celery import Celery

from .._settings import PREFIX, Settings
from ..bounds import BOUNDS_OPTION, Bounds
from ..errors import ConfigurationError
from ..lane import is_local

__all__ = ["setup"]

logger = logging.getLogger(__name__)


_TRANSPORTS = {
    "redis": "celery_ext.transports.redis:RedisTransport",
    "rediss": "celery_ext.transports.redis:RedissTransport",
    "amqp": "celery_ext.transports.amqp:AmqpTransport",
    "pyamqp": "celery_ext.transports.amqp:AmqpTransport",
    "amqps": "celery_ext.transports.amqp:AmqpsTransport",
}
_SHOWN_AS = {
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
    urls = [u for u in (conf.broker_url, conf.broker_read_url, conf.broker_write_url) if u]
    schemes = set()
    for url in urls or ["amqp://"]:  # Celery's default broker
        if not isinstance(url, str) or ";" in url or "://" not in url:
            return None
        schemes.add(urlparse(url).scheme)
    if len(schemes) != 1:
        return None
    return _TRANSPORTS.get(schemes.pop())


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
        if transport.startswith("celery_ext.transports.amqp:Amqp") and settings.queue_limits:
            if options.get("confirm_publish") is False:
                raise ConfigurationError(
                    f"{PREFIX}queue_limits on RabbitMQ needs publisher confirms: "
                    "remove broker_transport_options['confirm_publish']=False"
                )
            options["confirm_publish"] = True
    elif settings.queue_limits and not is_local(app):
        logger.warning(
            "celery_ext: %squeue_limits is not enforced for broker %r (only redis://, "
            "rediss://, amqp://, amqps:// single-URL brokers with broker_transport unset, "
            "and the local lane)",
            PREFIX,
            app.conf.broker_url,
        )
    app.conf.broker_transport_options = options
