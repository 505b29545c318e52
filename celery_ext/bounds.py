"""Producer-side queue bounds: a maximum length per queue, checked when publishing.

What: a publish to a queue that already holds its maximum number of waiting
messages is refused with :class:`~celery_ext.errors.QueueFull` (``.queue``,
``.limit``, ``.depth``), or waits for room, or is dropped and counted, as the
``queue_full_policy`` setting says. :func:`enqueue_many` publishes many tasks
in chunks, keeping the bound exact, several times faster than ``apply_async``.

Where a bound comes from (the first that is set wins):

1. the call: ``task.apply_async(args, max_queued=100)`` (Celery passes unknown
   ``apply_async`` options down to kombu as message properties; the transport
   takes it out before the message is stored, so workers never see it);
2. the task: ``@app.task(max_queued=100)`` (unknown task options become task
   attributes; ``task_annotations`` work too); it bounds whatever queue the
   task is routed to;
3. the ``queue_limits`` setting: ``{"emails": 10_000}``.

How, per broker (``install(app)`` selects the transports below for
``redis://``, ``rediss://``, ``amqp://``, ``pyamqp://`` and ``amqps://`` URLs when
``broker_transport`` is unset; without a bound they publish exactly as kombu's):

- **Redis** (:class:`~celery_ext.transports.redis.RedisTransport`): instead of
  kombu's ``LPUSH``, a Lua script sums ``LLEN`` over the queue's priority
  lists and pushes only while the sum is below the bound: atomic on the
  server, exact for any number of producers. :func:`~celery_ext.enqueue_many` sends one
  script call per chunk that pushes as many messages as fit and reports how
  many it took.
- **RabbitMQ** (:class:`~celery_ext.transports.amqp.AmqpTransport`): queues
  named in ``queue_limits`` are declared with ``x-max-length`` and
  ``x-overflow: reject-publish``, and
  ``install`` turns on publisher confirms, so the broker refuses the message
  atomically and its bare ``MessageNacked`` becomes ``QueueFull``. Per-task
  and per-call bounds cannot be declared (one queue, one set of arguments):
  they are checked with a passive declare before a confirmed publish (so the
  next check counts it): exact for one producer, it may overshoot by the
  number of concurrent producers.
  A declared ``x-max-length`` is a hard cap a larger per-call bound cannot lift.
- **Local lane** (``local://``): ``queue_limits`` and ``max_queued`` bound its
  queues natively (never above ``lane_max_queued``) under ``queue_full_policy``;
  the lane's own ``lane_max_queued`` bound follows ``lane_full_policy``.

Policies when full: ``raise`` raises ``QueueFull`` at once; ``block`` retries
with short waits (5 ms doubling to 50 ms) for up to ``queue_block_timeout``
seconds without progress, then raises ``QueueFull`` with ``waited_s``;
``shed`` drops the message, counts it (:func:`shed_count`) and returns as if
it had been sent: ``apply_async`` still returns an ``AsyncResult``, whose task
will never run.

Limits:

- Depth counts messages waiting in the queue. Messages delivered to a worker
  and not yet acked, and messages parked by :mod:`celery_ext.delays`
  (``celery_ext.parked:*`` sorted sets), do not count; when they come back
  (redelivery, due time) they ignore the bound, as kombu's restores do.
- Retries, chains and callbacks are publishes too. Celery rejects (drops) a
  task whose ``self.retry()`` publish fails, so give queues that receive
  retries a ``block`` policy or head-room.
- RabbitMQ refuses to redeclare an existing queue with other arguments
  (``PRECONDITION_FAILED``): adding a queue to ``queue_limits`` after it was
  created raises :class:`~celery_ext.errors.ConfigurationError` saying so;
  delete the (drained) queue, or bound it with a RabbitMQ policy instead.
  Every process that declares the queue (workers too) must use the same limit.
- kombu derives the transport from the URL again after a failover switch, so
  a connection that failed over publishes unbounded; multi-URL brokers and
  mixed ``broker_read_url``/``broker_write_url`` schemes are left stock
  (a warning is logged when ``queue_limits`` is set).

Example::

    app = Celery("shop", broker="redis://127.0.0.1:6379/0")
    celery_ext.install(app, queue_limits={"emails": 10_000}, queue_full_policy="raise")

    @app.task(queue="emails")
    def send_email(to): ...

    try:
        send_email.delay("a@example.com")
    except celery_ext.QueueFull as exc:
        print(exc.queue, exc.limit, exc.depth)
    ids = celery_ext.enqueue_many(send_email, [(to,) for to in recipients])
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from celery import Celery
from celery.signals import after_task_publish

from ._settings import Settings
from .delays import RETRY_HEADER, eta_delay, mark_parked
from .errors import ConfigurationError, QueueFull

__all__ = [
    "BOUNDS_OPTION",
    "CONFIRM_TIMEOUT_S",
    "LIMIT_KW",
    "OPTION",
    "BatchQueueFull",
    "Bounds",
    "Collecting",
    "Pending",
    "Publish",
    "check_limit",
    "groups",
    "offer",
    "shed_count",
]

logger = logging.getLogger(__name__)


#: The ``apply_async`` / ``@app.task`` option naming a per-call / per-task bound.
OPTION = "max_queued"

#: Key under ``broker_transport_options`` that carries an app's :class:`Bounds`.
BOUNDS_OPTION = "celery_ext_bounds"

LIMIT_KW = "_celery_ext_max_queued"  # a call's bound, from basic_publish to _put
_FIRST_WAIT_S = 0.005
_MAX_WAIT_S = 0.05
CONFIRM_TIMEOUT_S = 30.0

T = TypeVar("T")


def check_limit(value: object, where: str) -> int:
    """``value`` when it is a valid bound (an int >= 1), else ConfigurationError naming ``where``.

    Example::

        check_limit(5, "apply_async(max_queued)")   # 5
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{where}={value!r}: expected an integer >= 1")
    return value


class Bounds:
    """The queue bounds of one app: limits, full policy and shed counters.

    Created by ``install(app)`` and handed to the transports through
    ``broker_transport_options``; thread-safe.

    Example::

        bounds = Bounds.of(app)
        bounds.limit("emails", "shop.send_email")   # call > task > setting, or None
        bounds.shed("emails")                       # messages dropped by policy "shed"
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.limits: Mapping[str, int] = dict(settings.queue_limits)
        self.policy: str = settings.queue_full_policy
        self.block_timeout_s = settings.queue_block_timeout
        self.eta_horizon_s = settings.eta_horizon
        self.park_on_publish = settings.park_on_publish
        self.park_prefix = settings.park_prefix
        #: Redis: replicas a publish waits for (``WAIT``), and for how long.
        self.replica_acks = settings.replica_acks
        self.replica_ack_timeout_s = settings.replica_ack_timeout
        #: RabbitMQ: ``x-max-length`` of the reject-publish queues declared so far.
        self.declared: dict[str, int] = {}
        self._shed: dict[str, int] = {}
        self._full: dict[str, int] = {}
        self._unrecorded: list[tuple[Any, str, str]] = []  # Redis: see transports.redis
        self._lock = threading.Lock()
        self._parking_here = threading.local()  # the id this thread's publish just parked
        self._listening = False

    def __repr__(self) -> str:
        # kombu keys connection pools on repr(transport_options): the id keeps one per
        # app. Readable, as `inspect conf` (Flower's Config tab) shows it.
        return f"{self.__json__()} [{id(self):x}]"

    def __json__(self) -> str:
        # `inspect stats` (and so Flower's Broker tab) serialises the transport options.
        limits = ", ".join(f"{q} {n}" for q, n in self.limits.items()) or "none"
        return f"celery_ext queue limits: {limits}; when full: {self.policy}"

    @classmethod
    def of(cls, app: Celery) -> Bounds:
        """The bounds ``install(app)`` created for ``app``.

        Example::

            Bounds.of(app).policy   # 'raise'
        """
        bounds = (app.conf.broker_transport_options or {}).get(BOUNDS_OPTION)
        if not isinstance(bounds, Bounds):
            raise ConfigurationError("celery_ext.install(app) has not been called for this app")
        return bounds

    def park_delay(self, headers: Mapping[str, Any] | None, horizon_s: float) -> float | None:
        """Seconds to park a message for, or None to queue it as usual.

        Producers park (``park_on_publish``) an ETA further than ``horizon_s``,
        and a celery_ext retry with any delay (its wait never sits in a worker).

        Example::

            bounds.park_delay({"eta": "2030-01-01T00:00:00+00:00"}, 300)   # > 0
        """
        headers = headers or {}
        eta = headers.get("eta") if self.park_on_publish else None
        if not eta:
            return None
        try:
            delay = eta_delay(eta, self.app.timezone)
        except ValueError:
            return None  # the worker reports a malformed ETA, as stock Celery does
        if delay > horizon_s or (delay > 0 and headers.get(RETRY_HEADER) is not None):
            return delay
        return None

    def parking(self, headers: dict[str, Any]) -> None:
        """Mark a message a producer is about to park: its header, then its ``task-parked`` event.

        With ``task_send_sent_event`` on (Flower then lists sent tasks), the publish
        also sends ``task-parked`` (``eta``): Flower shows the task as PARKED until a
        worker receives it back, instead of PENDING.

        Example::

            bounds.parking(message["headers"])   # then park it
        """
        mark_parked(headers)
        self._parking_here.task_id = headers.get("id")
        if not self._listening:  # from the first park on: other publishes pay nothing
            self._listening = True
            # Weakly connected: gone with this Bounds (with the app's configuration).
            uid = f"celery_ext.parked:{id(self)}"
            after_task_publish.connect(self._after_publish, dispatch_uid=uid)

    def _after_publish(self, sender: object = None, headers: Any = None, **_: Any) -> None:
        task_id = getattr(self._parking_here, "task_id", None)
        if task_id is None or not isinstance(headers, Mapping) or headers.get("id") != task_id:
            return
        self._parking_here.task_id = None
        if not self.app.conf.task_send_sent_event:
            return
        try:  # never blocks a publish: the publishing thread holds a pool producer already
            with self.app.producer_pool.acquire(block=False) as producer:
                self._dispatcher.publish(
                    "task-parked",
                    {"uuid": task_id, "name": headers.get("task"), "eta": headers.get("eta")},
                    producer,
                )
        except Exception:  # monitoring must not change what the producer does
            logger.debug("celery_ext: could not send task-parked for %s", task_id, exc_info=True)

    @cached_property
    def _dispatcher(self) -> Any:
        # Celery sends task-sent the same way: a disabled dispatcher, a pool producer.
        return self.app.events.Dispatcher(enabled=False)

    def task_limit(self, name: object) -> int | None:
        """The ``max_queued`` attribute of the task called ``name``, or None.

        Example::

            bounds.task_limit("shop.send_email")   # 100 for @app.task(max_queued=100)
        """
        if not isinstance(name, str):
            return None
        try:
            task = self.app.tasks.get(name)
        except RuntimeError:  # autofinalize=False and not finalized: no registry yet
            return None
        value = getattr(task, OPTION, None)
        return None if value is None else check_limit(value, f"@app.task({OPTION}) of {name}")

    def limit(self, queue: str, task_name: object = None, call: int | None = None) -> int | None:
        """The bound of a publish to ``queue``: ``call``, else the task's, else the setting's.

        Example::

            bounds.limit("emails", "shop.send_email", call=5)   # 5
        """
        if call is not None:
            return call
        task = self.task_limit(task_name)
        return task if task is not None else self.limits.get(queue)

    def queue_for(self, exchange: str, routing_key: str) -> str | None:
        """The queue a direct publish to (``exchange``, ``routing_key``) lands in, if known.

        Example::

            bounds.queue_for("", "emails")   # 'emails'
        """
        if not exchange:
            return routing_key
        for queue in list(self.app.amqp.queues.values()):
            ex = queue.exchange
            if ex is not None and ex.name == exchange and queue.routing_key == routing_key:
                return str(queue.name)
        return None

    def count_shed(self, queue: str, n: int) -> None:
        """Record ``n`` messages for ``queue`` dropped by the ``shed`` policy."""
        with self._lock:
            self._shed[queue] = self._shed.get(queue, 0) + n
        logger.debug("celery_ext: shed %d message(s) for full queue %r", n, queue)

    def keep_unrecorded(self, item: tuple[Any, str, str]) -> None:
        """Keep a Redis message (payload, exchange, routing key) a lost connection dropped.

        Example::

            bounds.keep_unrecorded((payload, "", "celery"))
        """
        with self._lock:
            self._unrecorded.append(item)

    def take_unrecorded(self) -> list[tuple[Any, str, str]]:
        """Take every message :meth:`keep_unrecorded` kept, oldest first.

        Example::

            bounds.take_unrecorded()   # [(payload, "", "celery")]
        """
        with self._lock:
            items, self._unrecorded = self._unrecorded, []
        return items

    def count_full(self, queue: str) -> None:
        """Count one publish to ``queue`` refused with QueueFull."""
        with self._lock:
            self._full[queue] = self._full.get(queue, 0) + 1

    def full(self, queue: str | None = None) -> int:
        """Publishes refused with QueueFull for ``queue`` (all queues when None).

        Example::

            bounds.full("emails")   # 2
        """
        with self._lock:
            return sum(self._full.values()) if queue is None else self._full.get(queue, 0)

    def shed(self, queue: str | None = None) -> int:
        """Messages dropped by the ``shed`` policy for ``queue`` (all queues when None).

        Example::

            bounds.shed("emails")   # 3
        """
        with self._lock:
            return sum(self._shed.values()) if queue is None else self._shed.get(queue, 0)


def shed_count(app: Celery, queue: str | None = None) -> int:
    """Messages this process dropped for ``queue`` (every queue when None) by policy ``shed``.

    Example::

        celery_ext.install(app, queue_limits={"emails": 100}, queue_full_policy="shed")
        ...
        shed_count(app, "emails")   # messages published while "emails" was full
    """
    return Bounds.of(app).shed(queue)


class BatchQueueFull(QueueFull):
    """:func:`enqueue_many` stopped at a full queue; ``accepted_ids`` were queued, the rest not.

    A :class:`~celery_ext.errors.QueueFull`, so ``except QueueFull`` catches it.

    Example::

        try:
            enqueue_many(task, rows)
        except BatchQueueFull as exc:
            queued = exc.accepted_ids    # these will run; the rest of rows was refused
    """

    def __init__(
        self,
        queue: str,
        limit: int,
        depth: int,
        waited_s: float = 0.0,
        accepted_ids: Sequence[str] = (),
    ) -> None:
        super().__init__(queue, limit, depth, waited_s)
        self.accepted_ids = list(accepted_ids)

    def __reduce__(self) -> Any:
        args = (self.queue, self.limit, self.depth, self.waited_s, self.accepted_ids)
        return (type(self), args)


# -- the policy loop, shared by every broker and by single and batch publishes --
Attempt = Callable[[list[T]], tuple[list[T], list[T], int]]


def offer(
    bounds: Bounds, queue: str, limit: int, items: list[T], attempt: Attempt[T]
) -> tuple[list[T], QueueFull | None]:
    """Offer ``items`` to a bounded queue under the app's policy.

    ``attempt(items)`` publishes what fits and returns (accepted, refused, depth).
    Returns the accepted items and, for ``raise``/``block``, the refusal to raise.
    """
    accepted: list[T] = []
    start = time.monotonic()
    deadline = start + bounds.block_timeout_s
    wait_s = _FIRST_WAIT_S
    while True:
        ok, items, depth = attempt(items)
        accepted += ok
        if not items:
            return accepted, None
        if bounds.policy == "shed":
            bounds.count_shed(queue, len(items))
            return accepted, None
        if bounds.policy == "raise":
            bounds.count_full(queue)
            return accepted, QueueFull(queue, limit, depth)
        now = time.monotonic()
        if ok:  # progress: wait for room anew
            deadline, wait_s = now + bounds.block_timeout_s, _FIRST_WAIT_S
        if now >= deadline:
            bounds.count_full(queue)
            return accepted, QueueFull(queue, limit, depth, now - start)
        time.sleep(min(wait_s, deadline - now))
        wait_s = min(wait_s * 2, _MAX_WAIT_S)


@dataclass
class Pending:
    """A message waiting to be pushed (Redis) or published (RabbitMQ)."""

    queue: str
    limit: int | None
    task_id: str | None  # None: not a task message (e.g. a task-sent event)
    payload: Any  # Redis: (priority list, serialized message); RabbitMQ: publish args
    hard_limit: int | None = None  # RabbitMQ: the declared x-max-length, if any


def groups(items: list[Pending]) -> list[list[Pending]]:
    """The messages per queue and bounds, each group in publishing order."""
    groups: dict[tuple[str, int | None, int | None], list[Pending]] = {}
    for item in items:
        groups.setdefault((item.queue, item.limit, item.hard_limit), []).append(item)
    return list(groups.values())


class Collecting:
    """Channel mixin: hold publishes back (``collecting``), then ``flush`` them in chunks."""

    _collector: list[Pending] | None = None

    @contextmanager
    def collecting(self) -> Iterator[list[Pending]]:
        """Hold this channel's publishes back until :meth:`flush`.

        Example::

            with channel.collecting() as held:
                producer.publish(...)
            ids, refusal = channel.flush(held)
        """
        collector: list[Pending] = []
        self._collector = collector
        try:
            yield collector
        finally:
            self._collector = None

    def flush(self, held: list[Pending]) -> tuple[list[str], QueueFull | None]:
        """Publish what :meth:`collecting` held; return accepted task ids and any refusal.

        Example::

            ids, refusal = channel.flush(held)
        """
        ids: list[str] = []
        first_refusal: QueueFull | None = None
        items, held[:] = list(held), []
        for group in groups(items):
            accepted, refusal = self._flush_run(group)
            ids += [p.task_id for p in accepted if p.task_id is not None]
            first_refusal = first_refusal or refusal
        return ids, first_refusal

    def _flush_run(self, run: list[Pending]) -> tuple[list[Pending], QueueFull | None]:
        raise NotImplementedError


# -- RabbitMQ -------------------------------------------------------------------
@dataclass
class Publish:
    msg: Any
    exchange: str
    routing_key: str
    kwargs: dict[str, Any]
