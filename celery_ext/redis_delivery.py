"""Redis deliveries that a crash or a lost connection cannot drop.

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

Example::

    celery_ext.install(app)   # redis:// now uses celery_ext.redis_transport:RedisTransport
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.json import dumps, loads

from . import _compat

__all__ = ["IDLE_WAIT_S", "AtomicDelivery", "RecordingQoS"]

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
