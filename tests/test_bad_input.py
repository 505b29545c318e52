"""Bad input: malformed bodies, missing or garbled headers, unknown tasks, pickle on a
json-only worker and oversize messages are dead-lettered with a reason while a real
worker goes on serving (local lane, Redis, RabbitMQ); the producer-side size cap;
json-only defaults; the local lane opens no socket."""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import NotRegistered
from kombu import Producer

import celery_ext
from celery_ext import DeadLetters, LocalWorker, MessageTooLarge
from celery_ext.metrics import counters_of
from celery_ext.sizes import LIMIT_OPTION
from tests.helpers import broker_url, embedded_worker, ext_section, new_app, wait_for

LIMIT = 20_000  # max_message_bytes in these tests


def _cleanup(app: Celery, kind: str, queues: list[str]) -> None:
    if kind == "local":
        return
    with app.connection_for_write() as conn:
        for queue in queues:
            conn.default_channel.queue_delete(queue)
        if kind == "amqp":  # Celery declared an exchange named after the task queue
            conn.default_channel.exchange_delete(queues[0])


@pytest.fixture(params=["local", "redis", "amqp"])
def app(request: pytest.FixtureRequest, unique_queue: str) -> Iterator[Celery]:
    kind = request.param
    app = new_app(broker_url(request, kind), unique_queue)
    dlq = f"{unique_queue}.dlq"
    celery_ext.install(app, dead_letter_queue=dlq, max_message_bytes=LIMIT)
    yield app
    _cleanup(app, kind, [unique_queue, dlq])
    app.close()


class Ran:
    """What the test task ran, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tags: list[str] = []

    def add(self, tag: str) -> None:
        with self.lock:
            self.tags.append(tag)


def record_task(app: Celery, ran: Ran) -> Any:
    @app.task(shared=False, name=f"bad_input.record.{uuid.uuid4().hex[:6]}")
    def record(tag: str) -> str:
        ran.add(tag)
        return tag

    return record


@contextmanager
def raw_producer(app: Celery) -> Iterator[Any]:
    """Publish raw messages to the app's task queue. The producer-side size cap is off
    on this connection: the worker's own check is what the tests exercise."""
    queue = app.conf.task_default_queue
    with app.connection_for_write(transport_options={LIMIT_OPTION: None}) as conn:
        producer = Producer(conn)

        def publish(
            body: Any,
            headers: dict[str, Any],
            content_type: str = "application/json",
            content_encoding: str = "utf-8",
        ) -> None:
            producer.publish(
                body,
                exchange="",
                routing_key=queue,
                content_type=content_type,
                content_encoding=content_encoding,
                headers=headers,
                declare=[app.amqp.queues[queue]],
            )

        yield publish


def task_message(app: Celery, name: str, args: list[Any], probe: str) -> tuple[dict[str, Any], str]:
    """Headers and JSON body of a protocol 2 task message, as Celery builds it."""
    message = app.amqp.as_task_v2(str(uuid.uuid4()), name, args=args, kwargs={})
    headers = dict(message.headers, probe=probe)
    return headers, json.dumps(message.body)


def by_probe(app: Celery) -> dict[str, dict[str, Any]]:
    return {str(e["headers"].get("probe")): e for e in DeadLetters(app).list()}


def test_bad_messages_are_dead_lettered_and_the_worker_keeps_serving(app: Celery) -> None:
    ran = Ran()
    record = record_task(app, ran)
    name = record.name
    expected: dict[str, str] = {}  # probe -> reason
    ids: dict[str, str | None] = {}  # probe -> the message's id, when it has one
    goods = []
    with embedded_worker(app) as worker, raw_producer(app) as publish:

        def bad(probe: str, reason: str, body: Any, headers: dict[str, Any], **kw: Any) -> None:
            headers = {**headers, "probe": probe}
            expected[probe], ids[probe] = reason, headers.get("id")
            publish(body, headers, **kw)
            goods.append(record.delay(f"good-after-{probe}"))  # interleaved good work

        headers, body = task_message(app, name, ["x"], "")
        bad("malformed-json", "undecodable", '{"args": [1,', headers)
        bad(
            "pickle",  # the worker accepts json only (stock default)
            "undecodable",
            pickle.dumps((["x"], {}, {})),
            task_message(app, name, ["x"], "")[0],
            content_type="application/x-python-serialize",
            content_encoding="binary",
        )
        bad(
            "pickle-no-headers",
            "undecodable",
            pickle.dumps({"task": name}),
            {},
            content_type="application/x-python-serialize",
            content_encoding="binary",
        )
        bad("no-task-header", "invalid message", json.dumps({"hello": "world"}), {})
        headers, body = task_message(app, name, ["no-id"], "")
        del headers["id"]
        bad("no-id-header", "invalid message", body, headers)
        headers, body = task_message(app, name, ["garbled"], "")
        bad("garbled-task-header", "invalid message", body, {**headers, "task": ["not", "a name"]})
        headers, body = task_message(app, "bad_input.nobody.knows", [7], "")
        bad("unknown-task", "unknown task", body, headers)
        headers, _ = task_message(app, name, ["shape"], "")
        bad("wrong-body-shape", "invalid message", json.dumps([1, 2]), headers)
        headers, body = task_message(app, name, ["x" * (LIMIT + 100)], "")
        bad("oversize", "oversize", body, headers)

        for result in goods:
            tag = result.get(timeout=30)
            assert tag.startswith("good-after-")
        wait_for(lambda: len(DeadLetters(app).list()) >= len(expected), timeout=30, every=0.1)
        final = record.delay("final")
        assert final.get(timeout=30) == "final"  # still serving after all of it
        section = ext_section(app, worker.hostname)

    entries = by_probe(app)
    assert {probe: e["reason"] for probe, e in entries.items()} == expected
    for probe, entry in entries.items():
        if ids[probe] is not None:
            assert entry["id"] == ids[probe], probe
        assert entry["id"] and entry["exception"]["message"] and entry["dead_at"], probe
        assert entry["queue"] == app.conf.task_default_queue, probe
        assert entry["message"]["delivery_info"]["routing_key"] == entry["queue"], probe
        assert entry["message"]["content_type"], probe
    assert entries["malformed-json"]["message"]["body"] == '{"args": [1,'
    assert entries["malformed-json"]["message"]["body_encoding"] == "utf-8"
    assert entries["pickle"]["message"]["body_encoding"] == "base64"
    assert entries["pickle"]["message"]["content_type"] == "application/x-python-serialize"
    assert "Refusing to deserialize" in entries["pickle"]["exception"]["message"]
    assert entries["unknown-task"]["task"] == "bad_input.nobody.knows"
    assert entries["unknown-task"]["args"] == [7]  # replayable once the task exists
    # The oversize entry itself is larger than the cap: only task messages are capped.
    oversize = entries["oversize"]["message"]
    assert oversize["body_bytes"] > LIMIT and len(oversize["body"]) > LIMIT
    assert "over celery_ext_max_message_bytes=20000" in entries["oversize"]["exception"]["message"]

    assert sorted(ran.tags) == sorted([f"good-after-{probe}" for probe in expected] + ["final"])
    counts = {
        "undecodable": 3,
        "unknown_task": 1,
        "invalid_message": 4,
        "oversize": 1,
        "not_dead_lettered": 0,
    }
    assert counters_of(app, "bad_input").snapshot() == counts
    assert section["bad_input"] == counts


def test_a_task_message_over_the_cap_is_refused_before_anything_is_sent(app: Celery) -> None:
    ran = Ran()
    record = record_task(app, ran)
    queue = app.conf.task_default_queue
    with app.connection_for_write() as conn:
        app.amqp.queues[queue].bind(conn.default_channel).declare()
    with pytest.raises(MessageTooLarge) as info:
        record.delay("x" * LIMIT)
    error = info.value
    assert error.limit == LIMIT and error.size > LIMIT and error.task == record.name
    assert f"is {error.size} bytes, over celery_ext_max_message_bytes={LIMIT}" in str(error)
    with pytest.raises(MessageTooLarge):
        app.send_task(record.name, args=["y" * LIMIT])
    with app.connection_for_write() as conn:
        try:
            depth = conn.default_channel.queue_declare(queue, passive=True).message_count
        except conn.channel_errors:
            depth = 0  # Redis: an empty queue is no key at all
    assert depth == 0  # nothing reached the queue
    with embedded_worker(app):
        assert record.delay("small").get(timeout=30) == "small"
    assert ran.tags == ["small"] and DeadLetters(app).list() == []


def test_when_the_dead_letter_queue_refuses_the_message_is_handled_as_stock() -> None:
    app = new_app("local://", f"bad_input.{uuid.uuid4().hex[:8]}")
    dlq = "bad_input.dlq"
    # The dead-letter queue holds 2 entries; the third push is refused with QueueFull.
    celery_ext.install(app, dead_letter_queue=dlq, queue_limits={dlq: 2}, queue_full_policy="raise")
    ran = Ran()
    record = record_task(app, ran)
    with embedded_worker(app), raw_producer(app) as publish:
        for n in range(3):
            headers, _ = task_message(app, record.name, [n], f"bad-{n}")
            publish("{not json", headers)
            assert record.delay(f"good-{n}").get(timeout=30) == f"good-{n}"
        wait_for(lambda: counters_of(app, "bad_input").snapshot()["undecodable"] == 3)
        assert record.delay("final").get(timeout=30) == "final"
    counts = counters_of(app, "bad_input").snapshot()
    assert counts["undecodable"] == 3 and counts["not_dead_lettered"] == 1
    assert sorted(by_probe(app)) == ["bad-0", "bad-1"]


def test_an_unknown_task_replays_once_it_is_deployed() -> None:
    app = Celery(f"replay_{uuid.uuid4().hex[:6]}", broker="local://", set_as_current=False)
    app.conf.update(result_backend="cache+memory://", worker_hijack_root_logger=False)
    celery_ext.install(app)
    name = f"bad_input.later.{uuid.uuid4().hex[:6]}"
    with LocalWorker(app, concurrency=1) as worker:
        result = app.send_task(name, args=[2, 3])
        wait_for(lambda: len(DeadLetters(app).list()) == 1)
        (entry,) = DeadLetters(app).list()
        assert (entry["reason"], entry["task"], entry["args"]) == ("unknown task", name, [2, 3])
        assert isinstance(result.get(timeout=10, propagate=False), NotRegistered)  # as stock

        @app.task(shared=False, name=name)
        def later(x: int, y: int) -> int:
            return x * y

        assert DeadLetters(app).replay() == [result.id]
        worker.join(timeout=10)
        assert app.AsyncResult(result.id).get(timeout=10) == 6
    assert DeadLetters(app).list() == []


def test_defaults_accept_json_only_and_install_does_not_widen_them() -> None:
    app = Celery("json_only", broker="local://", set_as_current=False)
    keys = (
        "accept_content",
        "task_serializer",
        "result_serializer",
        "result_accept_content",
        "event_serializer",
    )
    before = {key: app.conf[key] for key in keys}
    assert list(before["accept_content"]) == ["json"] and before["task_serializer"] == "json"
    assert before["result_serializer"] == "json" and before["result_accept_content"] is None
    celery_ext.install(app)
    assert {key: app.conf[key] for key in keys} == before
    assert celery_ext.settings_of(app).max_message_bytes is None  # no cap unless asked


_NO_SOCKETS = r"""
import sys

events = []
sys.addaudithook(
    lambda event, args: events.append(event)
    if event.startswith("socket.") and event != "socket.gethostname"
    else None
)

import uuid
from celery import Celery
import celery_ext
from celery_ext import DeadLetters, LocalWorker
from kombu import Producer

app = Celery("no_sockets", broker="local://", set_as_current=False)
app.conf.update(result_backend="cache+memory://", worker_hijack_root_logger=False)
celery_ext.install(app, max_message_bytes=10_000)

@app.task(name="no_sockets.add")
def add(x, y):
    return x + y

with LocalWorker(app, concurrency=2) as worker:
    assert add.delay(2, 3).get(timeout=10) == 5
    with app.connection_for_write() as conn:  # a bad message: dead-lettered on the lane
        Producer(conn).publish(
            "{not json", routing_key="celery", content_type="application/json",
            content_encoding="utf-8", headers={"task": "no_sockets.add", "id": "bad-1"},
        )
    assert add.delay(4, 5).get(timeout=10) == 9
    worker.join(timeout=10)
    assert [e["reason"] for e in DeadLetters(app).list()] == ["undecodable"]
print("SOCKET EVENTS:", events)
sys.exit(1 if events else 0)
"""


def test_the_local_lane_never_opens_a_socket() -> None:
    """A local-lane app, its worker and its dead letters, with every socket audit event
    recorded (in a child process: an audit hook cannot be removed)."""
    done = subprocess.run(
        [sys.executable, "-c", _NO_SOCKETS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- below Celery: items that are not kombu messages -------------------------------------------
def _push_raw(app: Celery, kind: str, items: list[tuple[bytes, str | None]]) -> None:
    """Put ``items`` (body, content type) in the app's queue the way a non-Celery producer
    would: LPUSH on Redis (no kombu envelope), a bare basic.publish on RabbitMQ."""
    queue = app.conf.task_default_queue
    with app.connection_for_write() as conn:
        app.amqp.queues[queue].bind(conn.default_channel).declare()
        if kind == "redis":
            client = conn.default_channel.client
            for body, _ in items:
                client.lpush(queue, body)
            return
        import amqp

        channel = conn.connection.channel()  # py-amqp itself: no kombu, no headers
        try:
            for body, content_type in items:
                properties = {"content_type": content_type} if content_type else {}
                channel.basic_publish(amqp.Message(body, **properties), routing_key=queue)
        finally:
            channel.close()


@pytest.mark.parametrize("app", ["redis", "amqp"], indirect=True)
def test_garbage_on_the_wire_is_dead_lettered_and_the_worker_keeps_consuming(
    app: Celery, request: pytest.FixtureRequest
) -> None:
    # Stock Celery dies on a non-JSON Redis item (JSONDecodeError), and a JSON item
    # without kombu's envelope was lost in a reconnect (KeyError('properties')).
    kind = request.node.callspec.params["app"]
    ran = Ran()
    record = record_task(app, ran)
    garbage: list[tuple[bytes, str | None]] = [
        (b"not json", "text/plain"),
        (b'{"hello": "world"}', "application/json"),
        (b"\xff\xfe\x00binary", None),
        (b"[1, 2, 3]", "application/octet-stream"),
    ]
    if kind == "redis":  # an envelope kombu cannot read: its body is not base64
        envelope = {
            "body": "%%% not base64 %%%",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "delivery_tag": str(uuid.uuid4()),
                "body_encoding": "base64",
                "delivery_info": {"exchange": "", "routing_key": app.conf.task_default_queue},
            },
        }
        garbage.append((json.dumps(envelope).encode(), None))
    with embedded_worker(app) as worker:
        assert record.delay("before").get(timeout=30) == "before"
        _push_raw(app, kind, garbage)
        wait_for(lambda: len(DeadLetters(app).list()) >= len(garbage), timeout=30, every=0.1)
        for n in range(3):  # the same worker goes on consuming
            assert record.delay(f"after-{n}").get(timeout=30) == f"after-{n}"
        section = ext_section(app, worker.hostname)
    entries = DeadLetters(app).list()
    assert len(entries) == len(garbage), entries
    bodies = set()
    for entry in entries:
        kept = entry["message"]
        raw = (
            base64.b64decode(kept["body"])
            if kept["body_encoding"] == "base64"
            else kept["body"].encode()
        )
        bodies.add(raw)
        assert entry["reason"] in ("undecodable", "invalid message"), entry
        assert entry["queue"] == app.conf.task_default_queue and entry["exception"]["message"]
    if kind == "redis":  # the raw list items, byte for byte
        assert {body for body, _ in garbage[:4]} <= bodies
    else:  # what RabbitMQ delivered: the bodies as published
        assert {body for body, _ in garbage} == bodies
    assert sum(section["bad_input"].values()) == len(garbage)
    assert sorted(ran.tags) == ["after-0", "after-1", "after-2", "before"]
    with app.connection_for_write() as conn:
        if kind == "redis":  # nothing left held, nothing left unacked of this queue
            client = conn.default_channel.client
            queue = app.conf.task_default_queue
            assert client.llen(f"{queue}:celery_ext.unreadable") == 0
