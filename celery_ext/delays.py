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
- Delivery: parking happens before the ack, so a crash between the two gives a
  duplicate (at-least-once), never a loss.

Status: the building block for bounded prefetch (issue 3) and retry backoff;
the worker does not park on its own yet. RabbitMQ and the local lane follow.

Example::

    with app.connection_for_write() as conn:
        parking = RedisParking(conn.default_channel)
        parking.park("celery", message.serializable(), delay_s=3600)
        ...
        parking.move_due()        # run periodically by every worker
"""

from __future__ import annotations

from typing import Any

from kombu.utils.json import dumps

__all__ = ["RedisParking"]

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
        priority = self.channel._get_message_priority(raw, reverse=False)
        target = self._prefix + self.channel._q_for_pri(queue, priority)
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
            target = self._prefix + self.channel._q_for_pri(queue, priority)
            total += int(self.client.zcard(f"{self._registry}:{target}"))
        return total

    def next_due(self) -> float | None:
        """Epoch seconds of the earliest parked message, or None.

        Example::

            parking.next_due()
        """
        earliest: float | None = None
        for zkey in self.client.hkeys(self._registry):
            head = self.client.zrange(zkey, 0, 0, withscores=True)
            if head:
                due = float(head[0][1]) / 1000.0
                earliest = due if earliest is None else min(earliest, due)
        return earliest
