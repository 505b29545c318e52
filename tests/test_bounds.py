"""Producer-side queue bounds on real Redis and RabbitMQ (and the local lane): no mocks."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection

import celery_ext
from celery_ext import ConfigurationError, LocalWorker, QueueFull, enqueue_many
from celery_ext.bounds import BatchQueueFull, Bounds, shed_count
from celery_ext.lane import lane_of
from celery_ext.transports.amqp import AmqpChannel
from celery_ext.transports.redis import RedisChannel, RedissTransport

PRIORITY_SEP = "\x06\x16"


def wait_for(check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Broker:
    """One real broker: apps on it, queue depth and raw access, cleanup of what we made."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url
        self.apps: list[Celery] = []
        self.queues: list[str] = []

    def app(self, queue: str, **settings: Any) -> Celery:
        app = Celery(f"bounds_{uuid.uuid4().hex[:6]}", broker=self.url, set_as_current=False)
        app.conf.update(
            task_default_queue=queue,
            result_backend="cache+memory://",
            broker_connection_retry_on_startup=False,
            worker_hijack_root_logger=False,
        )
        celery_ext.install(app, **settings)
        self.apps.append(app)
        self.queues.append(queue)
        return app

    def depth(self, queue: str) -> int:
        if self.kind == "local":
            return lane_of(self.apps[-1]).depth(queue)
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            names = [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in (3, 6, 9)]
            return sum(int(client.llen(name)) for name in names)
        with Connection(self.url) as conn:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)

    def take(self, queue: str) -> Any:
        """Consume (and ack) one message with plain kombu, or None."""
        if self.kind == "local":  # the lane belongs to the app
            with self.apps[-1].connection_for_write() as conn:
                return conn.default_channel.basic_get(queue, no_ack=True)
        with Connection(self.url) as conn:
            message = conn.default_channel.basic_get(queue, no_ack=True)
            return message

    def cleanup(self) -> None:
        for app in self.apps:
            app.close()
        if self.kind == "local":
            return  # the lanes die with their apps
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            for queue in self.queues:
                for key in client.scan_iter(match=f"*{queue}*"):
                    client.delete(key)
                for key in client.scan_iter(match="_kombu.binding.*"):
                    for member in client.smembers(key):
                        if queue.encode() in member:
                            client.srem(key, member)
        else:
            with Connection(self.url) as conn:
                for queue in self.queues:
                    conn.default_channel.queue_delete(queue)


def _broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    kind = request.param
    b = Broker(kind, "local://" if kind == "local" else request.getfixturevalue(f"{kind}_url"))
    yield b
    b.cleanup()


@pytest.fixture(params=["local", "redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """Each broker a bound is enforced on: the local lane, Redis and RabbitMQ."""
    yield from _broker(request)


@pytest.fixture(params=["redis", "amqp"])
def server(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The brokers with a stock kombu transport to compare with."""
    yield from _broker(request)


def noop_task(app: Celery, **options: Any) -> Any:
    @app.task(shared=False, name=f"bounds.noop.{uuid.uuid4().hex[:6]}", **options)
    def noop(i: int = 0) -> None:
        pass

    return noop


def queued_ids(broker: Broker, queue: str) -> list[str]:
    ids = []
    while (message := broker.take(queue)) is not None:
        ids.append(message.headers["id"])
    return ids


# -- raise / block / shed -----------------------------------------------------------
def test_full_queue_raises_queue_full(broker: Broker, unique_queue: str) -> None:
    app = broker.app(unique_queue, queue_limits={unique_queue: 3})
    noop = noop_task(app)
    for i in range(3):
        noop.delay(i)
    with pytest.raises(QueueFull) as info:
        noop.delay(3)
    assert (info.value.queue, info.value.limit, info.value.depth) == (unique_queue, 3, 3)
    assert info.value.waited_s == 0
    assert broker.depth(unique_queue) == 3
    assert Bounds.of(app).full(unique_queue) == 1  # inspect stats: celery_ext.queue_full_total


def test_block_waits_then_raises(broker: Broker, unique_queue: str) -> None:
    app = broker.app(
        unique_queue,
        queue_limits={unique_queue: 2},
        queue_full_policy="block",
        queue_block_timeout=0.3,
    )
    noop = noop_task(app)
    noop.delay(0)
    noop.delay(1)
    with pytest.raises(QueueFull) as info:
        noop.delay(2)
    assert info.value.limit == 2 and info.value.depth == 2
    assert 0.3 <= info.value.waited_s < 30
    assert broker.depth(unique_queue) == 2
    assert Bounds.of(app).full() == 1


def test_block_succeeds_when_a_consumer_makes_room(broker: Broker, unique_queue: str) -> None:
    app = broker.app(
        unique_queue,
        queue_limits={unique_queue: 2},
        queue_full_policy="block",
        queue_block_timeout=60,
    )
    noop = noop_task(app)
    noop.delay(0)
    noop.delay(1)
    outcome: list[object] = []
    producer = threading.Thread(target=lambda: outcome.append(noop.delay(2)))
    producer.start()
    producer.join(0.5)
    assert producer.is_alive(), "a publish to a full queue should wait for room"
    assert broker.take(unique_queue) is not None  # the consumer makes room
    producer.join(30)
    assert not producer.is_alive() and len(outcome) == 1
    assert broker.depth(unique_queue) == 2


def test_shed_counts_and_drops(broker: Broker, unique_queue: str) -> None:
    app = broker.app(unique_queue, queue_limits={unique_queue: 2}, queue_full_policy="shed")
    noop = noop_task(app)
    results = [noop.delay(i) for i in range(5)]
    assert all(r.id for r in results)  # shed publishes still return an AsyncResult
    assert broker.depth(unique_queue) == 2
    assert shed_count(app, unique_queue) == 3
    assert shed_count(app) == 3 and shed_count(app, "other") == 0
    assert queued_ids(broker, unique_queue) == [r.id for r in results[:2]]


# -- where the bound comes from ---------------------------------------------------------
def test_per_task_bound(broker: Broker, unique_queue: str) -> None:
    app = broker.app(unique_queue)  # no queue_limits at all
    bounded = noop_task(app, max_queued=2)
    unbounded = noop_task(app)
    bounded.delay(0)
    bounded.delay(1)
    with pytest.raises(QueueFull) as info:
        bounded.delay(2)
    assert (info.value.queue, info.value.limit, info.value.depth) == (unique_queue, 2, 2)
    for i in range(3):
        unbounded.delay(i)  # the bound belongs to the task, not to the queue
    wait_for(lambda: broker.depth(unique_queue) == 5)  # AMQP: unconfirmed, may be in flight


def test_per_call_bound_wins_over_task_and_setting(broker: Broker, unique_queue: str) -> None:
    app = broker.app(unique_queue, queue_limits={unique_queue: 10})
    noop = noop_task(app, max_queued=5)
    noop.apply_async((0,), max_queued=2)
    noop.apply_async((1,), max_queued=2)
    with pytest.raises(QueueFull) as info:
        noop.apply_async((2,), max_queued=2)
    assert info.value.limit == 2
    for i in range(3):
        noop.delay(i)  # the task's bound: 5
    with pytest.raises(QueueFull) as info:
        noop.delay(5)
    assert info.value.limit == 5
    message = broker.take(unique_queue)
    assert "max_queued" not in message.properties  # never stored with the message
    with pytest.raises(ConfigurationError, match="max_queued"):
        noop.apply_async((9,), max_queued=0)


def test_redis_counts_every_priority_list(redis_url: str, unique_queue: str) -> None:
    b = Broker("redis", redis_url)
    try:
        app = b.app(unique_queue, queue_limits={unique_queue: 3})
        noop = noop_task(app)
        noop.apply_async((0,), priority=0)
        noop.apply_async((1,), priority=9)
        noop.apply_async((2,), priority=5)
        with pytest.raises(QueueFull) as info:
            noop.apply_async((3,), priority=9)
        assert info.value.depth == 3
        client = redis.Redis.from_url(redis_url)
        assert client.llen(f"{unique_queue}{PRIORITY_SEP}9") == 1
    finally:
        b.cleanup()


# -- enqueue_many ---------------------------------------------------------------------------
def test_enqueue_many_keeps_the_bound_exact_and_a_worker_runs_it(
    broker: Broker, unique_queue: str
) -> None:
    app = broker.app(unique_queue, queue_limits={unique_queue: 50})
    ran: list[int] = []
    lock = threading.Lock()

    @app.task(shared=False, name="bounds.record")
    def record(i: int, tag: str = "") -> None:
        with lock:
            ran.append(i)

    with pytest.raises(BatchQueueFull) as info:
        enqueue_many(record, [(i,) for i in range(80)], chunk=16)
    accepted = info.value.accepted_ids
    assert len(accepted) == 50 and len(set(accepted)) == 50
    assert (info.value.queue, info.value.limit, info.value.depth) == (unique_queue, 50, 50)
    assert broker.depth(unique_queue) == 50

    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        queues=[unique_queue],
        shutdown_timeout=30,
        hostname=f"{unique_queue}@bounds",
    ):
        wait_for(lambda: len(ran) == 50)
        ids = enqueue_many(record, [(i,) for i in range(100, 110)], [{"tag": "x"}] * 10)
        assert len(ids) == 10
        wait_for(lambda: len(ran) == 60)
    assert sorted(ran) == [*range(50), *range(100, 110)]


def test_enqueue_many_sheds_what_does_not_fit(broker: Broker, unique_queue: str) -> None:
    app = broker.app(unique_queue, queue_limits={unique_queue: 7}, queue_full_policy="shed")
    noop = noop_task(app)
    ids = enqueue_many(noop, [(i,) for i in range(20)], chunk=5)
    assert len(ids) == 7 and shed_count(app, unique_queue) == 13
    assert queued_ids(broker, unique_queue) == ids  # in order, the first seven


def test_enqueue_many_honours_per_call_bound(broker: Broker, unique_queue: str) -> None:
    app = broker.app(unique_queue)
    noop = noop_task(app)
    with pytest.raises(BatchQueueFull) as info:
        enqueue_many(noop, [(i,) for i in range(10)], max_queued=4)
    assert len(info.value.accepted_ids) == 4 and info.value.limit == 4
    assert broker.depth(unique_queue) == 4


def test_enqueue_many_blocks_until_timeout(broker: Broker, unique_queue: str) -> None:
    app = broker.app(
        unique_queue,
        queue_limits={unique_queue: 3},
        queue_full_policy="block",
        queue_block_timeout=0.2,
    )
    noop = noop_task(app)
    with pytest.raises(BatchQueueFull) as info:
        enqueue_many(noop, [(i,) for i in range(5)])
    assert len(info.value.accepted_ids) == 3 and info.value.waited_s >= 0.2


def test_enqueue_many_with_sent_events_returns_task_ids_only(
    broker: Broker, unique_queue: str
) -> None:
    app = broker.app(unique_queue, queue_limits={unique_queue: 100})
    app.conf.task_send_sent_event = True  # task-sent events travel on the same channel
    noop = noop_task(app)
    ids = enqueue_many(noop, [(i,) for i in range(6)], chunk=4)
    assert len(ids) == 6 and all(ids) and len(set(ids)) == 6
    assert queued_ids(broker, unique_queue) == ids


def test_enqueue_many_checks_its_arguments(broker: Broker, unique_queue: str) -> None:
    app = broker.app(unique_queue)
    noop = noop_task(app)
    assert enqueue_many(noop, []) == []
    with pytest.raises(ValueError, match="chunk"):
        enqueue_many(noop, [(1,)], chunk=0)
    with pytest.raises(ValueError):
        enqueue_many(noop, [(1,), (2,)], [{}])
    with pytest.raises(TypeError):
        enqueue_many(noop, [(1, 2, 3)])  # the task's signature is checked, as apply_async does


# -- drop-in: no bound configured ------------------------------------------------------------
def test_without_bounds_an_app_publishes_as_stock(server: Broker, unique_queue: str) -> None:
    broker = server
    app = broker.app(unique_queue)
    noop = noop_task(app)
    for i in range(30):
        noop.delay(i)
    wait_for(lambda: broker.depth(unique_queue) == 30)  # AMQP: unconfirmed, may be in flight
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert isinstance(channel, (RedisChannel, AmqpChannel))
        assert conn.as_uri().startswith(f"{broker.kind}://")
    assert "confirm_publish" not in app.conf.broker_transport_options
    message = broker.take(unique_queue)
    assert message.headers["task"] == noop.name and "max_queued" not in message.properties


def test_stock_and_installed_apps_store_the_same_message(redis_url: str, unique_queue: str) -> None:
    b = Broker("redis", redis_url)
    stock = Celery("stock", broker=redis_url, set_as_current=False)
    try:
        installed = b.app(unique_queue, queue_limits={unique_queue: 10})
        stock.conf.task_default_queue = unique_queue
        raw = []
        client = redis.Redis.from_url(redis_url)
        for app in (stock, installed):
            app.send_task("bounds.same", (1,), {"x": 2}, task_id="fixed-id", max_queued=5)
            raw.append(json.loads(client.rpop(unique_queue) or b"{}"))
        for payload in raw:  # per publish: a random tag, and the app's reply address
            del payload["properties"]["delivery_tag"], payload["properties"]["reply_to"]
        stock_message, bounded_message = raw
        assert stock_message["properties"].pop("max_queued") == 5  # stock stores the option
        assert bounded_message == stock_message
    finally:
        stock.close()
        b.cleanup()


# -- RabbitMQ specifics -------------------------------------------------------------------------
def test_rabbitmq_refuses_new_arguments_on_an_existing_queue(
    amqp_url: str, unique_queue: str
) -> None:
    b = Broker("amqp", amqp_url)
    try:
        with Connection(amqp_url) as conn:
            conn.default_channel.queue_declare(unique_queue, auto_delete=False)
        app = b.app(unique_queue, queue_limits={unique_queue: 5})
        noop = noop_task(app)
        with pytest.raises(ConfigurationError, match="cannot change"):
            noop.delay()
    finally:
        b.cleanup()


def test_rabbitmq_declares_the_bound_on_the_queue(amqp_url: str, unique_queue: str) -> None:
    b = Broker("amqp", amqp_url)
    try:
        app = b.app(unique_queue, queue_limits={unique_queue: 4})
        assert app.conf.broker_transport_options["confirm_publish"] is True
        noop_task(app).delay()
        with Connection(amqp_url) as conn:  # same arguments: the declare is accepted
            conn.default_channel.queue_declare(
                unique_queue,
                durable=True,
                auto_delete=False,
                arguments={"x-max-length": 4, "x-overflow": "reject-publish"},
            )
    finally:
        b.cleanup()


# -- the local lane ------------------------------------------------------------------------------
def test_enqueue_many_on_the_local_lane_meets_its_native_bound(unique_queue: str) -> None:
    app = Celery("bounds_local", broker="local://", set_as_current=False)
    app.conf.update(task_default_queue=unique_queue, result_backend="cache+memory://")
    celery_ext.install(app, lane_max_queued=5, lane_full_policy="raise")
    ran: list[int] = []

    @app.task(shared=False, name="bounds.local")
    def record(i: int) -> None:
        ran.append(i)

    with pytest.raises(BatchQueueFull) as info:
        enqueue_many(record, [(i,) for i in range(8)], chunk=3)
    assert len(info.value.accepted_ids) == 5 and info.value.limit == 5
    with LocalWorker(app, queues=[unique_queue]) as worker:
        worker.join(timeout=10)
        assert sorted(ran) == [0, 1, 2, 3, 4]
        ids = enqueue_many(record, [(i,) for i in range(10, 13)])
        worker.join(timeout=10)
    assert len(ids) == 3 and sorted(ran) == [0, 1, 2, 3, 4, 10, 11, 12]


def test_queue_limits_task_and_call_bounds_apply_on_the_local_lane(unique_queue: str) -> None:
    app = Celery("bounds_local2", broker="local://", set_as_current=False)
    app.conf.task_default_queue = unique_queue
    celery_ext.install(app, queue_limits={unique_queue: 4}, lane_full_policy="raise")

    @app.task(shared=False, name="bounds.local.plain")
    def plain() -> None: ...

    @app.task(shared=False, name="bounds.local.capped", max_queued=2)
    def capped() -> None: ...

    capped.delay()
    capped.delay()
    with pytest.raises(QueueFull) as by_task:
        capped.delay()
    assert (by_task.value.queue, by_task.value.limit, by_task.value.depth) == (unique_queue, 2, 2)
    with pytest.raises(QueueFull) as by_call:
        plain.apply_async(max_queued=1)
    assert by_call.value.limit == 1
    plain.delay()
    plain.delay()
    with pytest.raises(QueueFull) as by_setting:
        plain.delay()
    assert by_setting.value.limit == 4
    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get(unique_queue, no_ack=True)
    assert "max_queued" not in message.properties  # the bound never reaches a worker


# -- transport selection (no server needed) -------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/3", "celery_ext.transports.redis:RedisTransport"),
        ("rediss://127.0.0.1:6380/3", "celery_ext.transports.redis:RedissTransport"),
        ("amqp://guest@127.0.0.1//", "celery_ext.transports.amqp:AmqpTransport"),
        ("pyamqp://guest@127.0.0.1//", "celery_ext.transports.amqp:AmqpTransport"),
        ("amqps://guest@127.0.0.1//", "celery_ext.transports.amqp:AmqpsTransport"),
        ("local://", None),
        ("memory://", None),
        # Failover URLs of one scheme keep the guarantees; mixed schemes stay stock.
        (
            "redis://127.0.0.1:6379/3;redis://127.0.0.1:6380/3",
            "celery_ext.transports.redis:RedisTransport",
        ),
        ("redis://a:6379;amqp://b:5672", None),
    ],
)
def test_install_selects_the_bounded_transport(url: str, expected: str | None) -> None:
    app = Celery("select", broker=url, set_as_current=False)
    celery_ext.install(app)
    assert app.conf.broker_transport == expected
    if expected is not None:
        conn = app.connection_for_write()
        assert conn.transport_cls == expected
        assert conn.as_uri().split("://")[0] == url.split("://")[0].replace("pyamqp", "amqp")
        if url.startswith("redis"):  # kombu keeps host, port and db from the URL
            assert (conn.hostname, conn.virtual_host) == ("127.0.0.1", "3")
            assert conn.port in (6379, 6380)


def test_install_keeps_an_explicit_transport_and_tls_defaults() -> None:
    app = Celery("explicit", broker="redis://", set_as_current=False)
    app.conf.broker_transport = "redis"
    celery_ext.install(app)
    assert app.conf.broker_transport == "redis"

    rediss = Connection("rediss://127.0.0.1:6380/0", transport=RedissTransport)
    assert rediss.transport is not None and rediss.ssl  # kombu's rediss default kept
    amqps = Celery("tls", broker="amqps://guest@127.0.0.1//", set_as_current=False)
    celery_ext.install(amqps)
    conn = amqps.connection_for_write()
    assert conn.transport is not None and conn.ssl is True
    assert conn.transport.default_connection_params["port"] == 5671


def test_the_lanes_own_bound_can_shed(unique_queue: str) -> None:
    app = Celery("bounds_local3", broker="local://", set_as_current=False)
    app.conf.task_default_queue = unique_queue
    celery_ext.install(app, lane_max_queued=2, lane_full_policy="shed")
    noop = noop_task(app)
    results = [noop.delay(i) for i in range(5)]
    assert lane_of(app).depth(unique_queue) == 2
    assert shed_count(app, unique_queue) == 3 and lane_of(app).shed_total == 3
    with app.connection_for_write() as conn:
        kept = [conn.default_channel.basic_get(unique_queue, no_ack=True) for _ in range(2)]
    assert [m.headers["id"] for m in kept] == [r.id for r in results[:2]]
