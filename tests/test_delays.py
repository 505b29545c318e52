"""Parking delayed messages on Redis and RabbitMQ: due-time moves, exactly once, routing intact."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.transport.native_delayed_delivery import calculate_routing_key

import celery_ext
from celery_ext.transports.amqp import AMQP_MAX_DELAY_S, AmqpParking, _keys
from celery_ext.transports.redis import RedisParking


@pytest.fixture
def conn(redis_url: str) -> Iterator[Connection]:
    # A key prefix per test, so the parking registry is ours alone: a parallel
    # run's mover (any worker on db 11) would otherwise move our messages.
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    with Connection(redis_url, transport_options={"global_keyprefix": prefix}) as connection:
        yield connection
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def publish(conn: Connection, queue: str, body: str, priority: int = 0) -> dict[str, object]:
    """Publish through kombu's Redis transport and take the raw payload back off the list."""
    channel = conn.default_channel
    channel.queue_declare(queue, auto_delete=False)
    channel.basic_publish(channel.prepare_message(body, priority=priority), "", queue)
    message = channel.basic_get(queue, no_ack=True)
    assert message is not None
    raw: dict[str, object] = message.serializable()
    return raw


def wait_for(check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_parked_messages_stay_parked_until_due(conn: Connection, unique_queue: str) -> None:
    parking = RedisParking(conn.default_channel)
    raw = publish(conn, unique_queue, "later")
    due = parking.park(unique_queue, raw, delay_s=60)
    assert due > time.time() + 50
    assert parking.move_due() == 0
    assert parking.parked(unique_queue) == 1
    assert conn.default_channel.client.llen(unique_queue) == 0


def test_due_messages_return_to_their_queue_unchanged(conn: Connection, unique_queue: str) -> None:
    channel = conn.default_channel
    parking = RedisParking(channel)
    raw = publish(conn, unique_queue, "soon")
    parking.park(unique_queue, raw, delay_s=0.2)
    moved: list[int] = []
    wait_for(lambda: bool(moved.append(parking.move_due()) or sum(moved)))
    assert sum(moved) == 1 and parking.parked(unique_queue) == 0
    back = channel.basic_get(unique_queue, no_ack=True)
    assert back is not None
    assert back.body == b"soon" or back.body == "soon"
    assert back.headers == raw["headers"]
    assert back.properties["delivery_tag"] == raw["properties"]["delivery_tag"]  # type: ignore[index]


def test_priority_messages_park_and_return_to_their_priority_list(
    conn: Connection, unique_queue: str
) -> None:
    channel = conn.default_channel
    parking = RedisParking(channel)
    raw = publish(conn, unique_queue, "urgent", priority=9)
    parking.park(unique_queue, raw, delay_s=0)
    assert parking.move_due() == 1
    priority_list = channel._q_for_pri(unique_queue, channel.priority(9))
    assert priority_list != unique_queue
    assert channel.client.llen(priority_list) == 1
    channel.client.delete(priority_list)


def test_concurrent_movers_move_each_message_exactly_once(
    conn: Connection, unique_queue: str
) -> None:
    parking = RedisParking(conn.default_channel)
    raws = [publish(conn, unique_queue, f"m{i}") for i in range(200)]
    for raw in raws:
        parking.park(unique_queue, raw, delay_s=0)
    totals: list[int] = []

    def mover() -> None:
        with Connection(
            conn.as_uri(include_password=True), transport_options=conn.transport_options
        ) as own:
            mine = RedisParking(own.default_channel)
            n = 0
            while mine.parked(unique_queue):
                n += mine.move_due(limit=7)
            totals.append(n)

    threads = [threading.Thread(target=mover) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    channel = conn.default_channel
    bodies = []
    while (message := channel.basic_get(unique_queue, no_ack=True)) is not None:
        bodies.append(message.body)
    assert sum(totals) == 200
    assert sorted(bodies) == sorted(f"m{i}".encode() for i in range(200))


def test_global_keyprefix_is_honoured(redis_url: str, unique_queue: str) -> None:
    prefix = f"pfx{uuid.uuid4().hex[:6]}:"
    with Connection(redis_url, transport_options={"global_keyprefix": prefix}) as conn:
        channel = conn.default_channel
        parking = RedisParking(channel)
        raw = publish(conn, unique_queue, "prefixed")
        parking.park(unique_queue, raw, delay_s=0)
        assert parking.move_due() == 1
        back = channel.basic_get(unique_queue, no_ack=True)
        assert back is not None and back.body in (b"prefixed", "prefixed")


def test_a_parked_task_runs_once_on_a_real_worker(redis_url: str, unique_queue: str) -> None:
    from celery.contrib.testing.worker import start_worker

    app = Celery(f"park_{uuid.uuid4().hex[:6]}", broker=redis_url, set_as_current=False)
    app.conf.update(task_default_queue=unique_queue, worker_hijack_root_logger=False)
    celery_ext.install(app)
    runs: list[str] = []

    @app.task(shared=False, bind=True, name="park.record")
    def record(self: object, value: str) -> None:
        runs.append(value)

    record.delay("parked")
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        message = channel.basic_get(unique_queue, no_ack=True)
        assert message is not None
        RedisParking(channel).park(unique_queue, message.serializable(), delay_s=0.3)
    with start_worker(app, pool="threads", perform_ping_check=False, queues=[unique_queue]):
        with app.connection_for_write() as conn:
            parking = RedisParking(conn.default_channel)
            wait_for(lambda: parking.move_due() > 0 or bool(runs))
        wait_for(lambda: bool(runs))
    assert runs == ["parked"]


# -- RabbitMQ ------------------------------------------------------------------


@pytest.fixture
def rabbit(amqp_url: str, unique_queue: str) -> Iterator[AmqpParking]:
    """An AmqpParking with its own delay topology (prefix) and a durable target queue."""
    with Connection(amqp_url) as connection:
        channel = connection.default_channel
        channel.queue_declare(unique_queue, durable=True, auto_delete=False)
        yield AmqpParking(channel, prefix=unique_queue)
    with Connection(amqp_url) as connection:  # fresh: a test may have closed its channel
        AmqpParking(connection.default_channel, prefix=unique_queue).delete()
        connection.default_channel.queue_delete(unique_queue)


def sample(channel: Any, queue: str) -> amqp.Message:
    """A message with every kind of property, published and taken back off ``queue``."""
    headers = {"id": uuid.uuid4().hex, "task": "t.add", "retries": 2, "nested": {"a": [1, "b"]}}
    properties = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "priority": 7,
        "delivery_mode": 2,
        "correlation_id": headers["id"],
        "reply_to": "replies",
        "message_id": "m-1",
        "type": "task",
        "app_id": "shop",
        "timestamp": 1_700_000_000,
    }
    message = amqp.Message('{"args": [1, 2]}', application_headers=headers, **properties)
    channel.basic_publish(message, "", queue)
    got: list[amqp.Message] = []
    wait_for(lambda: got.append(channel.basic_get(queue, no_ack=True)) or got[-1])
    return got[-1]


def arrival(
    channel: Any, queue: str, timeout: float, mover: AmqpParking | None = None
) -> tuple[amqp.Message | None, float]:
    """The next message on ``queue`` and when it came, or (None, now) after ``timeout``;
    ``mover`` moves due messages meanwhile, as a worker does every ``park_interval``."""
    deadline = time.monotonic() + timeout
    while (message := channel.basic_get(queue, no_ack=True)) is None:
        if time.monotonic() > deadline:
            break
        if mover is not None:
            mover.move_due()
        time.sleep(0.005)
    return message, time.time()


def without_dead_letter_headers(headers: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in headers.items() if not k.startswith(("x-death", "x-first-death-"))}


def test_amqp_keys_and_limits_are_checked_before_any_io() -> None:
    parking = AmqpParking(channel=None, prefix="unused")
    message = {"body": b"x", "properties": {}}
    with pytest.raises(ValueError, match="maximum"):
        parking.park("q", message, delay_s=AMQP_MAX_DELAY_S + 1)
    for bad in ("", "a.*.b", "a.#", "q" * 200):
        with pytest.raises(ValueError, match="cannot park"):
            parking.park(bad, message, delay_s=1)
    with pytest.raises(ValueError, match="empty"):
        AmqpParking(channel=None, prefix="")
    # Same routing keys as kombu's own native delayed delivery (which refuses 0).
    for delay in (1, 5, 3600, AMQP_MAX_DELAY_S):
        assert _keys("a.b", delay)[0] == calculate_routing_key(delay, "a.b")


def test_amqp_parked_message_stays_parked_until_due(rabbit: AmqpParking, unique_queue: str) -> None:
    channel = rabbit.channel
    due = rabbit.park(unique_queue, sample(channel, unique_queue), delay_s=60)
    assert due >= time.time() + 59
    assert rabbit.move_due() == 0
    wait_for(lambda: rabbit.parked(unique_queue) == 1)
    message, _ = arrival(channel, unique_queue, timeout=0.5)
    assert message is None
    assert rabbit.parked(unique_queue) == 1


def test_amqp_due_message_returns_once_unchanged_and_on_time(
    rabbit: AmqpParking, unique_queue: str
) -> None:
    channel = rabbit.channel
    original = sample(channel, unique_queue)
    due = rabbit.park(unique_queue, original, delay_s=1)
    assert arrival(channel, unique_queue, timeout=2)[0] is None  # no mover, no message
    back, at = arrival(channel, unique_queue, timeout=5, mover=rabbit)
    assert back is not None
    assert due - 0.05 <= at <= due + 3.0, at - due
    assert back.body == original.body
    props = {k: v for k, v in back.properties.items() if k != "application_headers"}
    assert props == {k: v for k, v in original.properties.items() if k != "application_headers"}
    assert back.headers == original.headers  # RabbitMQ's x-death bookkeeping stays behind
    assert (back.delivery_info["exchange"], back.delivery_info["routing_key"]) == ("", unique_queue)
    assert rabbit.parked(unique_queue) == 0
    assert arrival(channel, unique_queue, timeout=0.3, mover=rabbit)[0] is None  # exactly once


def test_amqp_short_delay_is_not_blocked_behind_a_long_one(
    rabbit: AmqpParking, unique_queue: str
) -> None:
    channel = rabbit.channel
    rabbit.park(unique_queue, {"body": b"long", "properties": {}}, delay_s=60)
    rabbit.park(unique_queue, {"body": b"longer", "properties": {}}, delay_s=300)
    rabbit.park(unique_queue, {"body": b"now", "properties": {}}, delay_s=0)
    due = rabbit.park(unique_queue, {"body": b"short", "properties": {}}, delay_s=1)
    now, _ = arrival(channel, unique_queue, timeout=1, mover=rabbit)
    assert now is not None and now.body in (b"now", "now")
    back, at = arrival(channel, unique_queue, timeout=5, mover=rabbit)
    assert back is not None and back.body in (b"short", "short")
    assert at <= due + 1.0
    assert rabbit.parked(unique_queue) == 2


def test_amqp_returned_message_can_be_parked_again(rabbit: AmqpParking, unique_queue: str) -> None:
    channel = rabbit.channel
    original = sample(channel, unique_queue)
    rabbit.park(unique_queue, original, delay_s=1)
    first, _ = arrival(channel, unique_queue, timeout=5, mover=rabbit)
    assert first is not None
    rabbit.park(unique_queue, channel.message_to_python(first), delay_s=1)
    second, _ = arrival(channel, unique_queue, timeout=5, mover=rabbit)
    assert second is not None
    assert without_dead_letter_headers(second.headers) == original.headers


def test_amqp_a_due_message_for_a_full_bounded_queue_waits_instead_of_vanishing(
    amqp_url: str, unique_queue: str
) -> None:
    # RabbitMQ drops a dead-lettered message that a queue at its x-max-length with
    # reject-publish refuses: a parked retry or countdown of a bounded queue kept
    # full by blocking producers vanished. The mover waits for room instead.
    with Connection(amqp_url) as connection:
        channel = connection.default_channel
        bounded = {"x-max-length": 1, "x-overflow": "reject-publish"}
        channel.queue_declare(unique_queue, durable=True, auto_delete=False, arguments=bounded)
        mover = AmqpParking(connection.channel(), prefix=unique_queue)
        try:
            channel.basic_publish(amqp.Message(b"filler"), "", unique_queue)
            mover.park(unique_queue, {"body": b"parked", "properties": {}}, delay_s=1)
            time.sleep(1.5)  # due: now refused by the full queue, again and again
            for _ in range(20):
                mover.move_due()
                time.sleep(0.1)
            filler = channel.basic_get(unique_queue, no_ack=True)
            assert filler is not None and filler.body in (b"filler", "filler")
            back, _ = arrival(channel, unique_queue, timeout=5, mover=mover)
            assert back is not None and back.body in (b"parked", "parked")
        finally:
            mover.delete()
            channel.queue_delete(unique_queue)


def test_amqp_parked_task_runs_once_on_a_real_worker(amqp_url: str, unique_queue: str) -> None:
    from celery.contrib.testing.worker import start_worker

    app = Celery(f"park_{uuid.uuid4().hex[:6]}", broker=amqp_url, set_as_current=False)
    app.conf.update(
        task_default_queue=unique_queue,
        worker_hijack_root_logger=False,
        broker_heartbeat=0,  # else the embedded worker takes ~10 s to stop
    )
    celery_ext.install(app, park_prefix=unique_queue)  # its workers move what is due there
    runs: list[str] = []

    @app.task(shared=False, bind=True, name="park.record")
    def record(self: object, value: str) -> None:
        runs.append(value)

    try:
        record.delay("parked")
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            parking = AmqpParking(channel, prefix=unique_queue)
            got: list[Any] = []
            wait_for(lambda: got.append(channel.basic_get(unique_queue)) or got[-1])
            parking.park(unique_queue, got[-1], delay_s=1)
            channel.basic_ack(got[-1].delivery_tag)  # parked first, then acked
            wait_for(lambda: parking.parked(unique_queue) == 1)
            with start_worker(app, pool="threads", perform_ping_check=False, queues=[unique_queue]):
                wait_for(lambda: bool(runs))
                wait_for(lambda: parking.parked(unique_queue) == 0)
                assert channel.queue_declare(unique_queue, passive=True).message_count == 0
        assert runs == ["parked"]
    finally:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            AmqpParking(channel, prefix=unique_queue).delete()
            channel.queue_delete(unique_queue)
            channel.exchange_delete(unique_queue)  # Celery's default exchange for the queue
        app.close()
