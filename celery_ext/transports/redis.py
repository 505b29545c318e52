"""The Redis transport ``install(app)`` selects for ``redis://``, ``rediss://`` and ``sentinel://``.

kombu's Redis transport with producer-side bounds (:mod:`celery_ext.bounds`), the
parking store for delayed messages (:class:`RedisParking`, see
:mod:`celery_ext.delays`), far-future ETAs parked at publish, and deliveries a crash
cannot drop (below). Imported only when an app uses Redis, so apps on ``local://``
or ``amqp://`` import neither kombu's Redis transport nor ``redis``
(``pip install celery_ext[redis]`` brings both). The worker's leases on Redis are
:mod:`celery_ext.leases`.

**Redis deliveries that a crash or a lost connection cannot drop.**

kombu's Redis transport takes a message with ``BRPOP`` and only then, in a
second command, records it as unacked (the ``unacked`` hash and the
``unacked_index`` sorted set). A worker SIGKILLed between the two, or a broker
that goes away between them, loses the message: it is in no list, no hash and
no process. Chaos runs (``tests/chaos``) hit that window every few dozen kills.

:class:`AtomicDelivery`, mixed into celery_ext's Redis channel, closes it:

- **Pop and record in one script**: a Lua script pops the next message (same
  queue and priority order as kombu's ``BRPOP``) and records it as unacked,
  with the tag also added to the worker's lease set (:mod:`celery_ext.leases`)
  when there is one, atomically. kombu's own record is then skipped: one round
  trip per message instead of two.
- **Waiting without taking**: when every queue is empty the channel blocks in
  ``BLMOVE q q RIGHT RIGHT`` on its first queue, which returns as soon as a
  message arrives there and leaves it in place (moved from the tail to the
  tail); other queues and priorities are polled every ``IDLE_WAIT_S``.
- Consumers with ``no_ack`` (none of Celery's task consumers) keep kombu's
  ``BRPOP``.

**Items that are not kombu messages** (not JSON, or JSON without kombu's
envelope, e.g. ``redis-cli LPUSH celery 'x'``) killed a stock worker or were
lost in a reconnect. The pop script moves such an item to a holding list
(``<list>:celery_ext.unreadable``) in the same step, and the worker keeps it in
the dead-letter queue with its bytes and a reason before letting go of it; an
envelope kombu cannot read (:class:`CheckedMessage`) is dead-lettered the same
way, from its unacked record. A worker killed in between leaves it held: the
next one consuming that queue dead-letters it.

:class:`RecordingQoS` keeps a message whose record failed (the broker went away
mid-delivery) so the next channel pushes it back; and a late ack or a second
close on the channel of a collected connection raises a connection error
instead of kombu's AttributeError, which killed the worker ("Unrecoverable
error").

**Publishes a failover cannot lose** (``celery_ext_replica_acks = N``): Redis
replicates asynchronously, so a primary that dies can take the writes it
acknowledged last with it, and Sentinel promotes a replica that never saw them.
With ``replica_acks``, every publish (and a park at publish) is followed by
``WAIT N timeout`` on the same connection, in one round trip: the publish
returns only once N replicas hold the message, else it raises
:class:`~celery_ext.errors.NotReplicated`. The worker's own moves (delivery,
ack, restore, parking) need no wait: Redis replicates them in order, so a
replica holds a prefix of them, and each leaves the message somewhere
(at worst it runs again).

Example::

    celery_ext.install(app)   # redis:// now uses celery_ext.transports.redis:RedisTransport
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.json import dumps, loads

from .. import _compat
from ..bounds import (
    BOUNDS_OPTION,
    LIMIT_KW,
    OPTION,
    Bounds,
    Collecting,
    Pending,
    check_limit,
    offer,
)
from ..delays import redis_horizon
from ..errors import NotReplicated, QueueFull
from ..sizes import SizeLimited

__all__ = [
    "IDLE_WAIT_S",
    "AtomicDelivery",
    "RecordingQoS",
    "RedisChannel",
    "RedisParking",
    "RedisTransport",
    "RedissTransport",
    "SentinelChannel",
    "SentinelTransport",
    "replicated",
]

logger = logging.getLogger(__name__)

#: Longest wait before an idle channel looks at its other queues and priorities again.
IDLE_WAIT_S = 0.1

#: Suffix of the list (one per queue list) holding items that are not kombu
#: messages until the worker has dead-lettered them.
UNREADABLE_SUFFIX = ":celery_ext.unreadable"

# KEYS: unacked hash, unacked index, lease set ('' for none), then the lists in
# kombu's BRPOP order. ARGV[1]: now (s), ARGV[2]: UNREADABLE_SUFFIX. Returns
# {list, message, delivery tag}, {list, item} for an item held as unreadable
# (no kombu envelope), or nil.
# The record is '[' .. message .. ',' .. exchange .. ',' .. routing key .. ']',
# the message bytes untouched (cjson would round large numbers).
_POP = """
local props = nil
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, m = pcall(cjson.decode, item)
    local tag, ex, rk = nil, '', ''
    if ok and type(m) == 'table' and type(m['properties']) == 'table' then
      props = m['properties']
      tag = props['delivery_tag']
      local info = props['delivery_info']
      if type(info) == 'table' then
        ex, rk = info['exchange'] or '', info['routing_key'] or ''
      end
    end
    if type(tag) ~= 'string' then
      redis.call('LPUSH', KEYS[i] .. ARGV[2], item)
      return {KEYS[i], item}
    end
    redis.call('HSET', KEYS[1], tag,
      '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    if KEYS[3] ~= '' then redis.call('SADD', KEYS[3], tag) end
    return {KEYS[i], item, tag}
  end
end
return nil
"""


class UnreadableMessage(Exception):
    """A list item kombu cannot make a message of (raised while building it)."""


class CheckedMessage(kombu_virtual.Message):  # type: ignore[misc]
    """kombu's message, raising :class:`UnreadableMessage` for a malformed envelope.

    Building a message does no I/O, so anything it raises is the payload's fault
    (kombu's KeyError would otherwise count as a lost connection).
    """

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except Exception as exc:
            raise UnreadableMessage(f"not a kombu message: {type(exc).__name__}: {exc}") from exc


class RecordingQoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's Redis ack emulation: skips a record the pop made, keeps what a failure drops.

    Example::

        class Channel(kombu_redis.Channel):
            QoS = RecordingQoS
    """

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        if channel._celery_ext_recorded == delivery_tag:  # the pop script did it
            kombu_virtual.QoS.append(self, message, delivery_tag)
            return
        info = message.delivery_info
        owned = getattr(channel, "celery_ext_owned_key", None)
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(
                    self.unacked_key,
                    delivery_tag,
                    dumps([_compat.message_raw(message), info["exchange"], info["routing_key"]]),
                )
                if owned is not None:
                    pipe.sadd(owned, delivery_tag)
                pipe.execute()
        except Exception:
            keep = getattr(channel, "celery_ext_keep_unrecorded", None)
            if keep is not None:
                keep((_compat.message_raw(message), info["exchange"], info["routing_key"]))
            raise
        kombu_virtual.QoS.append(self, message, delivery_tag)


class AtomicDelivery:
    """Channel mixin for kombu's Redis channel; see the module docstring.

    The host class provides ``celery_ext_keep_unrecorded(item)`` and
    ``celery_ext_take_unrecorded()`` (celery_ext's keeps them on the app's bounds).

    Example::

        class RedisChannel(AtomicDelivery, _compat.RedisChannel):
            ...
    """

    QoS = RecordingQoS
    Message = CheckedMessage
    _celery_ext_recorded: str | None = None
    _celery_ext_waiting = False  # the command in flight is the idle wait
    #: Lease set of this channel's worker (set by celery_ext.leases), or None.
    celery_ext_owned_key: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._celery_ext_no_ack: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        self._push_back_unrecorded()
        self._dead_letter_held(queue)
        if no_ack:
            self._celery_ext_no_ack.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[misc]

    def celery_ext_keep_unrecorded(self, item: tuple[Any, str, str]) -> None:
        raise NotImplementedError

    def celery_ext_take_unrecorded(self) -> list[tuple[Any, str, str]]:
        raise NotImplementedError

    def celery_ext_dead_letter_raw(self, raw: bytes, queue: str, reason: str, detail: str) -> bool:
        """Keep ``raw`` (not a kombu message) in the dead-letter queue; True when kept."""
        raise NotImplementedError

    def _push_back_unrecorded(self) -> None:
        """Requeue (at the head) what a previous connection popped and could not record."""
        items = self.celery_ext_take_unrecorded()
        if not items:
            return
        try:
            me: Any = self
            with me.conn_or_acquire() as client, client.pipeline() as pipe:
                for payload, exchange, routing_key in items:
                    me.restore_payload(payload, exchange, routing_key, pipe, leftmost=True)
                pipe.execute()
        except Exception:
            for item in items:
                self.celery_ext_keep_unrecorded(item)
            raise
        logger.warning(
            "celery_ext: requeued %d message(s) received as the broker connection failed",
            len(items),
        )

    # -- unreadable items ------------------------------------------------------
    def _unreadable(
        self, list_key: str, raw: bytes, queue: str, exc: BaseException, tag: str | None = None
    ) -> None:
        """Dead-letter an item that is not a kombu message, then let go of it.

        It is held until then: in the unreadable list (``tag`` None) or in the
        unacked record (``tag``), so a crash in between keeps it.
        """
        reason = "invalid message" if isinstance(exc, UnreadableMessage) else "undecodable"
        detail = f"{type(exc).__name__}: {exc}"
        kept = self.celery_ext_dead_letter_raw(raw, queue, reason, detail)
        me: Any = self
        if not kept:  # still held: tried again at the next consume (or restore)
            where = repr(list_key + UNREADABLE_SUFFIX) if tag is None else "the unacked hash"
            logger.error("celery_ext: an unreadable item of queue %r stays in %s", queue, where)
            return
        with me.conn_or_acquire() as client, client.pipeline() as pipe:
            if tag is None:
                pipe.lrem(list_key + UNREADABLE_SUFFIX, 1, raw)
            else:
                prefix = me.global_keyprefix or ""
                pipe.hdel(prefix + me.unacked_key, tag)
                pipe.zrem(prefix + me.unacked_index_key, tag)
                owned = self.celery_ext_owned_key
                if owned:
                    pipe.srem(prefix + owned, tag)
            pipe.execute()

    def _dead_letter_held(self, queue: str) -> None:
        """Dead-letter what a worker that died left in ``queue``'s unreadable lists."""
        me: Any = self
        prefix = me.global_keyprefix or ""
        try:
            with me.conn_or_acquire() as client:
                for pri in me.priority_steps:
                    key = prefix + _compat.redis_list_key(self, queue, pri)
                    for raw in client.lrange(key + UNREADABLE_SUFFIX, 0, -1):
                        self._unreadable(key, raw, queue, _why_unreadable(raw))
        except me.connection_errors:
            logger.debug("celery_ext: could not look at held items of %r", queue, exc_info=True)

    # -- consuming -----------------------------------------------------------
    def poll_start(self, timeout: float | None = None) -> None:
        me: Any = self
        if self._celery_ext_no_ack and self._celery_ext_no_ack & set(me.active_queues):
            return super().poll_start(timeout)  # type: ignore[misc,no-any-return]
        queues = me.next_queues()
        if not queues:
            return None
        prefix = me.global_keyprefix or ""
        lists = [
            prefix + _compat.redis_list_key(self, q, pri)
            for pri in me.priority_steps
            for q in queues
        ]
        connection = me.client.connection
        me.mark_polling(connection)
        if self._celery_ext_waiting:
            # The last pop found nothing: block until the first list has a message
            # (moved tail to tail: left where it was), or IDLE_WAIT_S passes.
            wait = min(IDLE_WAIT_S, float(timeout or me.brpop_timeout or IDLE_WAIT_S))
            connection.send_command("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT", wait)
            return None
        owned = self.celery_ext_owned_key
        keys = [
            prefix + me.unacked_key,
            prefix + me.unacked_index_key,
            (prefix + owned) if owned else "",
            *lists,
        ]
        connection.send_command(
            "EVAL", _POP, len(keys), *keys, repr(time.time()), UNREADABLE_SUFFIX
        )
        return None

    def poll_read(self, **options: Any) -> Any:
        me: Any = self
        if self._celery_ext_no_ack and self._celery_ext_no_ack & set(me.active_queues):
            return super().poll_read(**options)  # type: ignore[misc]
        waited, self._celery_ext_waiting = self._celery_ext_waiting, False
        try:
            reply = me.client.parse_response(me.client.connection, "EVAL", **options)
        except me.connection_errors:
            me.client.connection.disconnect()  # the next poll reconnects
            raise
        if waited or not reply:
            self._celery_ext_waiting = not waited  # pop found nothing: wait next
            raise kombu_redis.Empty()
        key, item, *recorded = reply
        key = key.decode() if isinstance(key, bytes) else str(key)
        raw = item if isinstance(item, bytes) else str(item).encode()
        prefix = me.global_keyprefix or ""
        dest = key[len(prefix) :].rsplit(me.sep, 1)[0]  # no priority suffix
        me.polled(dest)
        if not recorded:  # not JSON, or no kombu envelope: held by the script
            self._unreadable(key, raw, dest, _why_unreadable(raw))
            raise kombu_redis.Empty()
        tag = recorded[0].decode() if isinstance(recorded[0], bytes) else str(recorded[0])
        try:
            payload = loads(raw.decode())
        except Exception as exc:  # JSON to Redis's cjson, not to Python's
            self._unreadable(key, raw, dest, exc, tag)
            raise kombu_redis.Empty() from None
        self._celery_ext_recorded = tag
        try:
            me.deliver(payload, dest)
        except UnreadableMessage as exc:
            self._unreadable(key, raw, dest, exc, tag)
            raise kombu_redis.Empty() from None
        finally:
            self._celery_ext_recorded = None
        return True

    def check_open(self) -> None:
        # kombu: after Celery collects a connection lost mid-poll, a late ack or a
        # second close on its channel rebuilds a pool from a transport whose client
        # is None. The AttributeError is no connection error, so the worker died
        # ("Unrecoverable error"); a connection error is handled (and retried).
        if getattr(getattr(self, "connection", None), "client", None) is None:
            raise redis.ConnectionError("this channel's connection was closed")


def _why_unreadable(raw: bytes) -> BaseException:
    """The error a held item gives: not JSON, or JSON that is no kombu envelope."""
    try:
        payload = loads(raw.decode())
    except Exception as exc:
        return exc
    return UnreadableMessage(
        f"not a kombu message: JSON {type(payload).__name__} without properties.delivery_tag"
    )


# -- parking delayed messages ------------------------------------------------------
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


def replicated(bounds: Bounds | None, queue: str, client: Any, call: Callable[[Any], Any]) -> Any:
    """``call(client)``, then ``WAIT`` for ``bounds.replica_acks`` replicas, on one connection.

    Returns what ``call`` returned; raises :class:`NotReplicated` when fewer
    replicas acknowledged in ``replica_ack_timeout``. Without ``replica_acks``
    it is just ``call(client)``.

    Example::

        replicated(bounds, "celery", client, lambda c: c.lpush("celery", payload))
    """
    wanted = bounds.replica_acks if bounds is not None else 0
    if not wanted:
        return call(client)
    assert bounds is not None
    timeout_s = bounds.replica_ack_timeout_s
    pipe = client.pipeline(transaction=False)  # one connection: WAIT counts its writes
    call(pipe)
    pipe.execute_command("WAIT", wanted, max(1, int(timeout_s * 1000)))
    *replies, acked = pipe.execute()
    if int(acked) < wanted:
        raise NotReplicated(queue, wanted, int(acked), timeout_s)
    return replies[0]


class RedisParking:
    """Parks raw kombu messages in Redis sorted sets until they are due.

    ``channel`` is a channel of kombu's Redis transport (``conn.default_channel``).

    Example::

        parking = RedisParking(conn.default_channel)
        parking.park("celery", raw, delay_s=60)
        parking.parked("celery")     # 1
    """

    def __init__(self, channel: Any, bounds: Bounds | None = None) -> None:
        import redis  # the `redis` extra; kombu's Redis transport needs it anyway

        self.channel = channel
        self.bounds = bounds  # replica_acks: parks at publish wait for replicas
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
        args = [zkey, target, delay_ms, member]
        due_ms = replicated(
            self.bounds,
            queue,
            self.client,
            lambda client: self._park(keys=[self._registry], args=args, client=client),
        )
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


# -- the transport ---------------------------------------------------------------
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


class RedisChannel(Collecting, SizeLimited, AtomicDelivery, _compat.RedisChannel):  # type: ignore[misc]
    """kombu's Redis channel with bounded, atomic pushes (see the module docstring)
    and deliveries a crash cannot drop (:class:`AtomicDelivery`)."""

    def celery_ext_keep_unrecorded(self, item: tuple[Any, str, str]) -> None:
        if self.bounds is not None:
            self.bounds.keep_unrecorded(item)

    def celery_ext_take_unrecorded(self) -> list[tuple[Any, str, str]]:
        return self.bounds.take_unrecorded() if self.bounds is not None else []

    def celery_ext_dead_letter_raw(self, raw: bytes, queue: str, reason: str, detail: str) -> bool:
        if self.bounds is None:
            return False
        from ..intake import dead_letter_raw

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
        return RedisParking(self, self.bounds)

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
        waits = bounds is not None and bounds.replica_acks > 0
        if bounds is None or (limit is None and collector is None and not waits):
            return super().storage_put(queue, message, **kwargs)  # type: ignore[no-any-return]
        # Bounded (or collected, or replicated) messages skip kombu's Producer.batch
        # pipeline: the bound is checked when they are pushed, so they are pushed now
        # (or at flush), and WAIT follows the push on its connection.
        priority = _compat.redis_message_priority(self, message)
        key = _compat.redis_list_key(self, queue, priority)
        item = Pending(queue, limit, message["headers"].get("id"), (key, dumps(message)))
        if collector is not None:
            collector.append(item)
            return None
        _, refusal = self._flush_run([item])
        if refusal is not None:
            raise refusal
        return None

    def _flush_run(self, run: list[Pending]) -> tuple[list[Pending], QueueFull | None]:
        queue, limit = run[0].queue, run[0].limit
        prefix = self.global_keyprefix or ""
        lists = list(
            dict.fromkeys(_compat.redis_list_key(self, queue, p) for p in self.priority_steps)
        )
        index = {name: i for i, name in enumerate(lists, 1)}
        expires = self.queue_expires_ms(queue)
        keys = [prefix + name for name in lists]

        def attempt(items: list[Pending]) -> tuple[list[Pending], list[Pending], int]:
            args: list[Any] = [limit or 0, expires]
            for item in items:
                args += (index[item.payload[0]], item.payload[1])
            pushed, depth = replicated(
                self.bounds,
                queue,
                self._push_script.registered_client,
                lambda client: self._push_script(keys=keys, args=args, client=client),
            )
            return items[:pushed], items[pushed:], int(depth) + int(pushed)

        bounds = self.bounds
        if limit is None or bounds is None:  # collected, unbounded: one push
            return attempt(run)[0], None
        return offer(bounds, queue, limit, run, attempt)


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with producer-side bounds (``redis://`` after ``install``).

    Example::

        Celery(broker="redis://", broker_transport="celery_ext.transports.redis:RedisTransport")
    """

    Channel = RedisChannel


class SentinelChannel(RedisChannel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """:class:`RedisChannel` on the primary Redis Sentinel names (kombu's ``SentinelChannel``).

    Every guarantee of ``redis://`` holds through Sentinel: the connection pool
    asks the sentinels for the primary, and a failover is a reconnect.
    """


class SentinelTransport(RedisTransport):
    """:class:`RedisTransport` for ``sentinel://`` URLs (``master_name`` in the transport options).

    Example::

        app = Celery(broker="sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380")
        app.conf.broker_transport_options = {"master_name": "mymaster"}
        celery_ext.install(app, replica_acks=1)   # publishes survive a failover
    """

    default_port = 26379
    Channel = SentinelChannel


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
