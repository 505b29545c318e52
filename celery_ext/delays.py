"""Parking delayed messages on the broker: the headers and the timing.

A worker that receives a message due far in the future should not hold it (in
RAM, unacked, counted against its prefetch window) until it is due: it parks
the message on the broker, acks it, and a mover puts it back on its original
queue when it is due, with its body, headers, id and routing untouched.
Parking happens before the ack, so a crash between the two gives a duplicate
(at-least-once), never a loss.

The parking stores live with their broker's transport:
:class:`~celery_ext.transports.redis.RedisParking` (a sorted set per list, scored
on the server's clock, moved by a Lua script) and
:class:`~celery_ext.transports.amqp.AmqpParking` (kombu's native delayed delivery
topology under our own prefix); the local lane parks on its own heap. This
module has what they share: the headers a parked message carries, and when a
delay is long enough to park.

Users: the worker's bounded prefetch (:mod:`celery_ext.backpressure`), which also
runs the movers, producers with ``park_on_publish`` and retry waits.

Example::

    eta_delay("2030-01-01T00:00:00+00:00") > 0   # True
    came_back(message.headers)                   # a mover put it back when due
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery.utils.time import maybe_make_aware

__all__ = [
    "PARKED_HEADER",
    "RETRY_HEADER",
    "came_back",
    "eta_delay",
    "mark_parked",
    "redis_horizon",
]

#: Message header of a celery_ext retry (attempt history); producers park its delay.
RETRY_HEADER = "celery_ext_retry"

#: Message header set when a message is parked: the ETA it was parked until. A
#: worker receiving it with that same ETA knows it comes back from parking (a
#: retry of it carries the header on with another ETA).
PARKED_HEADER = "celery_ext_parked"


def mark_parked(headers: dict[str, Any]) -> None:
    """Set :data:`PARKED_HEADER` on a message about to be parked (its ETA).

    Example::

        mark_parked(message.headers)   # then park it
    """
    headers[PARKED_HEADER] = headers.get("eta")


def came_back(headers: Mapping[str, Any] | None) -> bool:
    """Whether a received message was parked until its ETA (see :data:`PARKED_HEADER`).

    Example::

        came_back(message.headers)   # True for a message a mover put back when due
    """
    if not headers:
        return False
    eta = headers.get("eta")
    return eta is not None and headers.get(PARKED_HEADER) == eta


def eta_delay(eta: str, tz: Any = None, now: float | None = None) -> float:
    """Seconds from ``now`` until the ISO-8601 ``eta`` header of a task message.

    Example::

        eta_delay("2030-01-01T00:00:00+00:00") > 0   # True
    """
    due: datetime = maybe_make_aware(datetime.fromisoformat(eta), tz)
    return due.timestamp() - (time.time() if now is None else now)


def redis_horizon(horizon_s: float, visibility_timeout_s: float) -> float:
    """The parking horizon on Redis: below ``visibility_timeout`` by a margin.

    A message held longer than the visibility timeout is redelivered (kombu #337),
    so anything due later than this is parked instead.

    Example::

        redis_horizon(300, 3600)   # 300.0
        redis_horizon(300, 60)     # 54.0
    """
    return min(horizon_s, visibility_timeout_s - max(1.0, 0.1 * visibility_timeout_s))
