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

:class:`RecordingQoS` keeps a message whose record failed (the broker went away
mid-delivery) so the next channel pushes it back; and a late ack or a second
close on the channel of a collected connection raises a connection error
instead of kombu's AttributeError, which killed the worker ("Unrecoverable
error").

Example::

    celery_ext.install(app)   # redis:// now uses celery_ext.bounds:RedisTransport
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.json import dumps, loads

__all__ = ["IDLE_WAIT_S", "AtomicDelivery", "RecordingQoS"]

logger = logging.getLogger(__name__)

#: Longest wait before an idle channel looks at its other queues and priorities again.
IDLE_WAIT_S = 0.1

# KEYS: unacked hash, unacked index, lease set ('' for none), then the lists in
# kombu's BRPOP order. ARGV[1]: now (s). Returns {list, message} or nil.
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
    if type(tag) == 'string' then
      redis.call('HSET', KEYS[1], tag,
        '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
      if KEYS[3] ~= '' then redis.call('SADD', KEYS[3], tag) end
    end
    return {KEYS[i], item}
  end
end
return nil
"""


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
                    dumps([message._raw, info["exchange"], info["routing_key"]]),
                )
                if owned is not None:
                    pipe.sadd(owned, delivery_tag)
                pipe.execute()
        except Exception:
            keep = getattr(channel, "celery_ext_keep_unrecorded", None)
            if keep is not None:
                keep((message._raw, info["exchange"], info["routing_key"]))
            raise
        kombu_virtual.QoS.append(self, message, delivery_tag)


class AtomicDelivery:
    """Channel mixin for kombu's Redis channel; see the module docstring.

    The host class provides ``celery_ext_keep_unrecorded(item)`` and
    ``celery_ext_take_unrecorded()`` (celery_ext's keeps them on the app's bounds).

    Example::

        class RedisChannel(AtomicDelivery, kombu_redis.Channel):
            ...
    """

    QoS = RecordingQoS
    _celery_ext_recorded: str | None = None
    _celery_ext_waiting = False  # the command in flight is the idle wait
    #: Lease set of this channel's worker (set by celery_ext.leases), or None.
    celery_ext_owned_key: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._celery_ext_no_ack: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        self._push_back_unrecorded()
        if no_ack:
            self._celery_ext_no_ack.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[misc]

    def celery_ext_keep_unrecorded(self, item: tuple[Any, str, str]) -> None:
        raise NotImplementedError

    def celery_ext_take_unrecorded(self) -> list[tuple[Any, str, str]]:
        raise NotImplementedError

    def _push_back_unrecorded(self) -> None:
        """Requeue (at the head) what a previous connection popped and could not record."""
        items = self.celery_ext_take_unrecorded()
        if not items:
            return
        try:
            with self.conn_or_acquire() as client, client.pipeline() as pipe:  # type: ignore[attr-defined]
                for payload, exchange, routing_key in items:
                    self._do_restore_message(payload, exchange, routing_key, pipe, leftmost=True)  # type: ignore[attr-defined]
                pipe.execute()
        except Exception:
            for item in items:
                self.celery_ext_keep_unrecorded(item)
            raise
        logger.warning(
            "celery_ext: requeued %d message(s) received as the broker connection failed",
            len(items),
        )

    # -- consuming -----------------------------------------------------------
    def _brpop_start(self, timeout: float | None = None) -> None:
        me: Any = self
        if self._celery_ext_no_ack and self._celery_ext_no_ack & set(me.active_queues):
            return super()._brpop_start(timeout)  # type: ignore[misc,no-any-return]
        queues = me._queue_cycle.consume(len(me.active_queues))
        if not queues:
            return None
        prefix = me.global_keyprefix or ""
        lists = [prefix + me._q_for_pri(q, pri) for pri in me.priority_steps for q in queues]
        connection = me.client.connection
        me._in_poll = connection
        me._brpop_sent_at = time.monotonic()
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
        connection.send_command("EVAL", _POP, len(keys), *keys, repr(time.time()))
        return None

    def _brpop_read(self, **options: Any) -> Any:
        me: Any = self
        if self._celery_ext_no_ack and self._celery_ext_no_ack & set(me.active_queues):
            return super()._brpop_read(**options)  # type: ignore[misc]
        waited, self._celery_ext_waiting = self._celery_ext_waiting, False
        try:
            try:
                reply = me.client.parse_response(me.client.connection, "EVAL", **options)
            except me.connection_errors:
                me.client.connection.disconnect()  # the next poll reconnects
                raise
            if waited or not reply:
                self._celery_ext_waiting = not waited  # pop found nothing: wait next
                raise kombu_redis.Empty()
            key, item = reply
            key = key.decode() if isinstance(key, bytes) else str(key)
            prefix = me.global_keyprefix or ""
            dest = key[len(prefix) :].rsplit(me.sep, 1)[0]  # no priority suffix
            payload = loads(item.decode() if isinstance(item, bytes) else item)
            me._queue_cycle.rotate(dest)
            self._celery_ext_recorded = payload.get("properties", {}).get("delivery_tag")
            try:
                me.connection._deliver(payload, dest)
            finally:
                self._celery_ext_recorded = None
            return True
        finally:
            me._in_poll = None
            flush = getattr(me, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _connparams(self, asynchronous: bool = False) -> Any:
        # kombu: after Celery collects a connection lost mid-poll, a late ack or a
        # second close on its channel rebuilds a pool from a transport whose client
        # is None. The AttributeError is no connection error, so the worker died
        # ("Unrecoverable error"); a connection error is handled (and retried).
        if getattr(getattr(self, "connection", None), "client", None) is None:
            raise redis.ConnectionError("this channel's connection was closed")
        return super()._connparams(asynchronous)  # type: ignore[misc]
