"""Helpers shared by the test modules: polling with a deadline and an embedded worker per broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_ext import LocalWorker, stats_section
from celery_ext.lane import lane_of


def broker_url(request: Any, kind: str) -> str:
    """The URL of broker ``kind`` (local, redis, amqp); Redis/RabbitMQ skip or fail if down."""
    return "local://" if kind == "local" else str(request.getfixturevalue(f"{kind}_url"))


def new_app(url: str, queue: str, **conf: Any) -> Celery:
    """A Celery app for one test: its own default queue, in-memory results, quiet logging."""
    app = Celery(f"t_{uuid.uuid4().hex[:6]}", broker=url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        result_backend="cache+memory://",
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=False,
        **conf,
    )
    if url.startswith("amqp"):
        app.conf.broker_heartbeat = 0  # an embedded amqp worker stops ~10 s faster
    return app


def wait_for(check: Callable[[], object], timeout: float = 20.0, every: float = 0.02) -> None:
    """Poll ``check`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(every)


@contextmanager
def embedded_worker(
    app: Celery, pool: str = "threads", concurrency: int = 2, **options: Any
) -> Iterator[Any]:
    """A real worker in this process on ``app``'s default queue: LocalWorker on the
    local lane, Celery's own test worker on Redis and RabbitMQ."""
    queues = [app.conf.task_default_queue]
    if app.conf.broker_url.startswith("local://"):
        options.setdefault("drain_timeout", 1)
        with LocalWorker(app, pool=pool, concurrency=concurrency, queues=queues, **options) as w:
            yield w
    else:
        with start_worker(
            app,
            pool=pool,
            concurrency=concurrency,
            perform_ping_check=False,
            queues=queues,
            **options,
        ) as w:
            yield w


def depth(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue`` on ``app``'s broker (its lane on ``local://``)."""
    with app.connection_for_write() as conn:
        driver = conn.transport.driver_type
        if driver == "local":
            return int(lane_of(app).depth(queue))
        if driver == "redis":
            return int(conn.default_channel.client.llen(queue))
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def inspect_stats(app: Celery, hostname: str) -> dict[str, Any]:
    """``inspect stats`` of one worker."""
    reply = app.control.inspect(destination=[hostname], timeout=5).stats()
    assert reply and hostname in reply, reply
    stats: dict[str, Any] = reply[hostname]
    return stats


def ext_section(app: Celery, hostname: str) -> dict[str, Any]:
    """celery_ext's section of one worker's ``inspect stats``, nested again from its rows."""
    section = stats_section(inspect_stats(app, hostname))
    assert section is not None, f"{hostname} has no celery_ext rows in inspect stats"
    return section


def get_or_dump(result: Any, timeout: float, diagnose: Callable[[], object] | None = None) -> Any:
    """``result.get(timeout)``; on a timeout, every thread's stack goes to stderr first
    (what an embedded worker was doing shows in the failure report), then what
    ``diagnose()`` returns."""
    import faulthandler
    import sys

    from celery.exceptions import TimeoutError as ResultTimeout

    try:
        return result.get(timeout=timeout)
    except ResultTimeout:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if diagnose is not None:
            try:
                print(f"diagnosis: {diagnose()!r}", file=sys.stderr)
            except Exception as exc:
                print(f"diagnosis failed: {exc!r}", file=sys.stderr)
        raise
