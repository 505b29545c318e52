"""Redis deliveries through celery_ext's channel: popped and recorded in one step (real Redis)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Consumer, Exchange, Producer, Queue

import celery_ext
from tests.helpers import new_app, wait_for


@pytest.fixture
def app(redis_url: str, unique_queue: str) -> Iterator[Celery]:
    app = new_app(redis_url, unique_queue)
    celery_ext.install(app)
    yield app
    app.close()


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def _publish(channel: Any, queue: Queue, body: dict[str, int]) -> None:
    Producer(channel).publish(
        body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
    )


def _receive(conn: Any, queues: list[Queue], n: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    consumer = Consumer(conn.default_channel, queues, callbacks=[lambda _b, m: got.append(m)])
    deadline = time.monotonic() + timeout
    with consumer:
        while len(got) < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)
    return got


def test_a_delivered_message_is_unacked_and_owned_at_once(
    app: Celery, redis_url: str, unique_queue: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    owned = f"{unique_queue}.owned"
    queue = _queue(unique_queue)
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            channel.celery_ext_owned_key = owned  # what the Leases step sets
            _publish(channel, queue, {"n": 1})
            (message,) = _receive(conn, [queue], 1)
            tag = message.delivery_tag
            assert client.hexists("unacked", tag)
            assert client.zscore("unacked_index", tag) is not None
            assert client.sismember(owned, tag)
            assert message.payload == {"n": 1}
            message.ack()
            assert not client.hexists("unacked", tag)
            assert client.zscore("unacked_index", tag) is None
    finally:
        client.delete(owned, unique_queue)


def test_an_idle_consumer_wakes_for_each_queue_and_priority_and_takes_each_message_once(
    app: Celery, redis_url: str, unique_queue: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    first, second = _queue(unique_queue), _queue(f"{unique_queue}.b")
    got: list[Any] = []
    with app.connection_for_read() as conn:
        # The channel is made here, before the receiver thread uses it: two threads
        # creating conn.default_channel at once can each get a channel of their own.
        channel = conn.default_channel
        receiver = threading.Thread(target=lambda: got.extend(_receive(conn, [first, second], 4)))
        with app.connection_for_write() as pub:
            producer = Producer(pub.default_channel)
            for q in (first, second):
                q(pub.default_channel).declare()
            receiver.start()
            # Publish once the consumer found nothing and blocks in its idle wait.
            wait_for(lambda: channel._celery_ext_waiting, timeout=10, every=0.005)
            producer.publish({"n": 0}, exchange=first.exchange, routing_key=first.routing_key)
            producer.publish({"n": 1}, exchange=second.exchange, routing_key=second.routing_key)
            producer.publish(
                {"n": 2}, exchange=first.exchange, routing_key=first.routing_key, priority=9
            )
            producer.publish(
                {"n": 3}, exchange=second.exchange, routing_key=second.routing_key, priority=5
            )
        receiver.join(20)
        for message in got:
            message.ack()
    assert sorted(m.payload["n"] for m in got) == [0, 1, 2, 3]
    for name in (first.name, second.name):
        for key in client.keys(f"{name}*"):
            assert client.llen(key) == 0
        client.delete(*client.keys(f"{name}*") or [name])


def test_global_keyprefix_is_applied_to_the_record(redis_url: str, unique_queue: str) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    app = new_app(redis_url, unique_queue)
    app.conf.broker_transport_options = {"global_keyprefix": prefix}
    celery_ext.install(app)
    client = redis.Redis.from_url(redis_url)
    queue = _queue(unique_queue)
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            _publish(channel, queue, {"n": 1})
            (message,) = _receive(conn, [queue], 1)
            assert client.hexists(f"{prefix}unacked", message.delivery_tag)
            message.ack()
            assert not client.hexists(f"{prefix}unacked", message.delivery_tag)
            assert client.llen(f"{prefix}{unique_queue}") == 0
    finally:
        for key in client.keys(f"{prefix}*"):
            client.delete(key)
        app.close()
