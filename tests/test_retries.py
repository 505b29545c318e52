"""Retry policies on real workers: local lane, Redis and RabbitMQ; dead letters and replay."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TimeLimitExceeded

import celery_ext
from celery_ext import DeadLetters, LocalWorker, RetryAfter, TaskTimeout, fixed
from celery_ext.delays import RETRY_HEADER
from celery_ext.signals import retries_exhausted
from celery_ext.transports.amqp import AmqpParking
from tests.helpers import broker_url, embedded_worker, get_or_dump, new_app, wait_for


@pytest.fixture(params=["local", "redis", "amqp"])
def app(request: pytest.FixtureRequest, unique_queue: str) -> Iterator[Celery]:
    kind = request.param
    app = new_app(broker_url(request, kind), unique_queue)
    celery_ext.install(app, park_interval=0.1, dead_letter_queue=f"{unique_queue}.dlq")
    yield app
    if kind != "local":
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in (unique_queue, f"{unique_queue}.dlq"):
                channel.queue_delete(queue)
            if kind == "amqp":
                channel.exchange_delete(unique_queue)
            else:
                client = channel.client
                client.delete(f"celery_ext.parked:{unique_queue}")
                client.hdel("celery_ext.parked", f"celery_ext.parked:{unique_queue}")


worker = embedded_worker


def name() -> str:
    return f"rt.{uuid.uuid4().hex[:8]}"


def test_a_task_failing_twice_then_succeeding_runs_exactly_three_times(app: Celery) -> None:
    calls: list[float] = []

    @app.task(shared=False, name=name(), acks_late=True)
    @celery_ext.retry(on=ConnectionError, attempts=5, wait=fixed(0.3))
    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    with worker(app):
        assert flaky.delay().get(timeout=30) == "ok"
    assert len(calls) == 3
    assert all(b - a >= 0.3 - 0.02 for a, b in itertools.pairwise(calls)), calls


def _where_is_it(app: Celery, calls: list[float]) -> dict[str, Any]:
    """Attempts so far and the messages waiting in the queue and the delay levels."""
    found: dict[str, Any] = {"attempts": len(calls)}
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        queue = app.conf.task_default_queue
        if conn.transport.driver_type == "amqp":
            parking = AmqpParking(channel)
            found["parked"] = parking.parked(queue)
        found["queued"] = channel.queue_declare(queue, passive=True).message_count
    return found


def test_the_deadline_runs_out_and_the_task_is_dead_lettered(app: Celery) -> None:
    exhausted: list[dict[str, Any]] = []

    def on_exhausted(sender: Any = None, **kw: Any) -> None:
        exhausted.append(kw)

    retries_exhausted.connect(on_exhausted, weak=False)
    calls: list[float] = []

    @app.task(shared=False, name=name(), acks_late=True)
    @celery_ext.retry(on=ValueError, attempts=100, deadline=1.0, wait=fixed(0.3))
    def always(order: int) -> None:
        calls.append(time.monotonic())
        raise ValueError(f"nope {order}")

    try:
        with worker(app):
            result = always.delay(7)
            with pytest.raises(ValueError, match="nope 7"):
                get_or_dump(result, 30, lambda: _where_is_it(app, calls))
            wait_for(lambda: exhausted)
    finally:
        retries_exhausted.disconnect(on_exhausted)
    assert 2 <= len(calls) <= 4, calls  # attempts 0.3 s apart within a 1 s budget
    # RabbitMQ rounds each wait up to a whole second: the last attempt may start
    # up to deadline + 1 s; more slack for a loaded machine.
    assert calls[-1] - calls[0] <= 1.0 + 1.0 + 1.0
    assert exhausted[0]["task_id"] == result.id and exhausted[0]["reason"] == "deadline"
    entry = DeadLetters(app).show(result.id)
    assert entry is not None, DeadLetters(app).list()
    assert entry["task"] == always.name and entry["args"] == [7]
    assert entry["reason"] == "deadline"
    assert entry["exception"]["type"] == "builtins.ValueError"
    assert "nope 7" in entry["exception"]["traceback"]
    assert [a["error"] for a in entry["attempts"]] == ["ValueError: nope 7"] * len(calls)
    assert entry["queue"] == app.conf.task_default_queue


def test_retry_after_is_honoured(app: Celery) -> None:
    calls: list[float] = []

    @app.task(shared=False, name=name())
    @celery_ext.retry(attempts=3, wait=fixed(0.01))
    def limited() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RetryAfter(1.0, "rate limited")
        return "ok"

    with worker(app):
        assert limited.delay().get(timeout=30) == "ok"
    assert calls[1] - calls[0] >= 1.0 - 0.02


def test_a_replayed_task_gets_a_fresh_budget(app: Celery) -> None:
    broken = threading.Event()
    broken.set()
    calls: list[str] = []

    @app.task(shared=False, name=name(), acks_late=True)
    @celery_ext.retry(attempts=2, wait=fixed(0.05))
    def fragile(x: int) -> int:
        calls.append("run")
        if broken.is_set():
            raise RuntimeError("backend down")
        return x * 2

    dead = DeadLetters(app)
    with worker(app):
        result = fragile.delay(21)
        with pytest.raises(RuntimeError):
            result.get(timeout=30)
        wait_for(lambda: dead.show(result.id) is not None)
        assert len(calls) == 2
        broken.clear()
        assert dead.replay([result.id]) == [result.id]
        # A fresh AsyncResult per look: one that saw FAILURE keeps it cached.
        wait_for(lambda: app.AsyncResult(result.id).state == "SUCCESS")
        assert app.AsyncResult(result.id).get(timeout=5) == 42
    assert dead.list() == []
    assert len(calls) == 3


def refuse_the_first_retry(app: Celery) -> threading.Event:
    """Make the app's first publish of a celery_ext retry fail; set once it did.

    (A receiver of ``before_task_publish`` cannot: Celery logs its errors and publishes.)
    """
    failed_once = threading.Event()
    send = app.amqp.send_task_message

    def send_but_refuse_the_first_retry(*args: Any, **kwargs: Any) -> Any:
        headers = {**(args[2].headers or {}), **(kwargs.get("headers") or {})}
        if RETRY_HEADER in headers and not failed_once.is_set():
            failed_once.set()
            raise OSError("the broker refused the next attempt")
        return send(*args, **kwargs)

    app.amqp.send_task_message = send_but_refuse_the_first_retry
    return failed_once


def test_a_failed_republish_does_not_lose_the_task(app: Celery) -> None:
    failed_once = refuse_the_first_retry(app)
    retries: list[int] = []

    @app.task(shared=False, bind=True, name=name(), acks_late=True)
    @celery_ext.retry(attempts=5, wait=fixed(0.1))
    def once_more(self: Any) -> str:
        retries.append(self.request.retries)
        if len(retries) < 3:
            raise OSError("flaky")
        return "ok"

    with worker(app):
        assert once_more.delay().get(timeout=30) == "ok"
    assert failed_once.is_set()
    assert retries == [0, 0, 1]  # the requeued first attempt ran again, then one retry


def test_a_hard_limit_whose_retry_cannot_be_published_is_requeued_not_failed(
    app: Celery,
) -> None:
    # A task past its hard limit, with a policy that retries that, during a broker
    # outage: the next attempt cannot be published. The stock hard-limit failure
    # acked the message: the task was gone (seen in the combined chaos run).
    failed_once = refuse_the_first_retry(app)
    calls: list[int] = []

    @app.task(shared=False, name=name(), acks_late=True, time_limit=0.5)
    @celery_ext.retry(on=TimeLimitExceeded, attempts=5, wait=fixed(0.1))
    def slow_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2)  # past the hard limit
        return "ok"

    with worker(app):
        assert slow_once.delay().get(timeout=30) == "ok"
    assert failed_once.is_set()
    assert len(calls) == 2  # the requeued message ran again


def test_manual_self_retry_uses_the_policy(app: Celery) -> None:
    calls: list[float] = []

    @app.task(shared=False, bind=True, name=name())
    @celery_ext.retry(attempts=3, wait=fixed(0.3))
    def manual(self: Any) -> int:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise self.retry(exc=KeyError("not yet"))
        return self.request.retries

    with worker(app):
        assert manual.delay().get(timeout=30) == 2
    assert calls[2] - calls[1] >= 0.3 - 0.02


def test_a_soft_timeout_is_retried_by_the_policy(unique_queue: str) -> None:
    app = Celery(f"rt_to_{uuid.uuid4().hex[:6]}", broker="local://", set_as_current=False)
    app.conf.update(task_default_queue=unique_queue, result_backend="cache+memory://")
    celery_ext.install(app)
    calls: list[int] = []

    @app.task(shared=False, name=name(), soft_timeout=0.3, timeout=5)
    @celery_ext.retry(on=TaskTimeout, attempts=3, wait=fixed(0.05))
    def slow_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            while True:
                time.sleep(0.005)
        return "ok"

    with LocalWorker(app):
        assert slow_once.delay().get(timeout=30) == "ok"
    assert len(calls) == 2


def test_retry_as_a_task_option_keeps_self_retry_working(unique_queue: str) -> None:
    app = Celery(f"rt_opt_{uuid.uuid4().hex[:6]}", broker="local://", set_as_current=False)
    app.conf.update(task_default_queue=unique_queue, result_backend="cache+memory://")
    celery_ext.install(app)
    calls: list[int] = []
    policy = celery_ext.RetryPolicy(wait=fixed(0.05), stop=celery_ext.attempts(4))

    @app.task(shared=False, bind=True, name=name(), retry=policy)
    def opt(self: Any) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("again")
        return len(calls)

    assert callable(opt.retry)  # the option did not hide Task.retry()
    with LocalWorker(app):
        assert opt.delay().get(timeout=30) == 3
