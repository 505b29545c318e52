"""Broker-side parking of delayed messages.

A worker that receives a message due far in the future should not hold it (in
RAM, unacked, counted against its prefetch window) until it is due: it parks
the message on the broker, acks it, and a mover puts it back on its original
queue when it is due, with its body, headers, id and routing untouched.

- **Redis** (:class:`RedisParking`): one sorted set per target list, scored by
  the due time on the *server's* clock (no skew between workers), plus a hash
  registering the sorted sets. Parking and moving are Lua scripts, so any
  number of workers may run the mover at once: each due message is moved by
  exactly one of them (``ZREM`` decides), never duplicated. Priorities and
  ``global_keyprefix`` are honoured the way kombu's Redis transport does.
- **RabbitMQ** (:class:`AmqpParking`): kombu's native delayed delivery
  topology (28 delay queues with queue-level TTLs of 2^n s, chained by
  dead-lettering through topic exchanges, the delay written in binary in the
  routing key) declared as *classic* queues under our own name prefix. Due
  messages land in one unbounded "due" queue, and workers move them to their
  queues with publisher confirms: RabbitMQ drops a dead-lettered message that a
  full queue (``x-max-length`` + ``reject-publish``) refuses, a mover retries
  it. No plugin.
- Delivery: parking happens before the ack, so a crash between the two gives a
  duplicate (at-least-once), never a loss.

Users: the worker's bounded prefetch (:mod:`celery_ext.backpressure`), which also
runs the movers, producers with ``park_on_publish`` and retry waits. The local
lane parks on its own heap.

Example::

    with app.connection_for_write() as conn:
        parking = RedisParking(conn.default_channel)
        parking.park("celery", message.serializable(), delay_s=3600)
        # amqp://: AmqpParking(conn.default_channel).park("celery", message, 3600)
        ...
        parking.move_due()        # run periodically by every worker
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import amqp
from amqp.exceptions import MessageNacked
from celery.utils.time import maybe_make_aware
from kombu.transport import native_delayed_delivery as _native
from kombu.utils.json import dumps

from . import _compat

__all__ = [
    "AMQP_MAX_DELAY_S",
    "PARKED_HEADER",
    "RETRY_HEADER",
    "AmqpParking",
    "RedisParking",
    "came_back",
    "eta_delay",
    "mark_parked",
    "parked_queue",
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


#: Hash (field: sorted-set key, value: target list key) of every parking sorted set.
REGISTRY = "celery_ext.parked"

# KEYS[1] registry; ARGV: zset key, target list key, delay in ms, member.
_PARK = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', ARGV[1], now_ms + tonumber(ARGV[3]), ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return now_ms + tonumber(ARGV[3])
"""

# KEYS[1] registry; ARGV: max messages to move. Returns the number moved.
_MOVE = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local budget = tonumber(ARGV[1])
local moved = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if budget <= 0 then break end
  local zkey, target = entries[i], entries[i + 1]
  local due = redis.call('ZRANGEBYSCORE', zkey, '-inf', now_ms, 'LIMIT', 0, budget)
  for _, member in ipairs(due) do
    redis.call('ZREM', zkey, member)
    redis.call('LPUSH', target, member)
  end
  moved = moved + #due
  budget = budget - #due
  if redis.call('ZCARD', zkey) == 0 then
    redis.call('HDEL', KEYS[1], zkey)
  end
end
return moved
"""


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


class RedisParking:
    """Parks raw kombu messages in Redis sorted sets until they are due.

    ``channel`` is a channel of kombu's Redis transport (``conn.default_channel``).

    Example::

        parking = RedisParking(conn.default_channel)
        parking.park("celery", raw, delay_s=60)
        parking.parked("celery")     # 1
    """

    def __init__(self, channel: Any) -> None:
        import redis  # the `redis` extra; kombu's Redis transport needs it anyway

        self.channel = channel
        # A plain client on kombu's pool: we apply global_keyprefix ourselves, to
        # every key, instead of kombu's per-command prefixing.
        self.client = redis.Redis(connection_pool=channel.pool)
        self._prefix: str = getattr(channel, "global_keyprefix", "") or ""
        self._registry = self._prefix + REGISTRY
        self._park = self.client.register_script(_PARK)
        self._move = self.client.register_script(_MOVE)

    def _keys(self, queue: str, raw: dict[str, Any]) -> tuple[str, str]:
        """(sorted-set key, target list key), both with the global prefix applied."""
        priority = _compat.redis_message_priority(self.channel, raw)
        target = self._prefix + _compat.redis_list_key(self.channel, queue, priority)
        return f"{self._registry}:{target}", target

    def park(self, queue: str, raw: dict[str, Any], delay_s: float) -> float:
        """Park ``raw`` (a kombu Redis payload) for ``queue``; return its due time (epoch s).

        Example::

            parking.park("celery", message.serializable(), delay_s=3600)
        """
        zkey, target = self._keys(queue, raw)
        member = dumps(raw)
        delay_ms = max(0, int(delay_s * 1000))
        due_ms = self._park(keys=[self._registry], args=[zkey, target, delay_ms, member])
        return int(due_ms) / 1000.0

    def move_due(self, limit: int = 1000) -> int:
        """Move up to ``limit`` due messages back to their queues; return how many.

        Example::

            parking.move_due()   # 0 when nothing is due
        """
        return int(self._move(keys=[self._registry], args=[limit]))

    def parked(self, queue: str) -> int:
        """Messages parked for ``queue`` (all priorities).

        Example::

            parking.parked("celery")
        """
        total = 0
        for priority in self.channel.priority_steps:
            target = self._prefix + _compat.redis_list_key(self.channel, queue, priority)
            total += int(self.client.zcard(f"{self._registry}:{target}"))
        return total


_BITS: int = _native.MAX_NUMBER_OF_BITS_TO_USE  # 28 delay levels, 2^0 .. 2^27 s

#: Longest delay :class:`AmqpParking` supports: 2^28 - 1 s (about 8.5 years).
AMQP_MAX_DELAY_S: int = 2**_BITS - 1
_BIT_PREFIX = 2 * _BITS  # "0.1.0. ... ." before the queue name


def parked_queue(routing_key: object) -> str | None:
    """The queue a message coming back from RabbitMQ's delay levels was parked for.

    Such a message keeps the delay-level routing key (28 bits, then the queue);
    None for any other routing key.

    Example::

        parked_queue("0." * 27 + "1.emails")   # 'emails'
    """
    if not isinstance(routing_key, str) or len(routing_key) <= _BIT_PREFIX:
        return None
    if routing_key[1] != "." or routing_key[_BIT_PREFIX - 1] != ".":
        return None  # the common case, any queue name: out before the full check
    head = routing_key[:_BIT_PREFIX]
    if head[1::2] != "." * _BITS or not set(head[0::2]) <= {"0", "1"}:
        return None
    return routing_key[_BIT_PREFIX:]


# Publishable properties: all but `expiration`, a per-queue TTL that would cut a
# delay short in the first delay queue (RabbitMQ drops it at the first hop anyway).
_PROPERTIES = frozenset(name for name, _ in amqp.Message.PROPERTIES) - {"expiration"}


def _is_dead_letter_header(name: str) -> bool:
    """RabbitMQ's dead-letter bookkeeping, which it adds on every hop."""
    return name == "x-death" or name.startswith(("x-first-death-", "x-last-death-"))


def _keys(queue: str, delay_s: int) -> tuple[str, str]:
    """(routing key of a message parked for ``queue``, binding key of ``queue``).

    The routing key is what kombu's ``calculate_routing_key`` builds (the delay's
    28 binary digits, then the queue), which refuses a delay of 0; the binding
    matches exactly 28 digits, so a queue named ``b`` never receives ``a.b``'s.
    """
    if not queue or {"*", "#"} & set(queue.split(".")):
        raise ValueError(f"cannot park for queue {queue!r}: a word '*' or '#' is a wildcard")
    if len(queue.encode()) > 255 - 2 * _BITS:  # AMQP keys are at most 255 bytes
        raise ValueError(f"cannot park for queue {queue!r}: over {255 - 2 * _BITS} bytes")
    return ".".join(f"{delay_s:0{_BITS}b}") + "." + queue, "*." * _BITS + queue


def _unpack(message: Any) -> tuple[Any, dict[str, Any]]:
    """Body and publishable properties of a message object or ``{body, properties, headers}``."""
    if isinstance(message, Mapping):
        body, headers = message["body"], message.get("headers")
        props = message.get("properties") or {}
    else:  # kombu's Message (with .headers) or py-amqp's (headers in .properties)
        body, props, headers = message.body, message.properties, getattr(message, "headers", None)
    if headers is None:
        headers = props.get("application_headers") or {}
    properties = {name: value for name, value in props.items() if name in _PROPERTIES}
    properties["application_headers"] = {
        name: value for name, value in headers.items() if not _is_dead_letter_header(name)
    }
    return body, properties


class _OneChannel:
    """All kombu's declare function asks of a Connection: ``channel()``, here ours.

    (A real Connection would open a channel for it and never close that.)
    """

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def channel(self) -> Any:
        return self._channel


class AmqpParking:
    """Parks messages in RabbitMQ delay queues (TTL + dead-lettering) until due.

    ``channel`` is a channel of kombu's py-amqp transport (``conn.default_channel``
    of an ``amqp://`` connection). Needs kombu >= 5.7 (named delay levels) and no
    RabbitMQ plugin.

    How: kombu's native delayed delivery topology, declared on first use as
    durable *classic* queues: queue ``{prefix}_celery_delayed_{n}`` (n = 0..27)
    keeps messages for ``x-message-ttl`` = 2^n s, then dead-letters them to level
    n-1's topic exchange, the last to ``{prefix}_celery_delayed_delivery``. A
    message is published to level 27 with the routing key ``<delay in 28 binary
    digits>.<queue>``, so it waits only in the levels whose bit is set. The
    delivery exchange routes everything to the due queue ``{prefix}_celery_due``
    (durable, unbounded), and :meth:`move_due` (every worker runs it every
    ``park_interval``) publishes each due message to ``<queue>`` with a publisher
    confirm before it acks it. A queue at its ``x-max-length`` with
    ``reject-publish`` refuses it (RabbitMQ would have dropped a dead-lettered
    message there silently): it is parked again for a second, never lost.

    - **No head-of-line blocking**: every message in a level queue has the same
      TTL, so they expire in order; a long delay never holds up a shorter one.
    - **Bounded**: 28 queues and 29 exchanges per ``prefix`` whatever the number
      of messages or target queues (hence no ``x-expires``); :meth:`delete`
      removes them. Give each test run or app its own ``prefix``; never ``""``,
      which is Celery's own (quorum) topology.
    - **Message**: body, headers (task id, ...), content type and encoding,
      priority, delivery mode and the other properties come back unchanged, but
      RabbitMQ adds ``x-death`` / ``x-first-death-*`` headers on the way and
      ``park`` strips them (else RabbitMQ drops a message parked a second time as
      a dead-letter cycle). ``park`` also drops the ``expiration`` property (a
      per-queue TTL; RabbitMQ would drop it at the first hop, after it had cut
      the delay short); Celery's ``expires`` header still applies.
      A moved message arrives with ``delivery_info`` exchange ``""`` and routing
      key ``queue``, as if published there (queue bounds do not apply to it).
    - **Precision**: delays are rounded *up* to whole seconds (the message is
      never early), then wait up to one mover interval in the due queue: 0-1 s
      after the time requested, plus ``park_interval``.
    - **Needs a mover**: due messages wait in the due queue until a worker with
      celery_ext (any of them, of any app with this ``prefix``) moves them.
    - **Max delay**: :data:`AMQP_MAX_DELAY_S` = 2^28 - 1 s (~8.5 years);
      queue names up to 199 bytes (the routing key adds 56).
    - **Target queue deleted**: messages falling due for it are unroutable and
      RabbitMQ drops them silently.
    - **Durability**: the delay queues are durable and each message keeps its
      delivery mode, so persistent messages survive a broker restart. Classic
      queues dead-letter at most once: a broker crash mid-hop can lose one.
      With ``confirm_publish`` on the connection, ``park`` returns only once the
      broker holds the message, so parking before the ack never loses it.
    - **Counts**: :meth:`parked` is approximate (see there).

    Example::

        parking = AmqpParking(conn.default_channel)
        parking.park("celery", message, delay_s=3600)   # then message.ack()
        parking.parked("celery")     # 1
        parking.move_due()           # an hour later (a worker does it)
    """

    def __init__(self, channel: Any, prefix: str = "celery_ext") -> None:
        if "prefix" not in inspect.signature(_native.level_name).parameters:
            raise RuntimeError("AmqpParking needs kombu >= 5.7 (prefixed delayed-delivery levels)")
        if not prefix:
            raise ValueError("prefix must not be empty: that is Celery's own quorum topology")
        self.channel = channel
        self.prefix = prefix
        #: The 28 delay queues, shortest TTL first (each has an exchange of the same name).
        self.delay_queues: list[str] = [_native.level_name(n, prefix) for n in range(_BITS)]
        self.delivery_exchange = f"{prefix}_{_native.CELERY_DELAYED_DELIVERY_EXCHANGE}"
        self.due_queue = f"{prefix}_celery_due"
        self._declared = False

    def _declare(self) -> None:
        if not self._declared:
            _native.declare_native_delayed_delivery_exchanges_and_queues(
                _OneChannel(self.channel), "classic", self.prefix
            )
            channel = self.channel
            channel.queue_declare(self.due_queue, durable=True, auto_delete=False)
            channel.queue_bind(self.due_queue, self.delivery_exchange, "#")
            self._declared = True

    def park(self, queue: str, message: Any, delay_s: float, confirm: bool = False) -> float:
        """Park ``message`` for ``queue``; return its due time (epoch s, whole seconds away).

        ``message`` is a kombu or py-amqp message (or ``{"body", "properties",
        "headers"}``). ``queue`` must exist: RabbitMQ answers 404 (``amqp.NotFound``)
        otherwise, closing the channel. Raises ``ValueError`` for a delay over
        :data:`AMQP_MAX_DELAY_S` or a queue name that cannot be routed to.

        Example::

            parking.park("celery", message, delay_s=3600)
        """
        delay = max(0, math.ceil(delay_s - 0.001))  # forgive float noise: ceil(1.0000001) is 1
        if delay > AMQP_MAX_DELAY_S:
            raise ValueError(f"delay_s={delay_s} is over the maximum of {AMQP_MAX_DELAY_S} s")
        routing_key, _ = _keys(queue, delay)
        body, properties = _unpack(message)
        self._declare()
        due = time.time() + delay
        # Enter at the highest set bit, not at level 27 as kombu does: the levels
        # above it would only pass the message on, and every hop costs the broker.
        entry = self.delay_queues[max(0, delay.bit_length() - 1)]
        self._publish(amqp.Message(body, **properties), entry, routing_key, confirm)
        return due

    def _publish(self, message: Any, exchange: str, routing_key: str, confirm: bool) -> None:
        if confirm:  # py-amqp's own: raises MessageNacked, no queue bound applies
            amqp.Channel.basic_publish_confirm(self.channel, message, exchange, routing_key)
        else:
            self.channel.basic_publish(message, exchange, routing_key)

    def bind(self, queue: str, again: bool = False) -> None:
        """Declare the delay topology (the due queue included), once.

        A worker declares it up front, outside its message callbacks: a
        synchronous AMQP call from inside a callback can deliver the next
        message re-entrantly. (Queues need no binding of their own: the mover
        publishes to them by name.)

        Example::

            parking.bind("celery")
        """
        _keys(queue, 0)  # the same check as park's
        if again:
            self._declared = False
        self._declare()

    def move_due(self, limit: int = 1000) -> int:
        """Publish due messages to their queues (confirmed), then ack them; how many moved.

        A queue that refuses one (full, with ``reject-publish``) gets it back a
        second later: it is parked again, then acked. Run it on a channel of its
        own (it waits for confirms); any number of movers may run at once, each
        message is taken by one. A message is acked only once it is queued or
        parked again: a crash in between gives a duplicate, never a loss.

        Example::

            parking.move_due()   # 3
        """
        self._declare()
        channel = self.channel
        moved = 0
        while moved < limit:
            message = channel.basic_get(self.due_queue, no_ack=False)
            if message is None:
                break
            routing_key = message.delivery_info.get("routing_key")
            queue = parked_queue(routing_key)
            if queue is not None:
                body, properties = _unpack(message)
                try:
                    self._publish(amqp.Message(body, **properties), "", queue, confirm=True)
                except MessageNacked:  # the queue is full: try again in a second
                    self.park(queue, message, 1.0, confirm=True)
            channel.basic_ack(message.delivery_tag)
            moved += 1
        return moved

    def parked(self, queue: str) -> int:
        """Messages waiting in this prefix's delay queues (passive declares).

        Approximate: the delay queues are shared, so this counts messages parked
        for *every* queue under this ``prefix`` (exact when only ``queue`` uses
        it), and misses one for the few ms it spends between two levels.

        Example::

            parking.parked("celery")
        """
        _keys(queue, 0)  # the same check as park's
        return self.parked_all()

    def parked_all(self) -> int:
        """Messages waiting in this prefix's delay queues, for any queue.

        Example::

            parking.parked_all()
        """
        self._declare()
        return sum(
            int(self.channel.queue_declare(name, passive=True).message_count)
            for name in self.delay_queues
        )

    def delete(self) -> None:
        """Delete this prefix's delay queues and exchanges, and every message parked there.

        Example::

            AmqpParking(conn.default_channel, prefix="test_1234").delete()
        """
        for name in self.delay_queues:
            self.channel.queue_delete(name)
            self.channel.exchange_delete(name)
        self.channel.queue_delete(self.due_queue)
        self.channel.exchange_delete(self.delivery_exchange)
        self._declared = False
