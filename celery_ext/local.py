"""The local lane: an in-process, bounded, push-based kombu transport.

For jobs that may be lost. Messages live in the memory of the process that
published them and die with it; in exchange there is no server, no polling and
no serialisation detour. Select it with ``broker="local://"`` after
``celery_ext.install(app)``.

How it differs from kombu's ``memory://``:

- **Per app, per URL.** Queues, exchanges and bindings live on a :class:`Lane`
  owned by the app (``local://`` and ``local://other`` are two lanes), never on
  the transport class, so two apps in one process never see each other's messages.
- **Push, not poll.** A consumer waiting for work sleeps on a condition that
  every publish, ack and reject notifies; an idle worker costs no CPU and a
  publish starts the task at once.
- **Bounded.** A task queue holds at most ``lane_max_queued`` messages. When it
  is full a publish waits up to ``lane_block_timeout`` (policy ``block``) or fails
  at once (policy ``raise``) with :class:`~celery_ext.errors.QueueFull`.
  Auto-delete queues (Celery's event, reply and pidbox queues) drop their oldest
  message instead, counted in :attr:`Lane.dropped_transient`, so a stalled
  monitor can never block task publishing.
- **Nothing silently lost.** Unacked messages go back to the front of their
  queue when a channel closes; requeued and restored messages ignore the bound.
  A task published to a queue no worker in this process consumes logs one
  warning per task (it waits, up to the bound, for a :class:`LocalWorker`), and
  what is still on the lane when the process exits is counted in one warning.

Limits: the lane cannot cross processes, so the prefork pool (whose children
cannot reach the parent's memory) is refused; use ``-P threads``, ``solo`` or
``gevent``. Exchanges support direct, topic and fanout routing; no priorities.

Example::

    app = Celery("shop", broker="local://")
    celery_ext.install(app, lane_max_queued=1000, lane_full_policy="raise")
    with LocalWorker(app, concurrency=4):
        add.delay(2, 2)
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import socket
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from queue import Empty
from time import monotonic
from types import TracebackType
from typing import Any

from celery import Celery, bootsteps, signals
from celery.app.amqp import AMQP
from celery.app.trace import build_tracer
from celery.exceptions import ImproperlyConfigured
from celery.utils import timer2
from celery.worker import state as worker_state
from kombu import Producer
from kombu.transport import virtual
from kombu.utils.imports import symbol_by_name

from . import _compat, bounds
from ._settings import Settings, settings_of
from .errors import LaneNotInstalled, PoolNotAllowed, QueueFull
from .sizes import SizeLimited
from .timeouts import TimeoutPool

__all__ = [
    "DrainReport",
    "Lane",
    "LaneGuard",
    "Lanes",
    "LocalWorker",
    "Transport",
    "is_local",
    "lane_of",
]

logger = logging.getLogger(__name__)

#: Seconds stop() gives running tasks beyond its drain deadline before reporting them.
STOP_GRACE_S = 1.0

#: Key under ``broker_transport_options`` that carries an app's :class:`Lanes`.
LANES_OPTION = "celery_ext_lanes"

Message = dict[str, Any]
Snapshot = tuple[tuple[tuple[str, int], ...], int, int]


class Lane:
    """Queues, bindings and the wake-up condition of one local lane.

    One lane per app and URL; created by :class:`Lanes`, shared by every
    connection of that app to that URL. Thread-safe (one lock per lane).

    Example::

        lane = Lanes(settings).get("")
        lane.depth("celery")   # messages waiting in queue "celery"
    """

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.max_queued = settings.lane_max_queued
        self.policy = settings.lane_full_policy
        self.block_timeout_s = settings.lane_block_timeout
        self.broker_state = virtual.BrokerState()
        self.dropped_transient = 0
        self.shed_total = 0  # messages dropped by a "shed" policy
        self._cond = threading.Condition(threading.Lock())
        self._queues: dict[str, deque[Message]] = {}
        self._transient: set[str] = set()
        self._unacked: set[object] = set()  # delivery tags
        self._tags = itertools.count(1)
        # Change counters, and who waits for what, so that a publish or an ack
        # only pays for a notify when somebody is waiting for exactly that.
        self._arrivals: dict[str, int] = {}
        self._settled = 0
        self._woken = 0
        self._watched: dict[str, int] = {}  # queue -> consumers asleep on it
        self._settle_waiters = 0  # consumers whose prefetch window is full
        self._any_waiters = 0  # join()/stop(): every change matters
        self._room_waiters = 0  # producers blocked on a full queue
        # Parked (delayed) messages: a heap of (due, seq, queue, message).
        self._parked: list[tuple[float, int, str, Message]] = []
        self._parked_per_queue: dict[str, int] = {}
        self._parks = 0  # parks so far: a sleeper wakes to recompute its due time
        self._consumers: dict[str, int] = {}  # queue -> consumers in this process
        self._warned: set[str] = set()  # tasks published with nobody consuming them
        _report_at_exit(self)

    def __repr__(self) -> str:
        return f"<Lane local://{self.name} queues={len(self._queues)} unacked={len(self._unacked)}>"

    # -- queues -------------------------------------------------------------
    def declare(self, queue: str, transient: bool = False) -> None:
        """Create ``queue`` if missing; ``transient`` queues drop oldest when full."""
        with self._cond:
            if queue not in self._queues:
                self._queues[queue] = deque()
                if transient:
                    self._transient.add(queue)

    def has(self, queue: str) -> bool:
        return queue in self._queues

    def consuming(self, queue: str, delta: int) -> None:
        """Count a consumer of ``queue`` in (``delta`` 1) or out (-1)."""
        with self._cond:
            self._consumers[queue] = max(0, self._consumers.get(queue, 0) + delta)

    def consumers(self, queue: str) -> int:
        """Consumers of ``queue`` in this process (the lane is nobody else's)."""
        return self._consumers.get(queue, 0)

    def warn_unconsumed(self, queue: str, task: str) -> None:
        """Say once per task that it was published where nothing consumes it."""
        if task in self._warned or queue in self._transient:
            return
        with self._cond:
            if task in self._warned:
                return
            self._warned.add(task)
        logger.warning(
            "celery_ext: task %r was published to queue %r of this process's local lane, "
            "where no worker consumes it: it waits in memory (at most %d) and is lost when "
            "the process exits. Start celery_ext.LocalWorker(app) in this process (e.g. in "
            "the web app's startup hook), or make the task durable",
            task,
            queue,
            self.max_queued,
        )

    def left(self) -> dict[str, int]:
        """Task messages still on the lane (queued, parked, delivered unacked), by task name.

        Example::

            lane.left()   # {'shop.warm_cache': 3}
        """
        with self._cond:
            raws = [
                raw
                for queue, q in self._queues.items()
                if queue not in self._transient
                for raw in q
            ]
            raws.extend(entry[3] for entry in self._parked)
            unacked = len(self._unacked)
        counts: dict[str, int] = {}
        for raw in raws:
            task = str((raw.get("headers") or {}).get("task") or "?")
            counts[task] = counts.get(task, 0) + 1
        if unacked:
            counts["(delivered, unfinished)"] = unacked
        return counts

    def depth(self, queue: str) -> int:
        """Messages waiting (not delivered) in ``queue``."""
        q = self._queues.get(queue)
        return len(q) if q is not None else 0

    def unacked(self) -> int:
        """Messages delivered to a consumer and not yet acked or rejected."""
        return len(self._unacked)

    def next_tag(self) -> int:
        return next(self._tags)

    def put(
        self,
        queue: str,
        message: Message,
        limit: int | None = None,
        policy: str | None = None,
        block_timeout_s: float | None = None,
    ) -> bool:
        """Append ``message`` to ``queue``, applying the bound and full policy.

        ``limit`` (a ``queue_limits`` / ``max_queued`` bound) can only lower the
        lane's own ``max_queued``; when it is the tighter bound, ``policy`` and
        ``block_timeout_s`` (the ``queue_full_policy`` ones) apply instead of the
        lane's. Returns False when the message was shed.
        """
        if limit is None or limit >= self.max_queued or policy is None:
            bound, policy, wait_s = self.max_queued, self.policy, self.block_timeout_s
        else:
            bound = limit
            wait_s = self.block_timeout_s if block_timeout_s is None else block_timeout_s
        with self._cond:
            q = self._queues.get(queue)
            if q is None:
                q = self._queues[queue] = deque()
            if len(q) >= bound:
                if queue in self._transient:
                    q.popleft()
                    self.dropped_transient += 1
                elif policy == "shed":
                    self.shed_total += 1
                    return False
                elif policy == "raise" or wait_s <= 0:
                    raise QueueFull(queue, bound, len(q))
                else:
                    self._wait_for_room(queue, q, bound, wait_s)
            q.append(message)
            self._arrived(queue)
            return True

    def _wait_for_room(self, queue: str, q: deque[Message], bound: int, wait_s: float) -> None:
        start = monotonic()
        self._room_waiters += 1
        try:
            has_room = self._cond.wait_for(lambda: len(q) < bound, wait_s)
        finally:
            self._room_waiters -= 1
        if not has_room:
            raise QueueFull(queue, bound, len(q), monotonic() - start)

    def _arrived(self, queue: str) -> None:
        self._arrivals[queue] = self._arrivals.get(queue, 0) + 1
        if self._any_waiters or queue in self._watched:
            self._cond.notify_all()

    def restore(self, queue: str, message: Message, tag: object) -> None:
        """Put a delivered message back at the front of ``queue`` (ignores the bound)."""
        with self._cond:
            self._unacked.discard(tag)
            self._queues.setdefault(queue, deque()).appendleft(message)
            self._settled += 1
            self._arrived(queue)
            self._cond.notify_all()

    def pop(self, queue: str, track: bool) -> Message | None:
        """The next message of ``queue``, or None; ``track`` it as unacked."""
        parked = self._parked
        if parked and parked[0][0] <= monotonic():
            self._release_due()
        q = self._queues.get(queue)
        if not q:
            return None
        with self._cond:
            try:
                message = q.popleft()
            except IndexError:
                return None
            if track:
                self._unacked.add(message["properties"]["delivery_tag"])
            if self._room_waiters:
                self._cond.notify_all()
            return message

    def settle(self, tag: object) -> None:
        """Forget a delivered message (acked or rejected) and wake who waits for it."""
        with self._cond:
            if tag in self._unacked:
                self._unacked.discard(tag)
                self._settled += 1
                if self._settle_waiters or self._any_waiters:
                    self._cond.notify_all()

    # -- parking (delayed messages) -------------------------------------------
    def park(self, queue: str, message: Message, delay_s: float) -> float:
        """Hold ``message`` back for ``delay_s`` seconds, then append it to ``queue``.

        Bounded like the queues: at most ``max_queued`` parked messages per
        queue, else :class:`~celery_ext.errors.QueueFull`. Returns the due time
        on the :func:`time.monotonic` clock.

        Example::

            lane.park("celery", raw, delay_s=30)
        """
        with self._cond:
            held = self._parked_per_queue.get(queue, 0)
            if held >= self.max_queued:
                raise QueueFull(queue, self.max_queued, held)
            due = monotonic() + max(0.0, delay_s)
            heapq.heappush(self._parked, (due, next(self._tags), queue, message))
            self._parked_per_queue[queue] = held + 1
            self._parks += 1
            self._cond.notify_all()  # sleepers recompute how long to sleep
            return due

    def parked(self, queue: str) -> int:
        """Messages parked for ``queue``."""
        return self._parked_per_queue.get(queue, 0)

    def next_due(self) -> float | None:
        """Monotonic due time of the earliest parked message, or None."""
        parked = self._parked
        return parked[0][0] if parked else None

    def unpark(self, queue: str) -> list[Message]:
        """Remove and return every message parked for ``queue``."""
        with self._cond:
            return self._unpark_locked({queue})

    def _unpark_locked(self, queues: set[str]) -> list[Message]:
        mine = [entry for entry in self._parked if entry[2] in queues]
        if mine:
            self._parked = [entry for entry in self._parked if entry[2] not in queues]
            heapq.heapify(self._parked)
            for queue in queues:
                self._parked_per_queue[queue] = 0
            self._cond.notify_all()
        return [entry[3] for entry in sorted(mine)]

    def _release_due(self) -> None:
        with self._cond:
            now = monotonic()
            parked = self._parked
            while parked and parked[0][0] <= now:
                _, _, queue, message = heapq.heappop(parked)
                self._parked_per_queue[queue] -= 1
                self._queues.setdefault(queue, deque()).append(message)
                self._arrived(queue)

    def discard(self, queues: Iterable[str]) -> list[str]:
        """Remove every message waiting or parked in ``queues`` of this lane; their ids.

        What a stopping :class:`LocalWorker` drops. It acts on this in-process
        lane alone: nothing here can reach a broker, so a lane worker of an app
        on Redis or RabbitMQ never touches the durable queues of that name.

        Example::

            lane.discard(["celery"])   # ['3f1c...', ...]
        """
        taken: list[Message] = []
        with self._cond:
            for queue in queues:
                q = self._queues.get(queue)
                if q:
                    taken.extend(q)
                    q.clear()
            taken.extend(self._unpark_locked(set(queues)))
            if taken:
                self._cond.notify_all()
        return [_message_id(raw) for raw in taken]

    def purge(self, queue: str) -> int:
        with self._cond:
            q = self._queues.get(queue)
            n = len(q) if q else 0
            if q:
                q.clear()
                self._cond.notify_all()
            return n

    def delete(self, queue: str) -> None:
        with self._cond:
            self._queues.pop(queue, None)
            self._transient.discard(queue)
            self._cond.notify_all()

    # -- waiting ------------------------------------------------------------
    def snapshot(self, queues: Iterable[str]) -> Snapshot:
        """The change counters a consumer compares against in :meth:`sleep`."""
        arrivals = self._arrivals
        return tuple((q, arrivals.get(q, 0)) for q in queues), self._settled, self._woken

    def sleep(self, snap: Snapshot, timeout: float | None, settles: bool) -> bool:
        """Sleep until a watched queue gets a message (or a settle, when ``settles``).

        Returns True when woken by :meth:`wake` rather than by traffic or the timeout.
        """
        queues, settled, woken = snap
        arrivals = self._arrivals
        parks = self._parks

        def changed() -> bool:
            return (
                self._woken != woken
                or self._parks != parks
                or (settles and self._settled != settled)
                or any(arrivals.get(q, 0) != n for q, n in queues)
            )

        due = self.next_due()
        if due is not None:
            until_due = max(0.0, due - monotonic())
            timeout = until_due if timeout is None else min(timeout, until_due)
        with self._cond:
            watched = self._watched
            for q, _ in queues:
                watched[q] = watched.get(q, 0) + 1
            self._settle_waiters += settles
            try:
                self._cond.wait_for(changed, timeout)
            finally:
                self._settle_waiters -= settles
                for q, _ in queues:
                    watched[q] -= 1
                    if not watched[q]:
                        del watched[q]
            return self._woken != woken

    def wake(self) -> None:
        """Wake every waiter (used on shutdown)."""
        with self._cond:
            self._woken += 1
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``predicate()`` holds, re-checked on every change of the lane."""
        with self._cond:
            self._any_waiters += 1
            try:
                return self._cond.wait_for(predicate, timeout)
            finally:
                self._any_waiters -= 1

    def idle(self, queues: Iterable[str], due_before: float | None = None) -> bool:
        """True when ``queues`` are empty, have nothing parked and nothing is unacked.

        With ``due_before`` (monotonic), parked messages due later do not count,
        nor do unacked ones (a worker holds those for their ETA; the caller asks
        the worker whether it is running anything).
        """
        wanted = set(queues)
        if (self._unacked and due_before is None) or any(self._queues.get(q) for q in wanted):
            return False
        if due_before is None:
            return not any(self._parked_per_queue.get(q) for q in wanted)
        return not any(e[0] <= due_before and e[2] in wanted for e in list(self._parked))


def _report_at_exit(lane: Lane) -> None:
    """At interpreter exit, log what ``lane`` still holds (it dies with the process)."""
    ref = weakref.ref(lane)

    def report() -> None:
        alive = ref()
        left = alive.left() if alive is not None else {}
        if left:
            logger.warning(
                "celery_ext local lane %r: %d message(s) lost as the process exits: %s",
                f"local://{alive.name}" if alive is not None else "?",
                sum(left.values()),
                ", ".join(f"{task} x{n}" for task, n in sorted(left.items())),
            )

    atexit.register(report)


class Lanes:
    """An app's local lanes, one per ``local://<name>`` URL.

    Created by ``install(app)`` and passed to the transport through
    ``broker_transport_options``.

    Example::

        lanes = Lanes(Settings())
        lanes.get("") is lanes.get("")   # True: one lane per name
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # kombu keys its global producer pools on repr(transport_options): the id keeps
        # two apps' lanes from sharing one pool (and one lane). Readable, as `inspect
        # conf` (Flower's Config tab) shows it.
        return f"{self.__json__()} [{id(self):x}]"

    def __json__(self) -> str:
        # `inspect stats` (and so Flower's Broker tab) serialises the transport options.
        lanes = ", ".join(f"local://{name}" for name in sorted(self._lanes)) or "none in use"
        return f"celery_ext local lanes: {lanes}"

    def get(self, name: str = "") -> Lane:
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = Lane(name, self.settings)
            return lane

    @classmethod
    def of(cls, app: Celery) -> Lanes:
        """The lanes installed on ``app``.

        Example::

            Lanes.of(app).get().depth("celery")
        """
        lanes = app.conf.broker_transport_options.get(LANES_OPTION)
        if not isinstance(lanes, Lanes):
            raise LaneNotInstalled("call celery_ext.install(app) before using local://")
        return lanes


class Channel(SizeLimited, _compat.VirtualChannel):
    """A channel on a :class:`Lane`; see the module docstring."""

    body_encoding = None  # bodies stay in memory: no base64 round trip
    do_restore = True
    supports_fanout = True
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        self.lane = connection.lane
        self._no_ack_queues: set[str] = set()
        self.last_put_shed = False  # enqueue_many leaves shed ids out
        super().__init__(connection, **kwargs)

    def storage_next_tag(self) -> int:
        return self.lane.next_tag()

    def storage_has(self, queue: str, **kwargs: Any) -> bool:
        return self.lane.has(queue)

    def storage_declare(self, queue: str, **kwargs: Any) -> None:
        self.lane.declare(queue, transient=bool(kwargs.get("auto_delete")))

    def storage_get(self, queue: str, timeout: float | None = None) -> Message:
        message = self.lane.pop(queue, track=queue not in self._no_ack_queues)
        if message is None:
            raise Empty()
        return message

    def basic_publish(
        self, message: Message, exchange: str, routing_key: str, **kwargs: Any
    ) -> Any:
        call = message["properties"].pop(bounds.OPTION, None)  # apply_async(max_queued=N)
        if call is not None:
            kwargs[bounds.LIMIT_KW] = bounds.check_limit(call, f"apply_async({bounds.OPTION})")
        return super().basic_publish(message, exchange, routing_key, **kwargs)

    def storage_put(self, queue: str, message: Message, **kwargs: Any) -> None:
        lane = self.lane
        self.last_put_shed = False
        limits = self.connection.client.transport_options.get(bounds.BOUNDS_OPTION)
        if not isinstance(limits, bounds.Bounds):  # a bare Connection: the lane's own bound
            self.last_put_shed = not lane.put(queue, message)
            return
        delay = limits.park_delay(message.get("headers"), limits.eta_horizon_s)
        if delay is not None:
            limits.parking(message.setdefault("headers", {}))
            lane.park(queue, message, delay)  # a far-future ETA (see backpressure)
            return
        call = kwargs.get(bounds.LIMIT_KW)  # queue_limits, @app.task(max_queued=), the call's
        task = (message.get("headers") or {}).get("task")
        if task is not None and not lane.consumers(queue):
            lane.warn_unconsumed(queue, str(task))
        limit = limits.limit(queue, task, call)
        try:
            kept = lane.put(queue, message, limit, limits.policy, limits.block_timeout_s)
        except QueueFull:
            limits.count_full(queue)
            raise
        self.last_put_shed = not kept
        if not kept:
            limits.count_shed(queue, 1)

    def storage_put_fanout(
        self, exchange: str, message: Message, routing_key: str, **kwargs: Any
    ) -> None:
        for queue in self.lookup(exchange, routing_key):
            self.lane.put(queue, message)

    def storage_size(self, queue: str) -> int:
        return self.lane.depth(queue)

    def storage_purge(self, queue: str) -> int:
        return self.lane.purge(queue)

    def storage_delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.lane.delete(queue)

    def storage_bind(self, *args: Any) -> None:
        pass

    def storage_restore(self, message: Any) -> None:
        info = message.delivery_info
        raw = message.serializable()
        raw["redelivered"] = True
        for queue in self.lookup(info["exchange"], info["routing_key"]):
            self.lane.restore(queue, raw, message.delivery_tag)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        raw = self.lane.pop(queue, track=not no_ack)
        if raw is None:
            return None
        message = self.Message(raw, channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        result = super().basic_consume(queue, no_ack, *args, **kwargs)
        self.lane.consuming(queue, 1)
        return result

    def basic_cancel(self, consumer_tag: Any) -> Any:
        queue = self.consumer_queue(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None:
            self.lane.consuming(queue, -1)
        return result

    def basic_ack(self, delivery_tag: object, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self.lane.settle(delivery_tag)

    def basic_reject(self, delivery_tag: object, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)
        self.lane.settle(delivery_tag)

    def after_reply_message_received(self, queue: str) -> None:
        pass


class Transport(_compat.VirtualTransport):
    """kombu transport for ``local://`` URLs (registered by ``install(app)``).

    Example::

        with app.connection_for_write() as conn:   # broker "local://"
            conn.default_channel.queue_declare("jobs")
    """

    Channel = Channel
    implements = virtual.Transport.implements.extend(
        asynchronous=False,
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    driver_type = "local"
    driver_name = "celery_ext.local"

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        lanes = client.transport_options.get(LANES_OPTION)
        # No lane is an error only once used: Celery also builds a Connection just to
        # print a masked URL (``inspect conf``, Flower's Config tab).
        self._lane = (
            lanes.get(lane_name(client.hostname, client.virtual_host))
            if isinstance(lanes, Lanes)
            else None
        )
        if self._lane is not None:
            self.state = self._lane.broker_state
        self._closed = False

    @property
    def lane(self) -> Lane:
        """The lane this connection reaches (LaneNotInstalled when there is none)."""
        if self._lane is None:
            raise LaneNotInstalled(
                "local:// has no lane for this connection: call celery_ext.install(app) "
                "before connecting (or pass transport_options={'celery_ext_lanes': Lanes(...)})"
            )
        return self._lane

    def driver_version(self) -> str:
        return "1"

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"hostname": None, "port": None}  # no server: nothing to default to

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        # Instead of kombu's sleep-and-poll loop (and its FairCycle raising Empty per
        # empty queue): deliver what is ready, else sleep on the lane until a queue
        # we can consume from gets a message.
        lane = self.lane
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            watch: list[str] = []
            blocked = False  # some consumer's prefetch window is full: acks matter too
            for channel in self.channels:
                if channel.consuming:
                    if channel.qos.can_consume():
                        watch.extend(channel.consumed_queues)
                    else:
                        blocked = True
            snap = lane.snapshot(watch)
            if self._deliver_ready():
                return
            remaining = None if deadline is None else deadline - monotonic()
            if self._closed or (remaining is not None and remaining <= 0):
                raise TimeoutError()  # socket.timeout, as kombu's callers expect
            if lane.sleep(snap, remaining, settles=blocked):
                raise TimeoutError()  # wake(): let the consumer loop look at its state

    def _deliver_ready(self, limit: int = 64) -> int:
        """Deliver up to ``limit`` ready messages, round-robin over consumed queues."""
        pop = self.lane.pop
        callbacks = self.delivery_callbacks
        delivered = 0
        progress = True
        while progress and delivered < limit:
            progress = False
            for channel in list(self.channels):
                if not channel.consuming:
                    continue
                qos = channel.qos
                no_ack = channel._no_ack_queues
                for queue in list(channel.consumed_queues):
                    if not qos.can_consume():
                        break
                    raw = pop(queue, queue not in no_ack)
                    if raw is None:
                        continue
                    callback = callbacks.get(queue)
                    if callback is None:
                        self.deliver(raw, queue)
                    else:
                        callback(raw)
                    delivered += 1
                    progress = True
        return delivered

    def close_connection(self, connection: Any) -> None:
        self._closed = True
        super().close_connection(connection)
        self.lane.wake()  # a consumer asleep in drain_events returns now, not at its timeout


class LaneProducer(Producer):  # type: ignore[misc]
    """kombu Producer for the local lane: no reconnect wrapper, cheap declare check.

    Nothing on the lane is a recoverable connection error, so ``publish`` skips
    kombu's ensure/retry closure; ``maybe_declare`` looks in the connection's
    declaration cache before kombu binds a copy of the entity to look there.

    Example::

        LaneProducer(app.connection_for_write()).publish({"x": 1}, routing_key="q")
    """

    def publish(self, body: Any, *args: Any, retry: bool = False, **kwargs: Any) -> Any:
        return super().publish(body, *args, retry=False, **kwargs)

    def maybe_declare(self, entity: Any, retry: bool = False, **retry_policy: Any) -> Any:
        declared = self.connection.declared_entities
        if entity and entity.can_cache_declaration and hash(entity) in declared:
            return False
        return super().maybe_declare(entity, False)


class LaneProducerPool:
    """One long-lived :class:`LaneProducer` per publishing thread.

    Replaces kombu's producer pool for local-lane apps: acquiring is a thread-local
    lookup instead of a locked pool round trip that re-binds (copies) the
    producer's exchange each time. Installed through :class:`LaneAMQP`.

    Example::

        with app.amqp.producer_pool.acquire() as producer:
            producer.publish(...)
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.connections = app.pool  # Celery reads .connections.connection.transport
        self.limit = app.pool.limit
        self._local = threading.local()

    def acquire(self, block: bool = True, timeout: float | None = None) -> LaneProducer:
        producer: LaneProducer | None = getattr(self._local, "producer", None)
        if producer is None:
            producer = LaneProducer(self.app.connection_for_write())
            producer.release = _keep  # it stays with this thread
            self._local.producer = producer
        return producer

    def release(self, resource: Any) -> None:
        pass

    def force_close_all(self) -> None:
        self._local = threading.local()


def _keep() -> None:
    pass


class LaneAMQP(AMQP):  # type: ignore[misc]
    """Celery's AMQP helper, with :class:`LaneProducerPool` for local-lane apps.

    ``install(app)`` selects it (``app.amqp_cls``) when the app still uses the
    stock class and has not built ``app.amqp`` yet; other brokers are unaffected.

    Example::

        Celery("x", broker="local://", amqp="celery_ext.local:LaneAMQP")
    """

    @property
    def producer_pool(self) -> Any:
        if not _compat.producer_pool_created(self) and is_local(self.app):
            self._producer_pool = LaneProducerPool(self.app)
        return super().producer_pool

    publisher_pool = producer_pool


def lane_name(hostname: str | None, virtual_host: str | None) -> str:
    """The lane a ``local://host/vhost`` URL names (``""`` for plain ``local://``).

    Example::

        lane_name("shop", "/")   # 'shop'
    """
    vhost = (virtual_host or "").strip("/")
    return "/".join(part for part in (hostname or "", vhost) if part)


def is_local(app: Celery) -> bool:
    """True when ``app``'s broker is the local lane.

    Example::

        is_local(Celery(broker="local://"))   # True
    """
    url = app.conf.broker_url or ""
    return isinstance(url, str) and url.startswith("local://")


class LaneGuard(bootsteps.Step):  # type: ignore[misc]
    """Worker step that refuses the prefork pool on the local lane.

    Installed by ``install(app)``; prefork children cannot reach the memory of
    the process that owns the lane.

    Example::

        app.WorkController(pool="prefork")   # raises ImproperlyConfigured on local://
    """

    name = "celery_ext.local.LaneGuard"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        pool = getattr(w, "pool_cls", None)
        module = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        if is_local(w.app) and module.rsplit(".", 1)[-1] in ("prefork", "processes"):
            raise PoolNotAllowed(
                "celery_ext: the local lane (local://) lives in this process's memory and prefork "
                "children cannot reach it; start the worker with -P threads, -P solo or "
                "-P gevent (or use LocalWorker, which runs threads)"
            )
        super().__init__(w, **kwargs)


@dataclass
class DrainReport:
    """What :meth:`LocalWorker.stop` did.

    Example::

        report = worker.stop(timeout=5)
        report.dropped   # messages left unrun and discarded
    """

    drained: bool
    dropped: int
    dropped_ids: list[str] = field(default_factory=list)
    still_running: bool = False
    waited_s: float = 0.0


class WakeableTimer(timer2.Timer):  # type: ignore[misc]
    """Celery's timer thread, sleeping on its condition instead of ``time.sleep``.

    Stock ``timer2.Timer`` sleeps up to a whole tick (1 s) even when an earlier
    entry arrives or the worker stops; this one wakes for both.

    Example::

        LocalWorker(app)   # passes timer_cls=WakeableTimer to the worker
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = threading.Event()
        self._finished = threading.Event()

    def run(self) -> None:
        self.running = True
        self.scheduler = iter(self.schedule)
        try:
            while not self._stopping.is_set():
                delay = next(self)
                if delay:
                    if self.on_tick:
                        self.on_tick(delay)
                    with self.not_empty:
                        if not self._stopping.is_set():
                            self.not_empty.wait(delay)
        except Exception:
            logger.exception("celery_ext timer thread crashed")
        finally:
            self._finished.set()

    def stop(self) -> None:
        self._stopping.set()
        with self.not_empty:
            self.not_empty.notify_all()
        if self.running:
            self._finished.wait()
            self.join()
            self.running = False


class _LateStrategies(dict[str, Any]):
    """Consumer strategy table that learns tasks registered after the worker started.

    Stock embedded workers reject such tasks as unregistered until ``reload()``;
    an in-process worker shares ``app.tasks`` with the code defining them.
    """

    consumer: Any = None

    def __missing__(self, name: str) -> Any:
        consumer = self.consumer
        task = consumer.app.tasks.get(name) if consumer is not None else None
        if task is None:
            raise KeyError(name)
        app = consumer.app
        from ._tasks import apply_task_options

        apply_task_options(task)
        strategy = task.start_strategy(app, consumer)
        wrap = getattr(consumer, "celery_ext_wrap_strategy", None)
        strategy = self[name] = wrap(strategy) if wrap is not None else strategy
        task.__trace__ = build_tracer(name, task, app.loader, consumer.hostname, app=app)
        return strategy


def lane_loop(
    obj: Any,
    connection: Any,
    consumer: Any,
    blueprint: Any,
    hub: Any,
    qos: Any,
    heartbeat: Any,
    clock: Any,
    hbrate: float = 2.0,
    **kwargs: Any,
) -> None:
    """The consumer loop of a :class:`LocalWorker`: consume until the worker is stopped.

    Celery's blocking loop also ends when the process-wide shutdown flag is set.
    In a ``celery worker`` that serves ``durable=False`` tasks, SIGTERM sets it
    for the main worker, and the lane worker stopped with it at once: the lossy
    tasks that the draining durable tasks published were dropped. This loop ends
    only when :meth:`LocalWorker.stop` stops the lane worker, after the broker
    side drained. (The lane has no heartbeats, so none are checked.)

    Example::

        consumer.loop = lane_loop
    """
    consumer.on_message = obj.create_task_handler()
    consumer.consume()
    obj.on_ready()
    while blueprint.state == bootsteps.RUN and obj.connection:
        if qos.prev != qos.value:
            qos.update()
        obj.perform_pending_operations()
        try:
            connection.drain_events(timeout=2.0)
        except TimeoutError:
            pass
        except OSError:
            if blueprint.state == bootsteps.RUN:
                raise


def _embedded_classes(
    app: Celery, ready: threading.Event, lane_url: str | None = None
) -> tuple[Any, Any]:
    """The WorkController and Consumer subclasses of one LocalWorker.

    ``lane_url``: consume that local lane instead of the app's broker (an app
    whose ``durable=False`` tasks run in this process).
    """
    consumer_base = symbol_by_name(app.conf.worker_consumer)

    class EmbeddedConsumer(consumer_base):  # type: ignore[misc, valid-type]
        Strategies = _LateStrategies

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.strategies.consumer = self
            self.loop = lane_loop  # stops when this worker stops, not at SIGTERM

        def connection_for_read(self, heartbeat: Any = None) -> Any:
            if lane_url is None:
                return super().connection_for_read(heartbeat)
            return self.ensure_connected(
                self.app.connection_for_read(url=lane_url, transport="local", heartbeat=heartbeat)
            )

    class EmbeddedWorkController(app.WorkController):  # type: ignore[misc]
        celery_ext_embedded = True  # LocalWorker.stop() drains; the Drain step stands aside

        def should_use_eventloop(self) -> bool:
            # Celery decides from the app's broker; the lane is consumed by polling.
            return lane_url is None and bool(super().should_use_eventloop())

        def on_consumer_ready(self, consumer: Any) -> None:
            super().on_consumer_ready(consumer)
            ready.set()

    return EmbeddedWorkController, EmbeddedConsumer


class LocalWorker:
    """Run Celery's real worker for a local-lane app inside this process.

    A threads pool by default; acks, task signals, task events and the result
    backend work as in ``celery worker``. Use as a context manager or call
    :meth:`start` / :meth:`stop` (e.g. from a web app's startup and shutdown hooks).
    :meth:`stop` lets queued work finish within ``drain_timeout`` and returns a
    :class:`DrainReport` with the messages it had to drop.

    Example::

        with LocalWorker(app, concurrency=4) as worker:
            add.delay(1, 2)
            worker.join(timeout=5)      # re-raises the first task failure
    """

    def __init__(
        self,
        app: Celery,
        *,
        concurrency: int = 4,
        pool: str = "threads",
        queues: Iterable[str] | None = None,
        hostname: str | None = None,
        loglevel: str | int = "WARNING",
        drain_timeout: float | None = None,
        **worker_options: Any,
    ) -> None:
        if pool not in ("threads", "solo"):
            raise ImproperlyConfigured(
                f"LocalWorker runs the 'threads' or 'solo' pool, not {pool!r}: prefork "
                "children cannot reach this process's memory, and green pools belong in a "
                "monkeypatched `celery worker -P gevent` process"
            )
        self.app = app
        # An app on Redis/RabbitMQ: the worker serves its local lane (durable=False tasks).
        self.lane_url = None if _is_local(app) else "local://"
        self.lane = lane_of(app, self.lane_url)
        settings = settings_of(app)
        self.drain_timeout_s = settings.drain_timeout if drain_timeout is None else drain_timeout
        self.queues = list(queues) if queues else None
        self.hostname = hostname or f"local-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self._options = dict(
            concurrency=concurrency,
            pool=pool,
            loglevel=loglevel,
            without_mingle=True,
            without_gossip=True,
            **worker_options,
        )
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._controller: Any = None
        self._failures: list[BaseException] = []

    # -- lifecycle ----------------------------------------------------------
    def start(self, timeout: float | None = 30.0) -> LocalWorker:
        """Start the worker thread and wait until it consumes (``timeout`` None: no limit).

        Raises :class:`RuntimeError` when it did not start in time, or stopped
        while starting (at once, not at the timeout).

        Example::

            worker = LocalWorker(app).start()
        """
        if self._thread is not None:
            raise RuntimeError("LocalWorker already started")
        app = self.app
        app.finalize()
        options = dict(self._options)
        if options["pool"] == "threads":
            options["pool"] = TimeoutPool
        options.setdefault("timer_cls", WakeableTimer)
        if self.queues:
            options["queues"] = self.queues
        controller_cls, consumer_cls = _embedded_classes(app, self._ready, self.lane_url)
        controller = controller_cls(
            app=app,
            hostname=self.hostname,
            ready_callback=None,
            consumer_cls=consumer_cls,
            **options,
        )
        self._controller = controller
        signals.task_failure.connect(self._on_failure, weak=False)

        def run() -> None:
            app.set_current()  # the consumer runs here; see TimeoutPool
            controller.start()

        self._thread = threading.Thread(target=run, name=f"celery_ext-{self.hostname}", daemon=True)
        self._thread.start()
        deadline = None if timeout is None else monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive():
                self._thread = None
                self._disconnect()
                raise RuntimeError(f"embedded worker {self.hostname} stopped while starting")
            if deadline is not None and monotonic() > deadline:
                self._disconnect()
                raise RuntimeError(f"embedded worker {self.hostname} did not start in {timeout}s")
        # The worker marks the whole process as "inside a worker", where result.get()
        # is refused; the embedding code is not a task (Celery's own embedded test
        # worker resets it the same way).
        _compat.set_task_join_will_block(False)
        return self

    def consumed_queues(self) -> list[str]:
        """Names of the queues this worker consumes.

        Example::

            worker.consumed_queues()   # ['celery']
        """
        if self._controller is not None:
            return sorted(q.name for q in self._controller.app.amqp.queues.consume_from.values())
        return self.queues or [self.app.conf.task_default_queue]

    def stop(self, timeout: float | None = None) -> DrainReport:
        """Drain queued work within ``timeout`` (default ``drain_timeout``), then stop.

        Messages still queued (or handed back unacked) when the deadline passes
        are dropped: logged with their ids and counted in the report.

        Example::

            report = worker.stop(timeout=10)
            print(report.dropped, report.drained)
        """
        if self._thread is None:
            return DrainReport(drained=True, dropped=0)
        timeout = self.drain_timeout_s if timeout is None else timeout
        start = monotonic()
        queues = self.consumed_queues()
        lane = self.lane
        deadline = start + timeout  # parked messages due later cannot run before it anyway
        drained = self._wait(lambda: self._idle(queues, deadline) or self._dead(), timeout)
        grace = max(0.0, timeout - (monotonic() - start)) + STOP_GRACE_S
        pool = getattr(self._controller, "pool", None)
        if isinstance(pool, TimeoutPool):
            pool.join_timeout_s = grace
        self._controller.stop(in_sighandler=False)
        lane.wake()
        self._thread.join(grace)
        still_running = self._thread.is_alive() or (
            isinstance(pool, TimeoutPool) and pool.alive_threads() > 0
        )
        self._disconnect()
        # The lane object, never a connection: with an app on Redis or RabbitMQ,
        # queues of the same names on the broker belong to every worker of the cluster.
        dropped_ids = lane.discard(queues)
        report = DrainReport(
            drained=drained and not dropped_ids,
            dropped=len(dropped_ids),
            dropped_ids=dropped_ids,
            still_running=still_running,
            waited_s=monotonic() - start,
        )
        if dropped_ids:
            logger.warning(
                "celery_ext local lane: dropped %d queued message(s) at stop after %.1fs: %s",
                len(dropped_ids),
                report.waited_s,
                ", ".join(dropped_ids[:20]) + (" ..." if len(dropped_ids) > 20 else ""),
            )
        self._thread = None
        return report

    def _idle(self, queues: list[str], due_before: float | None = None) -> bool:
        """Nothing queued, unacked, reserved or running for this app."""
        app = self.app
        if not self.lane.idle(queues, due_before):
            return False
        # Early-acked tasks are settled on the lane while they still run: ask the worker.
        for requests in (worker_state.active_requests, worker_state.reserved_requests):
            if any(_compat.request_app(r) is app for r in list(requests)):
                return False
        return True

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        # Woken at once by lane traffic; the short re-check covers a task that
        # finishes without touching the lane (early ack).
        deadline = monotonic() + timeout
        while not predicate():
            remaining = deadline - monotonic()
            if remaining <= 0:
                return False
            self.lane.wait_until(predicate, min(remaining, 0.02))
        return True

    def _dead(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def _disconnect(self) -> None:
        signals.task_failure.disconnect(self._on_failure)

    def __enter__(self) -> LocalWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- testing aid --------------------------------------------------------
    def _on_failure(
        self, sender: Any = None, exception: BaseException | None = None, **_: Any
    ) -> None:
        if getattr(sender, "app", None) is self.app and exception is not None:
            self._failures.append(exception)
            self.lane.wake()

    def join(self, queue: str | None = None, timeout: float = 10.0, fail_fast: bool = True) -> None:
        """Wait until ``queue`` (default: every consumed queue) is empty and nothing is unacked.

        With ``fail_fast`` the first task failure since the last ``join`` is
        re-raised as soon as it happens. Raises :class:`TimeoutError` when the
        lane is still busy after ``timeout`` seconds.

        Example::

            add.delay(1, "a")
            worker.join(timeout=5)     # raises the task's TypeError
        """
        queues = [queue] if queue else self.consumed_queues()
        lane = self.lane

        def done() -> bool:
            return bool(fail_fast and self._failures) or self._idle(queues)

        if not self._wait(done, timeout):
            raise TimeoutError(
                f"local lane still busy after {timeout}s: "
                + ", ".join(f"{q}={lane.depth(q)} queued" for q in queues)
                + f", {lane.unacked()} unacked"
            )
        if fail_fast and self._failures:
            raise self._failures.pop(0)


def _message_id(raw: Message) -> str:
    """The task id of a lane message (its delivery tag when it names none)."""
    headers = raw.get("headers") or {}
    return str(headers.get("id") or raw.get("properties", {}).get("delivery_tag"))


def _is_local(app: Celery) -> bool:
    return str(app.conf.broker_url or "").startswith("local://")


def lane_of(app: Celery, url: str | None = None) -> Lane:
    """The lane ``app``'s broker URL (or ``url``, a ``local://`` one) points at.

    Example::

        lane_of(app).depth("celery")
    """
    options = {"transport": "local"} if url else {}
    with app.connection_for_write(url=url, **options) as conn:
        transport = conn.transport
        if not isinstance(transport, Transport):
            raise ImproperlyConfigured(
                f"{app.main!r} does not use local:// (broker {conn.as_uri()})"
            )
        return transport.lane
