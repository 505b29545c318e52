"""What a benchmark leaves in the shared Redis besides its queue list, and removing it.

kombu keeps, per queue, binding sets (``_kombu.binding.<exchange>`` and, in kombu 5.7,
``_kombu.binding_permanent.<exchange>``; Celery names a queue's exchange after it),
unacked entries of messages a killed worker held, and one pidbox binding per worker
hostname. ``queue_delete`` leaves some of them; these helpers remove this run's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PIDBOX = "_kombu.binding.celery.pidbox"


def forget_redis_queue(client: Any, queue: str, hostnames: Iterable[str] = ()) -> None:
    """Delete ``queue``'s list, bindings and unacked entries, and ``hostnames``' pidbox bindings.

    Example::

        forget_redis_queue(redis.Redis.from_url(url), "drain.bench.1a2b3c4d", ["w1@localhost"])
    """
    client.delete(queue)
    for key in client.scan_iter(match=f"_kombu.binding*.{queue}"):
        client.delete(key)
    needle = f'"{queue}"'.encode()  # the routing key or exchange inside the saved message
    tags = [tag for tag, raw in client.hgetall("unacked").items() if needle in raw]
    if tags:
        client.hdel("unacked", *tags)
        client.zrem("unacked_index", *tags)
    names = [h.encode() for h in hostnames]
    stale = [m for m in client.smembers(PIDBOX) if any(n in m for n in names)]
    if stale:
        client.srem(PIDBOX, *stale)
