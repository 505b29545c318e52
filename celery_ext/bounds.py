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

- **Redis** (:class:`~celery_ext.redis_transport.RedisTransport`): instead of
  kombu's ``LPUSH``, a Lua script sums ``LLEN`` over the queue's priority
  lists and pushes only while the sum is below the bound: atomic on the
  server, exact for any number of producers. :func:`enqueue_many` sends one
  script call per chunk that pushes as many messages as fit and reports how
  many it took.
- **RabbitMQ** (:class:`AmqpTransport`): queues named in ``queue_limits`` are
  declared with ``x-max-length`` and ``x-overflow: reject-publish``, and
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

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, TypeVar
from urllib.parse import urlparse

import kombu.connection
from amqp.exceptions import MessageNacked, NotFound, PreconditionFailed
from celery import Celery
from celery.app.task import Task
from celery.signals import after_task_publish
from celery.utils.functional import maybe_list
from celery.utils.saferepr import saferepr
from kombu.transport import pyamqp
from kombu.utils.uuid import uuid

from . import _compat
from ._settings import PREFIX, Settings
from .delays import RETRY_HEADER, AmqpParking, eta_delay, mark_parked
from .errors import ConfigurationError, QueueFull
from .sizes import SizeLimited

__all__ = [
    "OPTION",
    "AmqpTransport",
    "AmqpsTransport",
    "BatchQueueFull",
    "Bounds",
    "enqueue_many",
    "setup",
    "shed_count",
]

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    # The Redis transport lives in celery_ext.redis_transport, imported only when a
    # redis:// app uses it; "celery_ext.bounds:RedisTransport" keeps working.
    if name in ("RedisChannel", "RedisTransport", "RedissTransport"):
        from . import redis_transport

        return getattr(redis_transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The ``apply_async`` / ``@app.task`` option naming a per-call / per-task bound.
OPTION = "max_queued"

#: Key under ``broker_transport_options`` that carries an app's :class:`Bounds`.
BOUNDS_OPTION = "celery_ext_bounds"

LIMIT_KW = "_celery_ext_max_queued"  # a call's bound, from basic_publish to _put
_FIRST_WAIT_S = 0.005
_MAX_WAIT_S = 0.05
_CONFIRM_TIMEOUT_S = 30.0

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
        #: RabbitMQ: ``x-max-length`` of the reject-publish queues declared so far.
        self.declared: dict[str, int] = {}
        self._shed: dict[str, int] = {}
        self._full: dict[str, int] = {}
        self._unrecorded: list[tuple[Any, str, str]] = []  # Redis: see redis_delivery
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


def _offer(
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
class _Pending:
    """A message waiting to be pushed (Redis) or published (RabbitMQ)."""

    queue: str
    limit: int | None
    task_id: str | None  # None: not a task message (e.g. a task-sent event)
    payload: Any  # Redis: (priority list, serialized message); RabbitMQ: publish args
    hard_limit: int | None = None  # RabbitMQ: the declared x-max-length, if any


def _groups(items: list[_Pending]) -> list[list[_Pending]]:
    """The messages per queue and bounds, each group in publishing order."""
    groups: dict[tuple[str, int | None, int | None], list[_Pending]] = {}
    for item in items:
        groups.setdefault((item.queue, item.limit, item.hard_limit), []).append(item)
    return list(groups.values())


class _Collecting:
    """Channel mixin: hold publishes back (``collecting``), then ``flush`` them in chunks."""

    _collector: list[_Pending] | None = None

    @contextmanager
    def collecting(self) -> Iterator[list[_Pending]]:
        """Hold this channel's publishes back until :meth:`flush`.

        Example::

            with channel.collecting() as held:
                producer.publish(...)
            ids, refusal = channel.flush(held)
        """
        collector: list[_Pending] = []
        self._collector = collector
        try:
            yield collector
        finally:
            self._collector = None

    def flush(self, held: list[_Pending]) -> tuple[list[str], QueueFull | None]:
        """Publish what :meth:`collecting` held; return accepted task ids and any refusal.

        Example::

            ids, refusal = channel.flush(held)
        """
        ids: list[str] = []
        first_refusal: QueueFull | None = None
        items, held[:] = list(held), []
        for group in _groups(items):
            accepted, refusal = self._flush_run(group)
            ids += [p.task_id for p in accepted if p.task_id is not None]
            first_refusal = first_refusal or refusal
        return ids, first_refusal

    def _flush_run(self, run: list[_Pending]) -> tuple[list[_Pending], QueueFull | None]:
        raise NotImplementedError


# -- RabbitMQ -------------------------------------------------------------------
@dataclass
class _Publish:
    msg: Any
    exchange: str
    routing_key: str
    kwargs: dict[str, Any]


class AmqpChannel(_Collecting, SizeLimited, _compat.AmqpChannel):
    """kombu's py-amqp channel with queue bounds; see the module docstring."""

    _probe: Any = None
    _sent = 0  # publishes since confirm.select: the broker's delivery tags

    @property
    def bounds(self) -> Bounds | None:
        client = getattr(self.connection, "client", None)
        bounds = client.transport_options.get(BOUNDS_OPTION) if client is not None else None
        return bounds if isinstance(bounds, Bounds) else None

    def queue_declare(
        self,
        queue: str = "",
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = True,
        nowait: bool = False,
        arguments: dict[str, Any] | None = None,
        argsig: str = "BsbbbbbF",
    ) -> Any:
        bounds = self.bounds
        limit = bounds.limits.get(queue) if bounds and queue and not passive else None
        if limit is not None:
            arguments = {**(arguments or {}), "x-max-length": limit, "x-overflow": "reject-publish"}
        try:
            result = super().queue_declare(
                queue, passive, durable, exclusive, auto_delete, nowait, arguments, argsig
            )
        except PreconditionFailed as exc:
            if limit is None:
                raise
            raise ConfigurationError(
                f"RabbitMQ refused to declare queue {queue!r} with x-max-length={limit} and "
                f"x-overflow=reject-publish ({PREFIX}queue_limits): it exists with other "
                f"arguments ({exc}). A queue's arguments cannot change: delete the drained "
                "queue, or drop it from queue_limits and bound it with a RabbitMQ policy"
            ) from exc
        args = arguments or {}
        rejects = str(args.get("x-overflow", "")).startswith("reject-publish")
        if bounds and queue and "x-max-length" in args and rejects:
            bounds.declared[queue] = int(args["x-max-length"])
        return result

    def close(self, *args: Any, **kwargs: Any) -> Any:
        probe, self._probe = self._probe, None
        if probe is not None and probe.is_open:
            with contextlib.suppress(Exception):  # the connection may be gone already
                probe.close()
        return super().close(*args, **kwargs)

    def confirm_select(self, nowait: bool = False) -> Any:
        self._sent = 0
        return super().confirm_select(nowait)

    def send_publish(self, *args: Any, **kwargs: Any) -> Any:
        if self.confirm_selected:
            self._sent += 1
        return super().send_publish(*args, **kwargs)

    def basic_publish(
        self, msg: Any, exchange: str = "", routing_key: str = "", **kwargs: Any
    ) -> Any:
        return self._route_publish(False, msg, exchange, routing_key, kwargs)

    def basic_publish_confirm(
        self, msg: Any, exchange: str = "", routing_key: str = "", **kwargs: Any
    ) -> Any:
        return self._route_publish(True, msg, exchange, routing_key, kwargs)

    _parking_now = False

    @cached_property
    def _parking(self) -> AmqpParking | None:
        try:
            bounds = self.bounds
            return AmqpParking(self, prefix=bounds.park_prefix if bounds else "celery_ext")
        except RuntimeError:  # kombu too old for prefixed delay levels: queue ETAs as usual
            return None

    def _park_at_publish(self, msg: Any, exchange: str, routing_key: str) -> bool:
        """Park a far-future ETA message instead of queueing it (see backpressure)."""
        bounds = self.bounds
        if bounds is None or self._parking_now:
            return False  # (AmqpParking publishes through this channel too)
        delay = bounds.park_delay(msg.properties.get("application_headers"), bounds.eta_horizon_s)
        queue = bounds.queue_for(exchange, routing_key) if delay is not None else None
        parking = self._parking if queue is not None else None
        if delay is None or queue is None or parking is None:
            return False
        bounds.parking(msg.properties.setdefault("application_headers", {}))
        self._parking_now = True
        try:
            parking.park(queue, msg, delay)
        finally:
            self._parking_now = False
        return True

    def _route_publish(
        self, confirm: bool, msg: Any, exchange: str, routing_key: str, kwargs: dict[str, Any]
    ) -> Any:
        if self._park_at_publish(msg, exchange, routing_key):
            return None
        props = msg.properties
        call = props.pop(OPTION, None)
        bounds = self.bounds
        if bounds is None:
            return self._send_now(confirm, msg, exchange, routing_key, kwargs)
        queue = bounds.queue_for(exchange, routing_key)
        checked = hard = None
        if queue is not None:
            checked = None if call is None else check_limit(call, f"apply_async({OPTION})")
            if checked is None:
                checked = bounds.task_limit((props.get("application_headers") or {}).get("task"))
            hard = bounds.declared.get(queue, bounds.limits.get(queue))
        collector = self._collector
        if collector is None and checked is None and (hard is None or not confirm):
            return self._send_now(confirm, msg, exchange, routing_key, kwargs)
        task_id = (props.get("application_headers") or {}).get("id")
        publish = _Publish(msg, exchange, routing_key, kwargs)
        item = _Pending(queue or routing_key, checked, task_id, publish, hard)
        if collector is not None:
            collector.append(item)
            return None
        _, refusal = self._flush_run([item])  # confirmed: the next check counts it
        if refusal is not None:
            raise refusal
        return None

    def _send_now(
        self, confirm: bool, msg: Any, exchange: str, routing_key: str, kwargs: dict[str, Any]
    ) -> Any:
        if confirm:
            return super().basic_publish_confirm(msg, exchange, routing_key, **kwargs)
        return self.send_publish(msg, exchange, routing_key, **kwargs)

    def _flush_run(self, run: list[_Pending]) -> tuple[list[_Pending], QueueFull | None]:
        queue, checked, hard = run[0].queue, run[0].limit, run[0].hard_limit
        bounds = self.bounds
        assert bounds is not None

        def attempt(items: list[_Pending]) -> tuple[list[_Pending], list[_Pending], int]:
            depth = -1
            send, rest = items, []
            if checked is not None:
                depth = self.depth(queue)
                room = max(0, checked - depth)
                send, rest = items[:room], items[room:]
            acked, nacked = self._publish_confirmed(send)
            if nacked:
                depth = self.depth(queue)
            elif rest:
                depth += len(acked)
            return acked, nacked + rest, depth

        limits = [x for x in (checked, hard) if x is not None]
        if not limits:  # collected, unbounded: publish with confirms, no policy
            acked, nacked, _ = attempt(run)
            if nacked:
                raise MessageNacked(f"RabbitMQ refused {len(nacked)} message(s) for {queue!r}")
            return acked, None
        return _offer(bounds, queue, min(limits), run, attempt)

    def _publish_confirmed(self, items: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """Publish ``items`` at once, then wait for every confirm; return (acked, nacked)."""
        if not items:
            return [], []
        self.ensure_confirms()
        first = self._sent + 1  # the broker numbers confirms per channel from 1
        last = first + len(items) - 1
        outcome: dict[int, bool] = {}

        def settle(ok: bool) -> Callable[[int, bool], None]:
            def on_confirm(tag: int, multiple: bool) -> None:
                for t in range(max(first, 1 if multiple else tag), min(tag, last) + 1):
                    outcome.setdefault(t, ok)

            return on_confirm

        # Confirms can arrive while publishing (py-amqp reads pending frames before
        # each publish), so listen first.
        on_ack, on_nack = settle(True), settle(False)
        self.events["basic_ack"].add(on_ack)
        self.events["basic_nack"].add(on_nack)
        try:
            for item in items:
                p = item.payload
                self.send_publish(p.msg, p.exchange, p.routing_key, **p.kwargs)
            deadline = time.monotonic() + _CONFIRM_TIMEOUT_S
            while len(outcome) < len(items):
                self.connection.drain_events(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self.events["basic_ack"].discard(on_ack)
            self.events["basic_nack"].discard(on_nack)
        acked = [item for tag, item in enumerate(items, first) if outcome[tag]]
        nacked = [item for tag, item in enumerate(items, first) if not outcome[tag]]
        return acked, nacked

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (0 when it does not exist), by a passive declare.

        Asked on a side channel: a passive declare of a missing queue closes its channel.

        Example::

            channel.depth("emails")
        """
        probe = self._probe
        if probe is None or not probe.is_open:
            probe = self._probe = self.connection.channel()
        try:
            return int(probe.queue_declare(queue, passive=True).message_count)
        except NotFound:
            self._probe = None
            return 0


class AmqpConnection(pyamqp.Connection):  # type: ignore[misc]
    """py-amqp connection whose channels are :class:`AmqpChannel`."""

    Channel = AmqpChannel


class AmqpTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport with queue bounds (``amqp://`` after ``install``).

    Example::

        Celery(broker="amqp://", broker_transport="celery_ext.bounds:AmqpTransport")
    """

    Connection = AmqpConnection


class AmqpsTransport(AmqpTransport, pyamqp.SSLTransport):  # type: ignore[misc]
    """:class:`AmqpTransport` for ``amqps://`` URLs (TLS on, as kombu's ``SSLTransport``).

    Example::

        Celery(broker="amqps://host", broker_transport="celery_ext.bounds:AmqpsTransport")
    """


# scheme -> (transport class path, the scheme kombu shows in URIs for it)
_TRANSPORTS = {
    "redis": "celery_ext.redis_transport:RedisTransport",
    "rediss": "celery_ext.redis_transport:RedissTransport",
    "amqp": "celery_ext.bounds:AmqpTransport",
    "pyamqp": "celery_ext.bounds:AmqpTransport",
    "amqps": "celery_ext.bounds:AmqpsTransport",
}
_SHOWN_AS = {
    "celery_ext.redis_transport:RedisTransport": "redis",
    "celery_ext.redis_transport:RedissTransport": "rediss",
    "celery_ext.bounds:AmqpTransport": "amqp",
    "celery_ext.bounds:AmqpsTransport": "amqps",
}


def _transport_for(app: Celery) -> str | None:
    """The bounded transport for ``app``'s broker URLs, or None to stay stock."""
    conf = app.conf
    if conf.broker_transport:
        return None
    urls = [u for u in (conf.broker_url, conf.broker_read_url, conf.broker_write_url) if u]
    schemes = set()
    for url in urls or ["amqp://"]:  # Celery's default broker
        if not isinstance(url, str) or ";" in url or "://" not in url:
            return None
        schemes.add(urlparse(url).scheme)
    if len(schemes) != 1:
        return None
    return _TRANSPORTS.get(schemes.pop())


def setup(app: Celery, settings: Settings) -> None:
    """Wire producer-side queue bounds into ``app`` (called by ``celery_ext.install``).

    Hands a :class:`Bounds` to the transports through ``broker_transport_options``
    and, for Redis and RabbitMQ URLs with no ``broker_transport`` set, selects
    the bounded transports (pass-through when no bound applies). With
    ``queue_limits`` on RabbitMQ it turns on publisher confirms.

    Example::

        setup(app, settings_of(app))
    """
    options = dict(app.conf.broker_transport_options or {})
    options[BOUNDS_OPTION] = Bounds(app, settings)
    transport = _transport_for(app)
    if transport is not None:
        # Connection.as_uri() (worker banner, Flower) shows the scheme, not our class path.
        kombu.connection.resolve_aliases.setdefault(transport, _SHOWN_AS[transport])
        app.conf.broker_transport = transport
        if transport.startswith("celery_ext.bounds:Amqp") and settings.queue_limits:
            if options.get("confirm_publish") is False:
                raise ConfigurationError(
                    f"{PREFIX}queue_limits on RabbitMQ needs publisher confirms: "
                    "remove broker_transport_options['confirm_publish']=False"
                )
            options["confirm_publish"] = True
    elif settings.queue_limits and not str(app.conf.broker_url or "").startswith("local://"):
        logger.warning(
            "celery_ext: %squeue_limits is not enforced for broker %r (only redis://, "
            "rediss://, amqp://, amqps:// single-URL brokers with broker_transport unset, "
            "and the local lane)",
            PREFIX,
            app.conf.broker_url,
        )
    app.conf.broker_transport_options = options


# -- enqueue_many -----------------------------------------------------------------
# apply_async options that only shape the message (create_task_message), not the publish.
_MESSAGE_ONLY = (
    "countdown",
    "eta",
    "group_id",
    "group_index",
    "retries",
    "chord",
    "chain",
    "root_id",
    "parent_id",
    "shadow",
    "reply_to",
    "replaced_task_nesting",
    "argsrepr",
    "kwargsrepr",
    "time_limit",
    "soft_time_limit",
    "expires",
    "ignore_result",
)


Pair = tuple[Sequence[Any], Mapping[str, Any]]


class _Plan:
    """What every message of one enqueue_many call shares, worked out once."""

    def __init__(
        self, app: Celery, task: Task, queue: str | None, options: dict[str, Any], first: Pair
    ) -> None:
        args, kwargs = first
        opts: dict[str, Any] = {**_compat.task_exec_options(task), **options}
        if queue is not None:
            opts["queue"] = queue
        opts.setdefault("ignore_result", task.ignore_result)
        if task.priority:
            opts.setdefault("priority", task.priority)
        message = {k: opts.pop(k) for k in _MESSAGE_ONLY if k in opts}
        message["callbacks"] = maybe_list(opts.pop("link", None))
        message["errbacks"] = maybe_list(opts.pop("link_error", None))
        opts = app.amqp.router.route(opts, task.name, args, kwargs, task)
        expires = message.get("expires")
        if isinstance(expires, datetime):
            expires = (expires - app.now()).total_seconds()
        if isinstance(expires, (int, float)):
            opts["expiration"] = max(0.0, float(expires))
        parent = app.current_worker_task
        if parent is not None:
            message.setdefault("root_id", parent.request.root_id or parent.request.id)
            message.setdefault("parent_id", parent.request.id)
            if app.conf.task_inherit_parent_priority:
                opts.setdefault("priority", parent.request.delivery_info.get("priority"))
        message.setdefault("reply_to", app.thread_oid)
        message["create_sent_event"] = app.conf.task_send_sent_event
        self.ignore_result = bool(message["ignore_result"])
        self.shadow = message.pop("shadow", None)
        self.message = message
        self.options = opts
        self.queue = opts.get("queue")
        self.name = task.name
        self.task = task
        self.check = getattr(task, "__header__", None) if task.typing else None
        # as_task_v2 would look task_repr_maxlevels up in app.conf twice per message.
        self.reprs = (app.amqp.argsrepr_maxsize, app.amqp.kwargsrepr_maxsize)
        self.repr_levels = app.conf.task_repr_maxlevels
        self.create = app.amqp.create_task_message
        self.send = app.amqp.send_task_message
        self.backend = app.backend

    def publish(self, producer: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Build one protocol message the way ``send_task`` does and publish it."""
        task_id: str = uuid()
        if self.check is not None:
            self.check(*args, **kwargs)
        shadow = self.shadow or self.task.shadow_name(args, kwargs, self.options)
        fields = {
            "argsrepr": saferepr(args, self.reprs[0], maxlevels=self.repr_levels),
            "kwargsrepr": saferepr(kwargs, self.reprs[1], maxlevels=self.repr_levels),
            **self.message,  # the caller's argsrepr/kwargsrepr win, as in apply_async
        }
        message = self.create(
            task_id, self.name, args, kwargs, shadow=shadow, **fields, **self.options
        )
        if not self.ignore_result:
            self.backend.on_task_call(producer, task_id)
        self.send(producer, self.name, message, retry=False, declare=[], **self.options)
        return task_id


def _chunks(pairs: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(pairs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def enqueue_many(
    task: Task,
    args_iter: Iterable[Sequence[Any]],
    kwargs_iter: Iterable[Mapping[str, Any]] | None = None,
    *,
    queue: str | None = None,
    chunk: int = 500,
    **options: Any,
) -> list[str]:
    """Publish one ``task`` message per item of ``args_iter``; return the accepted task ids.

    The messages are ordinary Celery protocol-2 task messages, built with
    ``app.amqp.create_task_message`` and sent with ``app.amqp.send_task_message``
    (publish signals and ``task-sent`` events fire as for ``apply_async``), so a
    stock worker runs them. ``options`` are ``apply_async`` options (including
    ``max_queued``); routing, execution options and parent ids are worked out
    once per call, from the first message. ``kwargs_iter``, when given, must be
    as long as ``args_iter``.

    Publishing is pipelined per ``chunk`` messages, the bound staying exact:
    on Redis one Lua call per chunk pushes as many as fit; on RabbitMQ a chunk
    is published on a dedicated channel and confirmed at once; on the local
    lane each message meets the lane's own bound. For the messages that do not
    fit, the policy decides: ``shed`` drops and counts them (their ids are not
    returned); ``block`` waits for room up to ``queue_block_timeout`` without
    progress; ``raise`` (and a ``block`` that timed out) raises
    :class:`BatchQueueFull`, whose ``accepted_ids`` were queued and will run.
    Connection errors are not retried (a chunk's fate is then unknown); no
    ``AsyncResult`` objects are created.

    Example::

        ids = celery_ext.enqueue_many(send_email, [(to, "hi") for to in recipients])
        ids = celery_ext.enqueue_many(resize, ([p] for p in paths), queue="images", chunk=1000)
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: expected an integer >= 1")
    app: Celery = _compat.task_app(task)
    Bounds.of(app)  # installed?
    if kwargs_iter is None:
        pairs: Iterator[Pair] = ((a, {}) for a in args_iter)
    else:
        pairs = zip(args_iter, kwargs_iter, strict=True)
    if app.conf.task_always_eager:
        return [str(task.apply_async(a, k, queue=queue, **options).id) for a, k in pairs]
    first = next(pairs, None)
    if first is None:
        return []
    plan = _Plan(app, task, queue, options, first)
    ids: list[str] = []
    with app.producer_or_acquire() as pooled, _own_channel(pooled) as channel:
        producer = pooled if channel is None else app.amqp.Producer(channel, auto_declare=False)
        if plan.queue is not None:
            producer.maybe_declare(plan.queue, retry=True)
        for batch in _chunks(itertools.chain([first], pairs), chunk):
            accepted, refusal = _publish_chunk(plan, producer, batch)
            ids += accepted
            if refusal is not None:
                raise BatchQueueFull(
                    refusal.queue, refusal.limit, refusal.depth, refusal.waited_s, ids
                )
    return ids


@contextmanager
def _own_channel(producer: Any) -> Iterator[Any]:
    """RabbitMQ: a channel of enqueue_many's own (confirm tags counted from 1), else None."""
    if not isinstance(producer.channel, AmqpChannel):
        yield None
        return
    channel = producer.connection.channel()
    try:
        yield channel
    finally:
        if channel.is_open:
            channel.close()


def _publish_chunk(
    plan: _Plan, producer: Any, batch: list[Pair]
) -> tuple[list[str], QueueFull | None]:
    channel = producer.channel
    if isinstance(channel, _Collecting):
        with channel.collecting() as held:
            for args, kwargs in batch:
                plan.publish(producer, args, kwargs)
        return channel.flush(held)
    ids: list[str] = []  # the local lane (its own bound) or a stock transport
    for args, kwargs in batch:
        try:
            task_id = plan.publish(producer, args, kwargs)
        except QueueFull as exc:
            return ids, exc
        if not getattr(channel, "last_put_shed", False):  # the local lane's "shed"
            ids.append(task_id)
    return ids, None
