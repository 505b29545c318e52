"""kombu transport for ``local://`` URLs: channels on an app's :class:`~celery_ext.lane.Lane`.

Registered by ``install(app)``, with a producer fast path (:class:`LaneAMQP`) for apps
whose broker is the lane.

Example::

    with app.connection_for_write() as conn:   # broker "local://"
        conn.default_channel.queue_declare("jobs")
"""

from __future__ import annotations

import threading
from queue import Empty
from time import monotonic
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP
from kombu import Producer
from kombu.transport import virtual

from .. import _compat, bounds
from ..errors import LaneNotInstalled, QueueFull
from ..lane import LANES_OPTION, Lane, Lanes, Message, is_local, lane_name
from ..sizes import SizeLimited
from .failover import FailoverConnection

__all__ = ["Channel", "LaneAMQP", "LaneProducer", "LaneProducerPool", "Transport"]


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
    """Celery's AMQP helper, with :class:`LaneProducerPool` for local-lane apps, and
    connections whose failover keeps celery_ext's transport (:mod:`.failover`).

    ``install(app)`` selects it (``app.amqp_cls``) when the app still uses the
    stock class and has not built ``app.amqp`` yet; other brokers are unaffected.

    Example::

        Celery("x", broker="local://", amqp="celery_ext.transports.local:LaneAMQP")
    """

    #: kombu's Connection whose failover keeps celery_ext's transport.
    Connection = FailoverConnection

    @property
    def producer_pool(self) -> Any:
        if not _compat.producer_pool_created(self) and is_local(self.app):
            self._producer_pool = LaneProducerPool(self.app)
        return super().producer_pool

    publisher_pool = producer_pool
