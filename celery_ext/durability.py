"""Durability per task: ``@app.task(durable=False)`` runs on this process's local lane.

Stock Celery sends every task of an app to one broker. With celery_ext a task
that may be lost (cache warming, analytics pings) says ``durable=False``: it
is published to the local lane of the *publishing* process (no socket, no
broker round trip) and run there by an in-process lane worker; every other
task goes to the app's broker as before. Routing is unchanged (``queue=``,
``task_routes``): the lane has queues of the same names.

Who runs lossy tasks:

- a ``celery worker`` (threads, solo or gevent pool) starts a lane worker
  beside its broker consumer, for the lossy tasks its tasks publish; it keeps
  running through a warm shutdown's drain (its tasks may publish more), then
  gets what is left of the drain deadline, stops and logs what it dropped;
- a web process or script starts one with ``LocalWorker(app)`` (a lane worker
  when the app's broker is not ``local://``) in its startup hook;
- prefork is refused at worker start when the app has lossy tasks: a task in a
  child would publish into that child's memory, which no worker consumes.

Backpressure (``lane_max_queued``, ``queue_limits``), timeouts, retries (a lossy
task's retries stay on the lane) and the drain report apply on the lane too.

Example::

    @app.task(durable=False)
    def warm_cache(key): ...

    @app.task(acks_late=True)          # durable: Redis/RabbitMQ as before
    def charge(order_id):
        ...
        warm_cache.delay(order_id)     # runs in this worker process, never on the broker
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state as worker_state

from . import _compat
from ._settings import settings_of
from .errors import ConfigurationError, PoolNotAllowed
from .lane import is_local

__all__ = ["LANE_URL", "LaneWorker", "is_lossy", "lossy_tasks", "route_lossy"]

logger = logging.getLogger(__name__)

#: The lane lossy tasks go to (this process's, per app).
LANE_URL = "local://"


def is_lossy(task: Any) -> bool:
    """Whether ``task`` (class or instance) was declared ``durable=False``.

    Example::

        is_lossy(app.tasks["shop.warm_cache"])   # True
    """
    return getattr(task, "durable", True) is False


def lossy_tasks(app: Celery) -> list[str]:
    """Names of ``app``'s tasks declared ``durable=False``.

    Example::

        lossy_tasks(app)   # ['shop.warm_cache']
    """
    return sorted(name for name, task in app.tasks.items() if is_lossy(task))


def lane_connection(app: Celery, **kwargs: Any) -> Any:
    """A connection to ``app``'s local lane, whatever its broker.

    Example::

        with lane_connection(app) as conn:
            conn.default_channel
    """
    return app.connection_for_write(url=LANE_URL, transport="local", **kwargs)


def route_lossy(task: Any) -> None:
    """Send a ``durable=False`` task to the local lane when its app's broker is another.

    Example::

        route_lossy(app.tasks["shop.warm_cache"])
    """
    cls: Any = task if isinstance(task, type) else type(task)
    durable = getattr(cls, "durable", True)
    if not isinstance(durable, bool):
        raise ConfigurationError(
            f"task {getattr(cls, 'name', cls.__name__)!r}: durable={durable!r}: "
            "expected True or False"
        )
    if durable or getattr(cls.apply_async, "celery_ext_lossy", False):
        return
    original = cls.apply_async

    @functools.wraps(original)
    def apply_async(self: Any, *args: Any, **options: Any) -> Any:
        app = _compat.task_app(self)
        if (
            options.get("connection") is None
            and options.get("producer") is None
            and not is_local(app)
        ):
            with lane_connection(app) as conn:
                return original(self, *args, connection=conn, **options)
        return original(self, *args, **options)

    apply_async.celery_ext_lossy = True  # type: ignore[attr-defined]
    cls.apply_async = apply_async


class LaneWorker(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: a lane worker for the app's lossy tasks beside the broker consumer.

    Starts only when the app has ``durable=False`` tasks and its broker is not
    the local lane; refuses prefork (see the module docs). Consumes the same
    queue names as the worker, on the lane.

    Example::

        celery -A shop worker -P threads    # lossy tasks run in this process too
    """

    name = "celery_ext.durability.LaneWorker"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        self.lane: Any = None
        self.report: Any = None
        self.enabled = (
            not is_local(w.app)
            and not getattr(w, "celery_ext_embedded", False)
            and bool(lossy_tasks(_finalized(w.app)))
        )
        if self.enabled:
            pool = w.pool_cls
            if _compat.pool_kind(pool) == "prefork":
                names = lossy_tasks(w.app)
                which = (
                    f"the task {names[0]} is durable=False and runs"
                    if len(names) == 1
                    else f"the tasks {', '.join(names)} are durable=False and run"
                )
                raise PoolNotAllowed(
                    f"celery_ext: {which} on this process's local lane, which prefork "
                    "children cannot reach: run this worker with "
                    "-P threads, -P solo or -P gevent (or make them durable)"
                )
        super().__init__(w, **kwargs)

    def start(self, w: Any) -> None:
        if not self.enabled or self.lane is not None:
            return
        from .embedded import LocalWorker

        queues = sorted(q.name for q in w.app.amqp.queues.consume_from.values())
        lane = LocalWorker(
            w.app,
            concurrency=settings_of(w.app).lane_concurrency,
            queues=queues,
            hostname=f"lane.{w.hostname}",
            task_events=bool(getattr(w, "task_events", False)),  # -E: Flower sees lossy tasks
        )
        try:
            # No time limit, as for the worker's own first connection: the lane worker's
            # event dispatcher connects to the broker, which may be down for a while.
            self.lane = lane.start(timeout=None)
        except RuntimeError:
            if worker_state.should_stop is None and worker_state.should_terminate is None:
                raise
            # A shutdown began while it started (its connection retries end on that):
            # the worker is stopping, there is no lane to serve.
            logger.warning("celery_ext: the worker is shutting down; no lane worker started")
            return
        logger.info("celery_ext: lossy tasks run on the local lane (queues %s)", queues)

    def stop(self, w: Any) -> None:
        lane, self.lane = self.lane, None
        if lane is None:
            return
        # The lossy tasks left get what is left of the warm shutdown's drain deadline
        # (the broker side drained first); a cold shutdown gives them nothing.
        deadline = getattr(w, "celery_ext_drain_deadline", None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if worker_state.should_terminate:
            timeout = 0.0
        self.report = report = lane.stop(timeout)
        w.celery_ext_lane_report = report
        logger.warning(
            "celery_ext: local lane stopped: %d lossy message(s) dropped%s",
            report.dropped,
            ", a task still running" if report.still_running else "",
        )


def _finalized(app: Celery) -> Celery:
    app.finalize()
    return app
