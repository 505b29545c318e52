"""install(app) is a drop-in on every broker: a real worker runs canvases as before."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, chain, group
from celery.contrib.testing.worker import start_worker

from celery_ext import LocalWorker


@contextmanager
def running_worker(app: Celery) -> Iterator[Any]:
    if app.conf.broker_url.startswith("local://"):
        with LocalWorker(app, concurrency=2) as worker:
            yield worker
    else:
        with start_worker(
            app,
            pool="threads",
            concurrency=2,
            perform_ping_check=False,
            queues=[app.conf.task_default_queue],
            shutdown_timeout=30,
        ) as worker:
            yield worker


def test_broker_fixtures_connect(broker_app: Celery) -> None:
    with broker_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        assert conn.connected
        _name, count, _ = conn.default_channel.queue_declare(
            broker_app.conf.task_default_queue, durable=False
        )
        assert count == 0


def test_tasks_chains_and_groups_run_unchanged(broker_app: Celery) -> None:
    @broker_app.task(shared=False, name="drop_in.add")
    def add(x: int, y: int) -> int:
        return x + y

    with running_worker(broker_app):
        assert add.delay(2, 3).get(timeout=20) == 5
        assert chain(add.s(1, 2), add.s(3), add.s(4))().get(timeout=20) == 10
        assert group(add.s(i, i) for i in range(5))().get(timeout=20) == [0, 2, 4, 6, 8]


def test_stock_retry_still_works(broker_app: Celery) -> None:
    attempts: list[int] = []

    @broker_app.task(shared=False, bind=True, name="drop_in.flaky", max_retries=3)
    def flaky(self: Any) -> str:
        attempts.append(self.request.retries)
        if len(attempts) < 3:
            raise self.retry(countdown=0.1)
        return "ok"

    with running_worker(broker_app):
        assert flaky.delay().get(timeout=30) == "ok"
    assert attempts == [0, 1, 2]
