"""The Redis transport ``install(app)`` selects for ``redis://`` and ``rediss://``.

kombu's Redis transport with producer-side bounds (see :mod:`celery_ext.bounds`),
far-future ETAs parked at publish (:mod:`celery_ext.delays`) and deliveries a crash
cannot drop (:mod:`celery_ext.redis_delivery`). A module of its own so that apps on
``local://`` or ``amqp://`` import neither kombu's Redis transport nor ``redis``
(``pip install celery_ext[redis]`` brings both).

Example::

    Celery(broker="redis://", broker_transport="celery_ext.redis_transport:RedisTransport")
"""

from __future__ import annotations

import logging
import ssl
from functools import cached_property
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from . import _compat
from .bounds import (
    BOUNDS_OPTION,
    LIMIT_KW,
    OPTION,
    Bounds,
    _Collecting,
    _offer,
    _Pending,
    check_limit,
)
from .delays import RedisParking, redis_horizon
from .errors import QueueFull
from .redis_delivery import AtomicDelivery
from .sizes import SizeLimited

__all__ = ["RedisChannel", "RedisTransport", "RedissTransport"]

logger = logging.getLogger(__name__)

# KEYS: every priority list of one queue. ARGV[1] bound (0: none), ARGV[2] expiry in
# ms (0: none), then (index into KEYS, payload) pairs. Pushes, in order, as many as
# fit; returns {pushed, depth before}.
_PUSH = """
local limit = tonumber(ARGV[1])
local count = (#ARGV - 2) / 2
local depth = 0
local n = count
if limit > 0 then
  for i = 1, #KEYS do depth = depth + redis.call('LLEN', KEYS[i]) end
  n = math.max(0, math.min(limit - depth, count))
end
for i = 1, n do
  redis.call('LPUSH', KEYS[tonumber(ARGV[1 + 2 * i])], ARGV[2 + 2 * i])
end
if n > 0 and tonumber(ARGV[2]) > 0 then
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return {n, depth}
"""


class RedisChannel(_Collecting, SizeLimited, AtomicDelivery, _compat.RedisChannel):
    """kombu's Redis channel with bounded, atomic pushes (see the module docstring)
    and deliveries a crash cannot drop (:mod:`celery_ext.redis_delivery`)."""

    def celery_ext_keep_unrecorded(self, item: tuple[Any, str, str]) -> None:
        if self.bounds is not None:
            self.bounds.keep_unrecorded(item)

    def celery_ext_take_unrecorded(self) -> list[tuple[Any, str, str]]:
        return self.bounds.take_unrecorded() if self.bounds is not None else []

    def celery_ext_dead_letter_raw(self, raw: bytes, queue: str, reason: str, detail: str) -> bool:
        if self.bounds is None:
            return False
        from .intake import dead_letter_raw

        return dead_letter_raw(self.bounds.app, raw, queue, reason, detail)

    @cached_property
    def bounds(self) -> Bounds | None:
        bounds = self.connection.client.transport_options.get(BOUNDS_OPTION)
        return bounds if isinstance(bounds, Bounds) else None

    @cached_property
    def _push_script(self) -> Any:
        import redis  # kombu's Redis transport needs it anyway

        # A plain client: kombu's prefixing client would prefix only the first key
        # of an EVALSHA, so global_keyprefix is applied to every key here.
        return redis.Redis(connection_pool=self.pool).register_script(_PUSH)

    def basic_publish(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> Any:
        call = message["properties"].pop(OPTION, None)
        if call is not None:
            kwargs[LIMIT_KW] = check_limit(call, f"apply_async({OPTION})")
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    @cached_property
    def _parking(self) -> RedisParking:
        return RedisParking(self)

    def _park_at_publish(self, queue: str, message: Any) -> bool:
        """Park a far-future ETA message instead of pushing it (see backpressure)."""
        bounds = self.bounds
        if bounds is None:
            return False
        horizon = redis_horizon(bounds.eta_horizon_s, float(self.visibility_timeout))
        delay = bounds.park_delay(message.get("headers"), horizon)
        if delay is None:
            return False
        bounds.parking(message.setdefault("headers", {}))
        self._parking.park(queue, message, delay)
        return True

    def storage_put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if self._park_at_publish(queue, message):
            return None
        call = kwargs.pop(LIMIT_KW, None)
        bounds = self.bounds
        limit = bounds.limit(queue, message["headers"].get("task"), call) if bounds else None
        collector = self._collector
        if bounds is None or (limit is None and collector is None):
            return super().storage_put(queue, message, **kwargs)
        # Bounded (or collected) messages skip kombu's Producer.batch pipeline: the
        # bound is checked when they are pushed, so they are pushed now (or at flush).
        priority = _compat.redis_message_priority(self, message)
        key = _compat.redis_list_key(self, queue, priority)
        item = _Pending(queue, limit, message["headers"].get("id"), (key, dumps(message)))
        if collector is not None:
            collector.append(item)
            return None
        _, refusal = self._flush_run([item])
        if refusal is not None:
            raise refusal
        return None

    def _flush_run(self, run: list[_Pending]) -> tuple[list[_Pending], QueueFull | None]:
        queue, limit = run[0].queue, run[0].limit
        prefix = self.global_keyprefix or ""
        lists = list(
            dict.fromkeys(_compat.redis_list_key(self, queue, p) for p in self.priority_steps)
        )
        index = {name: i for i, name in enumerate(lists, 1)}
        expires = self.queue_expires_ms(queue)
        keys = [prefix + name for name in lists]

        def attempt(items: list[_Pending]) -> tuple[list[_Pending], list[_Pending], int]:
            args: list[Any] = [limit or 0, expires]
            for item in items:
                args += (index[item.payload[0]], item.payload[1])
            pushed, depth = self._push_script(keys=keys, args=args)
            return items[:pushed], items[pushed:], int(depth) + int(pushed)

        bounds = self.bounds
        if limit is None or bounds is None:  # collected, unbounded: one push
            return attempt(run)[0], None
        return _offer(bounds, queue, limit, run, attempt)


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with producer-side bounds (``redis://`` after ``install``).

    Example::

        Celery(broker="redis://", broker_transport="celery_ext.redis_transport:RedisTransport")
    """

    Channel = RedisChannel


class RedissTransport(RedisTransport):
    """:class:`RedisTransport` for ``rediss://`` URLs, with kombu's TLS default.

    kombu applies its ``rediss`` default (TLS without certificate checks, with a
    warning) only when the transport comes from the URL; this does the same.

    Example::

        Celery(broker="rediss://host", broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED})
    """

    def __init__(self, client: Any, **kwargs: Any) -> None:
        if not client.ssl:
            logger.warning(
                "Secure redis scheme specified (rediss) with no ssl options, "
                "defaulting to insecure SSL behaviour."
            )
            client.ssl = {"ssl_cert_reqs": ssl.CERT_NONE}
        super().__init__(client, **kwargs)
