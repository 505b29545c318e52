"""Bounded prefetch: a worker never holds more than ``prefetch_limit`` messages.

Stock Celery pulls every ETA/countdown message into the worker and raises the
broker QoS by one for each (past 65,535 kombu turns it into 0 = unlimited);
with ``worker_eta_task_limit`` the far-future ones fill the window and ready
work starves. The :class:`Backpressure` consumer step splits the window:

- **ready work** gets ``prefetch_limit - eta_buffer`` slots at most (stock
  ``concurrency x multiplier`` when smaller; ``-P solo`` counts as one process);
- **ETA messages due soon** (within ``eta_horizon``) are held as stock Celery
  holds them, in at most ``eta_buffer`` slots;
- **every other ETA message is parked** on the broker (Redis sorted set,
  RabbitMQ TTL/dead-letter delay queues, local lane heap; see
  :mod:`celery_ext.delays`), then acked, and comes back to its queue when due.
  On Redis the horizon is also kept below the transport's
  ``visibility_timeout``, so a long ETA is never redelivered while it waits.

The QoS therefore never exceeds ``prefetch_limit`` (nor 65,535). With
``prefetch_bytes`` set, the body bytes of held (received, unacked) messages are
capped too: a message that would cross the cap is requeued at once and the QoS
lowered to what is held, until acks make room again. Where no
parking store exists (other brokers, kombu < 5.7 on RabbitMQ) ETA messages stay
in the worker as in stock Celery, and only the 65,535 overflow is prevented.
Counts are reported by ``info()`` under ``celery_ext`` in ``celery inspect
stats`` (and so in Flower).

Example::

    celery -A shop worker --prefetch-limit 200
    # or app.conf.celery_ext_prefetch_limit = 200 before celery_ext.install(app)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from . import _compat
from ._settings import settings_of
from .bounds import BOUNDS_OPTION, Bounds
from .consumer_state import state_of
from .delays import PARKED_HEADER, came_back, eta_delay, mark_parked, redis_horizon
from .metrics import send_task_event
from .transports.amqp import AmqpParking, parked_queue, queue_type_of

__all__ = ["Backpressure"]

logger = logging.getLogger(__name__)

#: kombu turns a larger prefetch count into 0, which means unlimited.
QOS_MAX = 65_535
#: Seconds between two checks whether acks made room under ``prefetch_bytes``.
_RELAX_INTERVAL_S = 0.05


class _ByteBudget:
    """Body bytes of the messages a worker received and has not acked yet."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held: list[tuple[Any, int, bool]] = []  # (message, size, has ETA)
        self.bytes = 0
        self.peak = 0
        self.requeued = 0
        self.throttled = False

    def prune(self) -> None:
        self.held = [entry for entry in self.held if not entry[0].acknowledged]
        self.bytes = sum(entry[1] for entry in self.held)

    def admit(self, message: Any) -> bool:
        """Take ``message`` into the budget, or False when it would cross the cap."""
        size = len(message.body or b"")
        if self.bytes + size > self.cap:
            self.prune()
            if self.held and self.bytes + size > self.cap:
                return False
        self.held.append((message, size, bool((message.headers or {}).get("eta"))))
        self.bytes += size
        self.peak = max(self.peak, self.bytes)
        return True

    def eta_held(self) -> int:
        return sum(1 for message, _, eta in self.held if eta and not message.acknowledged)


class _LaneParking:
    """Parks on the local lane's own heap (its consumers release due messages)."""

    def __init__(self, lane: Any) -> None:
        self.lane = lane

    def park(self, queue: str, raw: dict[str, Any], delay_s: float) -> float:
        return float(self.lane.park(queue, raw, delay_s))

    def move_due(self, limit: int = 1000) -> int:
        return 0

    def parked(self, queue: str) -> int:
        return int(self.lane.parked(queue))


#: Seconds between two counts of RabbitMQ's parked messages (one passive declare
#: per delay level, 28 of them).
_COUNT_PARKED_EVERY_S = 5.0


class _AmqpMover:
    """Moves due parked messages on RabbitMQ (:meth:`AmqpParking.move_due`) every
    ``interval_s``, in a thread and on a connection of its own.

    Never on the consumer's event loop: a mover waiting for RabbitMQ (publisher
    confirms, or a connection the broker throttles with flow control) held up a
    warm shutdown by seconds. The connection is made again after a failure.
    """

    def __init__(self, app: Any, prefix: str, queue_type: str, interval_s: float) -> None:
        self.app, self.prefix, self.interval_s = app, prefix, interval_s
        self.queue_type = queue_type
        self.parked: int | None = None  # messages in the delay levels, at the last count
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery_ext-mover", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection: Any = None
        parking: AmqpParking | None = None
        next_count = 0.0
        while not self._stopping.is_set():
            try:
                if parking is None:
                    connection = self.app.connection_for_write()
                    parking = AmqpParking(connection.channel(), self.prefix, self.queue_type)
                parking.move_due()
                if time.monotonic() >= next_count:
                    self.parked = parking.parked_all()
                    next_count = time.monotonic() + _COUNT_PARKED_EVERY_S
            except Exception:  # what it took and did not ack goes back to the due queue
                logger.warning("celery_ext: moving parked messages failed", exc_info=True)
                parking = None
                with contextlib.suppress(Exception):
                    connection.close()
            self._stopping.wait(self.interval_s)
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def close(self, timeout: float = 1.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)


def _parking_for(connection: Any, app: Any) -> Any:
    driver = connection.transport.driver_type
    if driver == "redis":
        from .transports.redis import RedisParking  # imports redis: only for Redis apps

        return RedisParking(connection.default_channel)
    if driver == "local":
        return _LaneParking(connection.transport.lane)
    if driver == "amqp":
        try:
            prefix = settings_of(app).park_prefix
            return AmqpParking(connection.default_channel, prefix, queue_type_of(app))
        except RuntimeError:  # kombu too old for prefixed delay levels
            logger.warning("celery_ext: no ETA parking on this kombu; ETA tasks stay in the worker")
    return None


class Backpressure(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step capping held messages and parking far-future ETA tasks.

    ``celery_ext.install(app)`` adds it and the ``--prefetch-limit`` worker
    option, which overrides the ``celery_ext_prefetch_limit`` setting.

    Example::

        app.control.inspect().stats()[worker]["celery_ext.prefetch_limit"]
    """

    name = "celery_ext.backpressure.Backpressure"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(
        self,
        c: Any,
        prefetch_limit: int | None = None,
        prefetch_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        settings = settings_of(c.app)
        cap_bytes = prefetch_bytes or settings.prefetch_bytes
        self.budget = _ByteBudget(cap_bytes) if cap_bytes else None
        limit = min(prefetch_limit or settings.prefetch_limit, QOS_MAX)
        self.prefetch_limit = limit
        buffer = settings.eta_buffer or max(1, min(100, limit // 10))
        self.eta_buffer = min(buffer, limit - 1) if limit > 1 else 0
        stock = c.initial_prefetch_count or limit
        if _is_solo(c.pool):
            stock = max(1, c.prefetch_multiplier)  # one process, not one per CPU
        self.ready_window = max(1, min(stock, limit - self.eta_buffer))
        self.eta_horizon_s = settings.eta_horizon
        self.park_interval_s = settings.park_interval
        self.parked = 0
        self.park_errors = 0
        self.store: Any = None
        self.mover: _AmqpMover | None = None
        self._timer_entry: Any = None
        self._relax_entry: Any = None
        self._eta_messages: list[Any] = []  # held, for a drain to hand back
        c.initial_prefetch_count = self.ready_window
        # Celery's timer hands a due ETA task to the pool through this (the strategies
        # built at each start look it up): from then on it is running, not held.
        release = c.apply_eta_task

        def apply_eta_task(request: Any) -> Any:
            self._forget_eta(getattr(request, "message", None))
            return release(request)

        _compat.replace_consumer_method(c, "apply_eta_task", apply_eta_task)
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        # Runs after Tasks.start on every (re)connect: reapply the cap to the new QoS.
        self.store = _parking_for(c.connection, c.app)
        # After a reconnect Celery has dropped what the old channel delivered (its
        # timer is cleared): it is no longer held here, and the broker (or the
        # leases, on Redis) gives it out again.
        channel = getattr(c.task_consumer, "channel", None)
        self._eta_messages = [m for m in self._eta_messages if m.channel is channel]
        if self.budget is not None:
            self.budget.held = [e for e in self.budget.held if e[0].channel is channel]
            self.budget.bytes = sum(e[1] for e in self.budget.held)
        c.initial_prefetch_count = min(c.initial_prefetch_count, self.ready_window)
        # Without a parking store ETA messages must stay in the worker: cap only
        # where kombu would turn the count into "unlimited".
        cap = self.ready_window + self.eta_buffer if self.store is not None else QOS_MAX
        c.qos.max_prefetch = cap
        if c.qos.value > cap:
            c.qos.value = cap
            c.qos.update()
        if self.store is not None and c.connection.transport.driver_type == "redis":
            visibility = float(c.connection.transport_options.get("visibility_timeout", 3600))
            self.eta_horizon_s = redis_horizon(self.eta_horizon_s, visibility)
        if isinstance(self.store, AmqpParking):
            for queue in getattr(c.task_consumer, "queues", None) or []:
                self.store.bind(queue.name)  # not from inside a message callback
        for name, strategy in list(c.strategies.items()):
            c.strategies[name] = self.wrap(c, strategy)
        state = state_of(c)
        state.wrap_strategy = lambda strategy: self.wrap(c, strategy)
        state.backpressure = self
        # Celery calls this from the ack callback (a pool thread on the threads pool).
        _compat.replace_prefetch_restore(c, lambda: self._restore_prefetch(c))
        if isinstance(self.store, AmqpParking) and self.mover is None:
            store = self.store
            self.mover = _AmqpMover(c.app, store.prefix, store.queue_type, self.park_interval_s)
        redis = self.store is not None and c.connection.transport.driver_type == "redis"
        if redis and self._timer_entry is None:
            self._timer_entry = c.timer.call_repeatedly(self.park_interval_s, self._move_due)
        if self.budget is not None and self._relax_entry is None:
            self._relax_entry = c.timer.call_repeatedly(_RELAX_INTERVAL_S, self._relax, (c,))

    def stop(self, c: Any) -> None:
        for entry in (self._timer_entry, self._relax_entry):
            if entry is not None:
                entry.cancel()
        self._timer_entry = self._relax_entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        mover, self.mover = self.mover, None
        if mover is not None:
            mover.close()

    def _restore_prefetch(self, c: Any) -> None:
        """Celery's gradual prefetch restore after a reconnect, sent by the consumer loop.

        Stock Celery sends ``basic.qos`` right from the ack callback. On the
        threads pool that is a pool thread, which then reads the AMQP connection
        the consumer loop is reading: frames get split between the two
        (``UnexpectedFrame``) and the worker stalls for tens of seconds. Here
        only ``qos.value`` changes; the loop sends it before it reads again.
        The window grows back to the ready window, not beyond it.
        """
        with _compat.qos_lock(c.qos):
            reduction = c.app.conf.worker_enable_prefetch_count_reduction
            if _compat.prefetch_restored(c) or not reduction:
                return
            window = min(int(c.max_prefetch_count), self.ready_window)
            new = min(window, int(c.initial_prefetch_count) + int(c.prefetch_multiplier))
            eta = self.eta_held(c)
            c.initial_prefetch_count = new
            c.qos.value = min(int(c.qos.max_prefetch or QOS_MAX), new + eta)
            _compat.set_prefetch_restored(c, new >= window)

    def parked_now(self, c: Any) -> int | None:
        """Messages parked for this worker's queues now, by anyone (a producer too).

        On RabbitMQ the mover's last count (at most 5 s old) of every message under
        ``park_prefix``; None without a parking store.

        Example::

            step.parked_now(consumer)   # what `ext status` shows as PARKED
        """
        store = self.store
        if isinstance(store, AmqpParking):
            return self.mover.parked if self.mover is not None else None
        if store is None:
            return None
        queues = [q.name for q in getattr(c.task_consumer, "queues", None) or []]
        try:
            return sum(int(store.parked(name)) for name in queues)
        except Exception:  # the broker is away: no figure rather than a wrong one
            return None

    def _move_due(self) -> None:
        try:
            self.store.move_due()
        except Exception:  # a broker hiccup must not kill the worker's timer
            logger.warning("celery_ext: moving parked messages failed", exc_info=True)

    # -- the ETA decision ---------------------------------------------------
    def wrap(self, c: Any, strategy: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a task strategy so far-future ETA messages are parked, not held."""
        if getattr(strategy, "celery_ext_wrapped", False):
            return strategy

        def handler(
            message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
        ) -> Any:
            _restore_route(message)
            headers = message.headers or {}
            if headers.get("eta"):  # checked here: most messages have none
                back = came_back(headers)
                if self._maybe_park(c, message):
                    return None
                if back:  # Flower showed it PARKED: no task event after that one replaces it
                    send_task_event(c, "unparked", uuid=headers.get("id"), eta=headers["eta"])
                self._hold_eta(message)
            if self.budget is not None and not self.budget.admit(message):
                self._throttle(c, message)
                return None
            return strategy(message, body, ack, reject, callbacks, **kw)

        handler.celery_ext_wrapped = True  # type: ignore[attr-defined]
        return handler

    def _hold_eta(self, message: Any) -> None:
        held = self._eta_messages
        held.append(message)
        if len(held) > 2 * max(self.eta_buffer, 64):
            self._eta_messages = [m for m in held if not m.acknowledged]

    def _forget_eta(self, message: Any) -> None:
        with contextlib.suppress(ValueError):  # not held here (no ETA, or parked)
            self._eta_messages.remove(message)

    def eta_messages(self) -> list[Any]:
        """The ETA messages this worker holds until their time (a copy).

        Example::

            len(step.eta_messages())
        """
        return list(self._eta_messages)

    def take_eta_messages(self) -> list[Any]:
        """The ETA messages still waiting for their time here; forgets them (drain).

        Not those Celery's timer already released: running, or done with their ack
        on its way (handing those back would run them twice).

        Example::

            for message in step.take_eta_messages():
                message.reject(requeue=True)
        """
        held, self._eta_messages = self._eta_messages, []
        return [m for m in held if not m.acknowledged]

    def eta_held(self, c: Any) -> int:
        """ETA messages this worker holds (stock raises the QoS by one for each)."""
        if self.budget is not None:  # the QoS may be lowered: count them instead
            return self.budget.eta_held()
        return max(0, int(c.qos.value) - int(c.initial_prefetch_count))

    # -- the byte budget ------------------------------------------------------
    def _throttle(self, c: Any, message: Any) -> None:
        """Hand ``message`` back and stop deliveries beyond what is held."""
        assert self.budget is not None
        # The consumer loop applies a changed qos.value before it reads again.
        c.qos.value = max(1, len(self.budget.held))
        self.budget.throttled = True
        self.budget.requeued += 1
        message.requeue()

    def _relax(self, c: Any) -> None:
        """Give the QoS back once acks brought the held bytes under the cap."""
        budget = self.budget
        if budget is None or not budget.throttled:
            return
        budget.prune()
        if budget.bytes < budget.cap:
            budget.throttled = False
            normal = int(c.initial_prefetch_count) + budget.eta_held()
            c.qos.value = min(int(c.qos.max_prefetch or normal), normal)

    def _maybe_park(self, c: Any, message: Any) -> bool:
        eta = (message.headers or {}).get("eta")
        if not eta or self.store is None:
            return False
        try:
            delay = eta_delay(eta, c.app.timezone)
        except ValueError:
            return False  # let Celery report the malformed ETA as it always has
        if delay <= 0 or (delay <= self.eta_horizon_s and self.eta_held(c) < self.eta_buffer):
            return False
        headers = message.headers
        try:
            mark_parked(headers)
            payload = message if isinstance(self.store, AmqpParking) else message.serializable()
            self.store.park(_queue_of(c, message), payload, delay)
        except Exception:
            headers.pop(PARKED_HEADER, None)  # held here instead: it must not read as came back
            self.park_errors += 1
            logger.warning("celery_ext: could not park %s; holding it", message.headers.get("id"))
            return False
        message.ack()
        self.parked += 1
        send_task_event(c, "parked", uuid=headers.get("id"), name=headers.get("task"), eta=eta)
        return True

    def section(self, c: Any) -> dict[str, Any]:
        """Its part of the ``celery_ext`` section of ``inspect stats`` (see :mod:`.metrics`)."""
        qos = getattr(c, "qos", None)
        if self.budget is not None:
            self.budget.prune()
        eta_held = self.eta_held(c) if qos is not None else 0
        settings = settings_of(c.app)
        limits = (c.app.conf.broker_transport_options or {}).get(BOUNDS_OPTION)
        return {
            "prefetch_limit": self.prefetch_limit,
            "ready_window": self.ready_window,
            "eta_buffer": self.eta_buffer,
            "eta_horizon_s": self.eta_horizon_s,
            "qos": int(qos.value) if qos is not None else None,
            "held": len(worker_state.reserved_requests) + eta_held,
            "prefetch_bytes": self.budget.cap if self.budget else None,
            "held_bytes": self.budget.bytes if self.budget else None,
            "held_bytes_peak": self.budget.peak if self.budget else None,
            "bytes_requeued": self.budget.requeued if self.budget else 0,
            "eta_held": eta_held,
            "parked_now": self.parked_now(c),
            "parked_total": self.parked,
            "park_errors": self.park_errors,
            "queue_limits": dict(settings.queue_limits),
            "queue_full_policy": settings.queue_full_policy,
            "shed_total": limits.shed() if isinstance(limits, Bounds) else 0,
            "queue_full_total": limits.full() if isinstance(limits, Bounds) else 0,
        }


def _restore_route(message: Any) -> None:
    """Give a message back from RabbitMQ's delay levels its queue as routing key.

    Celery re-publishes retries (and its own ``self.retry()``) to the delivery's
    exchange and routing key: with the delay-level key that re-entered the
    levels with the old delay. The default exchange and the queue name route it
    straight to its queue, as the task was first sent.
    """
    info = message.delivery_info
    queue = parked_queue(info.get("routing_key")) if info else None
    if queue is not None:
        info["routing_key"], info["exchange"] = queue, ""


def _is_solo(pool: Any) -> bool:
    return pool is not None and _compat.pool_kind(pool) == "solo"


def _queue_of(c: Any, message: Any) -> str:
    """The consumed queue a message came from (by routing key and exchange)."""
    info = message.delivery_info or {}
    routing_key, exchange = info.get("routing_key"), info.get("exchange")
    queues = list(getattr(c.task_consumer, "queues", []) or [])
    for queue in queues:
        if queue.name == routing_key:
            return str(queue.name)
    for queue in queues:
        if queue.routing_key == routing_key and getattr(queue.exchange, "name", "") == exchange:
            return str(queue.name)
    return str(routing_key)
