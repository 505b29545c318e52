"""Failover URLs keep celery_ext's transport: kombu's ``Connection.switch`` would not.

A broker URL with alternates (``redis://a;redis://b``, or Sentinel's list of
sentinels, ``sentinel://s1;sentinel://s2``) makes kombu switch to the next URL
when a connection fails. ``Connection.switch`` re-parses that URL and sets the
transport to its scheme, so after the first failover the worker ran on kombu's
stock transport: no atomic delivery, no lease ownership, no bounds; a worker
killed afterwards left its messages unacked for ``visibility_timeout``.
:class:`FailoverConnection` switches like kombu's and then keeps the transport
it was built with, when that is celery_ext's for the same scheme.

``install(app)`` makes Celery build its connections with it (``app.amqp.Connection``).

Example::

    conn = FailoverConnection("redis://a;redis://b", transport=transports_path)
    conn.switch("redis://b")
    conn.transport_cls   # still celery_ext's Redis transport
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import kombu
from kombu.connection import ConnectionPool, PooledConnection

__all__ = ["OURS", "FailoverConnection"]

#: celery_ext's transports by the URL scheme they serve.
OURS: dict[str, str] = {
    "redis": "celery_ext.transports.redis:RedisTransport",
    "rediss": "celery_ext.transports.redis:RedissTransport",
    "sentinel": "celery_ext.transports.redis:SentinelTransport",
    "amqp": "celery_ext.transports.amqp:AmqpTransport",
    "pyamqp": "celery_ext.transports.amqp:AmqpTransport",
    "amqps": "celery_ext.transports.amqp:AmqpsTransport",
}


class _KeepsTransport:
    """The switch of kombu's Connection, keeping celery_ext's transport."""

    def switch(self, conn_str: str) -> Any:
        transport: Any = getattr(self, "transport_cls", None)  # (kombu sets it untyped)
        result = super().switch(conn_str)  # type: ignore[misc]
        scheme = urlparse(conn_str).scheme if "://" in conn_str else None
        if transport in OURS.values() and (scheme is None or OURS.get(scheme) == transport):
            setattr(self, "transport_cls", transport)  # noqa: B010 (kombu's attribute, untyped)
        return result


class FailoverConnection(_KeepsTransport, kombu.Connection):  # type: ignore[misc]
    """kombu's Connection whose failover keeps celery_ext's transport (see the module);
    so do the connections of its pool (Celery's producers).

    Example::

        app.amqp.Connection = FailoverConnection   # what install(app) arranges
    """

    def Pool(self, limit: int | None = None, **kwargs: Any) -> Any:
        return _Pool(self, limit=limit, **kwargs)


class _PooledConnection(_KeepsTransport, PooledConnection):  # type: ignore[misc]
    """kombu's PooledConnection, keeping celery_ext's transport on failover."""


class _Pool(ConnectionPool):  # type: ignore[misc]
    def new(self) -> Any:
        connection = super().new()
        # The same object and settings as kombu's, with the switch above (kombu
        # builds it from the parent's private settings, so it is not rebuilt here).
        connection.__class__ = _PooledConnection
        return connection
