"""The local lane: an app's in-process queues, bounded, with a wake-up condition.

For jobs that may be lost. Messages live in the memory of the process that
published them and die with it; in exchange there is no server, no polling and
no serialisation detour. Select it with ``broker="local://"`` after
``celery_ext.install(app)``; ``celery_ext.transports.local`` is the kombu
transport on top of a lane, ``celery_ext.embedded`` the worker that runs in the
same process.

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
  warning per task (it waits, up to the bound, for a :class:`~celery_ext.LocalWorker`),
  and what is still on the lane when the process exits is counted in one warning.

Limits: the lane cannot cross processes, so the prefork pool (whose children
cannot reach the parent's memory) is refused; use ``-P threads``, ``solo`` or
``gevent``. Exchanges support direct, topic and fanout routing; no priorities.

Example::

    app = Celery("shop", broker="local://")
    celery_ext.install(app, lane_max_queued=1000, lane_full_policy="raise")
    lane_of(app).depth("celery")
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any

from celery import Celery, bootsteps
from celery.exceptions import ImproperlyConfigured
from kombu.transport import virtual

from . import _compat
from ._settings import Settings
from .errors import LaneNotInstalled, PoolNotAllowed, QueueFull

__all__ = ["LANES_OPTION", "Lane", "LaneGuard", "Lanes", "is_local", "lane_name", "lane_of"]

logger = logging.getLogger(__name__)

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

    name = "celery_ext.lane.LaneGuard"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        if is_local(w.app) and _compat.pool_kind(getattr(w, "pool_cls", None)) == "prefork":
            raise PoolNotAllowed(
                "celery_ext: the local lane (local://) lives in this process's memory and prefork "
                "children cannot reach it; start the worker with -P threads, -P solo or "
                "-P gevent (or use LocalWorker, which runs threads)"
            )
        super().__init__(w, **kwargs)


def lane_of(app: Celery, url: str | None = None) -> Lane:
    """The lane ``app``'s broker URL (or ``url``, a ``local://`` one) points at.

    Example::

        lane_of(app).depth("celery")
    """
    options = {"transport": "local"} if url else {}
    with app.connection_for_write(url=url, **options) as conn:
        lane = getattr(conn.transport, "lane", None)
        if not isinstance(lane, Lane):
            raise ImproperlyConfigured(
                f"{app.main!r} does not use local:// (broker {conn.as_uri()})"
            )
        return lane


def _message_id(raw: Message) -> str:
    """The task id of a lane message (its delivery tag when it names none)."""
    headers = raw.get("headers") or {}
    return str(headers.get("id") or raw.get("properties", {}).get("delivery_tag"))
