"""Parking delayed messages on Redis: due-time moves, exactly once, with routing intact."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from celery import Celery
from kombu import Connection

import celery_ext
from celery_ext.delays import RedisParking


@pytest.fixture
def conn(redis_url: str) -> Iterator[Connection]:
    with Connection(redis_url) as connection:
        yield connection


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
    conn.default_channel.client.delete(f"celery_ext.parked:{unique_queue}")


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
        with Connection(conn.as_uri(include_password=True)) as own:
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
