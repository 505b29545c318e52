"""RabbitMQ quorum queues (``task_default_queue_type="quorum"``): every guarantee kept.

A cluster loses a classic queue with its node, so an app on quorum queues gets
its parked waits (far countdowns, retry waits) and its dead letters in quorum
queues too, and its queue bound (``x-max-length`` + ``reject-publish``) on the
quorum queue itself. Each test runs a real worker on the shared RabbitMQ.

A queue's type is read back over AMQP: re-declaring a quorum queue as
``classic`` fails with RabbitMQ's "inequivalent arg 'x-queue-type'".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from amqp.exceptions import PreconditionFailed
from celery import Celery
from kombu import Connection

import celery_ext
from celery_ext.transports import guarantees
from celery_ext.transports.amqp import AmqpParking, queue_type_of
from tests.helpers import embedded_worker, ext_section, new_app, wait_for


def _type_of(app: Celery, queue: str, arguments: dict[str, Any]) -> str:
    """``"quorum"`` or ``"classic"``: whether RabbitMQ refuses ``queue`` declared classic
    (on kombu's own transport: celery_ext's would add the bound's arguments)."""
    with Connection(app.conf.broker_url) as conn:
        channel = conn.channel()
        try:
            channel.queue_declare(
                queue,
                durable=True,
                auto_delete=False,
                arguments={**arguments, "x-queue-type": "classic"},
            )
        except PreconditionFailed as exc:
            assert "x-queue-type" in str(exc), exc
            return "quorum"
        return "classic"


@pytest.fixture
def quorum_app(amqp_url: str, unique_queue: str) -> Iterator[Celery]:
    app = new_app(amqp_url, unique_queue, task_default_queue_type="quorum", task_acks_late=True)
    celery_ext.install(
        app,
        eta_horizon=1.0,
        park_interval=0.2,
        park_prefix=unique_queue,
        queue_limits={unique_queue: 3},
        dead_letter_queue=f"{unique_queue}.dead",
    )
    yield app
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        AmqpParking(channel, unique_queue, "quorum").delete()
        for queue in (unique_queue, f"{unique_queue}.dead"):
            channel.queue_delete(queue)
            channel.exchange_delete(queue)
    app.close()


def test_a_quorum_app_parks_waits_and_keeps_dead_letters_in_quorum_queues(
    quorum_app: Celery, unique_queue: str
) -> None:
    app = quorum_app
    assert queue_type_of(app) == "quorum"
    runs: list[tuple[str, int]] = []

    @app.task(shared=False, bind=True, name="quorum.later")
    def later(self: Any) -> None:
        runs.append(("later", self.request.retries))

    @app.task(shared=False, bind=True, name="quorum.flaky")
    @celery_ext.retry(on=ConnectionError, attempts=2, wait=celery_ext.fixed(1.5))
    def flaky(self: Any) -> None:
        runs.append(("flaky", self.request.retries))
        raise ConnectionError("fails every time: the wait is parked, then dead-lettered")

    with embedded_worker(app) as worker:
        broker = ext_section(app, worker.hostname)["broker"]  # what inspect stats says
        assert (broker["transport"], broker["queue_type"]) == ("amqp", "quorum")
        later.apply_async(countdown=2.5)  # beyond the 1 s horizon: parked at publish
        flaky.delay()
        parking = AmqpParking(None, unique_queue, "quorum")
        wait_for(lambda: ("later", 0) in runs and len([r for r in runs if r[0] == "flaky"]) == 2)
        dead = celery_ext.DeadLetters(app)
        wait_for(lambda: len(dead.list()) == 1)
    assert dead.list()[0]["task"] == "quorum.flaky"
    # The delay levels (level 1 holds the 1.5-2.5 s waits), the due queue and the
    # dead letters are quorum queues; the app's own queue too (Celery's doing).
    level_1 = {
        "x-overflow": "reject-publish",
        "x-message-ttl": 2000,
        "x-dead-letter-exchange": parking.delay_queues[0],
        "x-dead-letter-strategy": "at-least-once",
    }
    assert _type_of(app, parking.delay_queues[1], level_1) == "quorum"
    assert _type_of(app, parking.due_queue, {}) == "quorum"
    assert _type_of(app, f"{unique_queue}.dead", {}) == "quorum"
    bound = {"x-max-length": 2, "x-overflow": "reject-publish"}  # quorum: N - 1 holds N
    assert _type_of(app, unique_queue, bound) == "quorum"
    assert guarantees(app)["queue_type"] == "quorum"
    assert "quorum" in guarantees(app)["parked"]


def test_a_bound_on_a_quorum_queue_refuses_with_queue_full(
    quorum_app: Celery, unique_queue: str
) -> None:
    app = quorum_app

    @app.task(shared=False, name="quorum.noop")
    def noop() -> None:
        pass

    for _ in range(3):
        noop.delay()
    with pytest.raises(celery_ext.QueueFull) as caught:
        noop.delay()
    assert (caught.value.queue, caught.value.limit) == (unique_queue, 3)
    with app.connection_for_write() as conn:
        assert conn.default_channel.queue_declare(unique_queue, passive=True).message_count == 3


def test_a_classic_app_keeps_classic_parking(amqp_url: str, unique_queue: str) -> None:
    app = new_app(amqp_url, unique_queue)
    celery_ext.install(app, park_prefix=unique_queue)
    assert queue_type_of(app) == "classic"
    parking = AmqpParking(None, unique_queue, queue_type_of(app))
    assert parking.due_queue == f"{unique_queue}_celery_due"
    quorum = AmqpParking(None, unique_queue, "quorum")
    assert quorum.due_queue == f"{unique_queue}_quorum_celery_due"  # never the same queue
    with pytest.raises(ValueError, match="queue_type"):
        AmqpParking(None, unique_queue, "stream")
