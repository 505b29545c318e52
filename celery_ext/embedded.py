"""The embedded worker: a real Celery worker on the local lane, in this process.

:class:`LocalWorker` runs Celery's own ``WorkController`` (threads pool by default) in
a thread of the process that owns the lane, and stops it with a drain;
:class:`LaneGuard` refuses the prefork pool on ``local://``.

Example::

    with LocalWorker(app, concurrency=4):
        add.delay(2, 2)
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import monotonic
from types import TracebackType
from typing import Any

from celery import Celery, bootsteps, signals
from celery.app.trace import build_tracer
from celery.exceptions import ImproperlyConfigured
from celery.utils import timer2
from celery.worker import state as worker_state
from kombu.utils.imports import symbol_by_name

from . import _compat
from ._settings import settings_of
from .consumer_state import state_of
from .lane import is_local, lane_of
from .timeouts import TimeoutPool

__all__ = ["DrainReport", "LocalWorker", "WakeableTimer", "lane_loop"]

logger = logging.getLogger(__name__)

#: Seconds stop() gives running tasks beyond its drain deadline before reporting them.
STOP_GRACE_S = 1.0


@dataclass
class DrainReport:
    """What :meth:`LocalWorker.stop` did.

    Example::

        report = worker.stop(timeout=5)
        report.dropped   # messages left unrun and discarded
    """

    drained: bool
    dropped: int
    dropped_ids: list[str] = field(default_factory=list)
    still_running: bool = False
    waited_s: float = 0.0


class WakeableTimer(timer2.Timer):  # type: ignore[misc]
    """Celery's timer thread, sleeping on its condition instead of ``time.sleep``.

    Stock ``timer2.Timer`` sleeps up to a whole tick (1 s) even when an earlier
    entry arrives or the worker stops; this one wakes for both.

    Example::

        LocalWorker(app)   # passes timer_cls=WakeableTimer to the worker
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = threading.Event()
        self._finished = threading.Event()

    def run(self) -> None:
        self.running = True
        self.scheduler = iter(self.schedule)
        try:
            while not self._stopping.is_set():
                delay = next(self)
                if delay:
                    if self.on_tick:
                        self.on_tick(delay)
                    with self.not_empty:
                        if not self._stopping.is_set():
                            self.not_empty.wait(delay)
        except Exception:
            logger.exception("celery_ext timer thread crashed")
        finally:
            self._finished.set()

    def stop(self) -> None:
        self._stopping.set()
        with self.not_empty:
            self.not_empty.notify_all()
        if self.running:
            self._finished.wait()
            self.join()
            self.running = False


class _LateStrategies(dict[str, Any]):
    """Consumer strategy table that learns tasks registered after the worker started.

    Stock embedded workers reject such tasks as unregistered until ``reload()``;
    an in-process worker shares ``app.tasks`` with the code defining them.
    """

    consumer: Any = None

    def __missing__(self, name: str) -> Any:
        consumer = self.consumer
        task = consumer.app.tasks.get(name) if consumer is not None else None
        if task is None:
            raise KeyError(name)
        app = consumer.app
        from ._tasks import apply_task_options

        apply_task_options(task)
        strategy = task.start_strategy(app, consumer)
        wrap = state_of(consumer).wrap_strategy
        strategy = self[name] = wrap(strategy) if wrap is not None else strategy
        task.__trace__ = build_tracer(name, task, app.loader, consumer.hostname, app=app)
        return strategy


def lane_loop(
    obj: Any,
    connection: Any,
    consumer: Any,
    blueprint: Any,
    hub: Any,
    qos: Any,
    heartbeat: Any,
    clock: Any,
    hbrate: float = 2.0,
    **kwargs: Any,
) -> None:
    """The consumer loop of a :class:`LocalWorker`: consume until the worker is stopped.

    Celery's blocking loop also ends when the process-wide shutdown flag is set.
    In a ``celery worker`` that serves ``durable=False`` tasks, SIGTERM sets it
    for the main worker, and the lane worker stopped with it at once: the lossy
    tasks that the draining durable tasks published were dropped. This loop ends
    only when :meth:`LocalWorker.stop` stops the lane worker, after the broker
    side drained. (The lane has no heartbeats, so none are checked.)

    Example::

        consumer.loop = lane_loop
    """
    consumer.on_message = obj.create_task_handler()
    consumer.consume()
    obj.on_ready()
    while blueprint.state == bootsteps.RUN and obj.connection:
        if qos.prev != qos.value:
            qos.update()
        obj.perform_pending_operations()
        try:
            connection.drain_events(timeout=2.0)
        except TimeoutError:
            pass
        except OSError:
            if blueprint.state == bootsteps.RUN:
                raise


def _embedded_classes(
    app: Celery, ready: threading.Event, lane_url: str | None = None
) -> tuple[Any, Any]:
    """The WorkController and Consumer subclasses of one LocalWorker.

    ``lane_url``: consume that local lane instead of the app's broker (an app
    whose ``durable=False`` tasks run in this process).
    """
    consumer_base = symbol_by_name(app.conf.worker_consumer)

    class EmbeddedConsumer(consumer_base):  # type: ignore[misc, valid-type]
        Strategies = _LateStrategies

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.strategies.consumer = self
            self.loop = lane_loop  # stops when this worker stops, not at SIGTERM

        def connection_for_read(self, heartbeat: Any = None) -> Any:
            if lane_url is None:
                return super().connection_for_read(heartbeat)
            return self.ensure_connected(
                self.app.connection_for_read(url=lane_url, transport="local", heartbeat=heartbeat)
            )

    class EmbeddedWorkController(app.WorkController):  # type: ignore[misc]
        celery_ext_embedded = True  # LocalWorker.stop() drains; the Drain step stands aside

        def should_use_eventloop(self) -> bool:
            # Celery decides from the app's broker; the lane is consumed by polling.
            return lane_url is None and bool(super().should_use_eventloop())

        def on_consumer_ready(self, consumer: Any) -> None:
            super().on_consumer_ready(consumer)
            ready.set()

    return EmbeddedWorkController, EmbeddedConsumer


class LocalWorker:
    """Run Celery's real worker for a local-lane app inside this process.

    A threads pool by default; acks, task signals, task events and the result
    backend work as in ``celery worker``. Use as a context manager or call
    :meth:`start` / :meth:`stop` (e.g. from a web app's startup and shutdown hooks).
    :meth:`stop` lets queued work finish within ``drain_timeout`` and returns a
    :class:`DrainReport` with the messages it had to drop.

    Example::

        with LocalWorker(app, concurrency=4) as worker:
            add.delay(1, 2)
            worker.join(timeout=5)      # re-raises the first task failure
    """

    def __init__(
        self,
        app: Celery,
        *,
        concurrency: int = 4,
        pool: str = "threads",
        queues: Iterable[str] | None = None,
        hostname: str | None = None,
        loglevel: str | int = "WARNING",
        drain_timeout: float | None = None,
        **worker_options: Any,
    ) -> None:
        if pool not in ("threads", "solo"):
            raise ImproperlyConfigured(
                f"LocalWorker runs the 'threads' or 'solo' pool, not {pool!r}: prefork "
                "children cannot reach this process's memory, and green pools belong in a "
                "monkeypatched `celery worker -P gevent` process"
            )
        self.app = app
        # An app on Redis/RabbitMQ: the worker serves its local lane (durable=False tasks).
        self.lane_url = None if is_local(app) else "local://"
        self.lane = lane_of(app, self.lane_url)
        settings = settings_of(app)
        self.drain_timeout_s = settings.drain_timeout if drain_timeout is None else drain_timeout
        self.queues = list(queues) if queues else None
        self.hostname = hostname or f"local-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self._options = dict(
            concurrency=concurrency,
            pool=pool,
            loglevel=loglevel,
            without_mingle=True,
            without_gossip=True,
            **worker_options,
        )
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._controller: Any = None
        self._failures: list[BaseException] = []

    # -- lifecycle ----------------------------------------------------------
    def start(self, timeout: float | None = 30.0) -> LocalWorker:
        """Start the worker thread and wait until it consumes (``timeout`` None: no limit).

        Raises :class:`RuntimeError` when it did not start in time, or stopped
        while starting (at once, not at the timeout).

        Example::

            worker = LocalWorker(app).start()
        """
        if self._thread is not None:
            raise RuntimeError("LocalWorker already started")
        app = self.app
        app.finalize()
        options = dict(self._options)
        if options["pool"] == "threads":
            options["pool"] = TimeoutPool
        options.setdefault("timer_cls", WakeableTimer)
        if self.queues:
            options["queues"] = self.queues
        controller_cls, consumer_cls = _embedded_classes(app, self._ready, self.lane_url)
        controller = controller_cls(
            app=app,
            hostname=self.hostname,
            ready_callback=None,
            consumer_cls=consumer_cls,
            **options,
        )
        self._controller = controller
        signals.task_failure.connect(self._on_failure, weak=False)

        def run() -> None:
            app.set_current()  # the consumer runs here; see TimeoutPool
            controller.start()

        self._thread = threading.Thread(target=run, name=f"celery_ext-{self.hostname}", daemon=True)
        self._thread.start()
        deadline = None if timeout is None else monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive():
                self._thread = None
                self._disconnect()
                raise RuntimeError(f"embedded worker {self.hostname} stopped while starting")
            if deadline is not None and monotonic() > deadline:
                self._disconnect()
                raise RuntimeError(f"embedded worker {self.hostname} did not start in {timeout}s")
        # The worker marks the whole process as "inside a worker", where result.get()
        # is refused; the embedding code is not a task (Celery's own embedded test
        # worker resets it the same way).
        _compat.set_task_join_will_block(False)
        return self

    def consumed_queues(self) -> list[str]:
        """Names of the queues this worker consumes.

        Example::

            worker.consumed_queues()   # ['celery']
        """
        if self._controller is not None:
            return sorted(q.name for q in self._controller.app.amqp.queues.consume_from.values())
        return self.queues or [self.app.conf.task_default_queue]

    def stop(self, timeout: float | None = None) -> DrainReport:
        """Drain queued work within ``timeout`` (default ``drain_timeout``), then stop.

        Messages still queued (or handed back unacked) when the deadline passes
        are dropped: logged with their ids and counted in the report.

        Example::

            report = worker.stop(timeout=10)
            print(report.dropped, report.drained)
        """
        if self._thread is None:
            return DrainReport(drained=True, dropped=0)
        timeout = self.drain_timeout_s if timeout is None else timeout
        start = monotonic()
        queues = self.consumed_queues()
        lane = self.lane
        deadline = start + timeout  # parked messages due later cannot run before it anyway
        drained = self._wait(lambda: self._idle(queues, deadline) or self._dead(), timeout)
        grace = max(0.0, timeout - (monotonic() - start)) + STOP_GRACE_S
        pool = getattr(self._controller, "pool", None)
        if isinstance(pool, TimeoutPool):
            pool.join_timeout_s = grace
        self._controller.stop(in_sighandler=False)
        lane.wake()
        self._thread.join(grace)
        still_running = self._thread.is_alive() or (
            isinstance(pool, TimeoutPool) and pool.alive_threads() > 0
        )
        self._disconnect()
        # The lane object, never a connection: with an app on Redis or RabbitMQ,
        # queues of the same names on the broker belong to every worker of the cluster.
        dropped_ids = lane.discard(queues)
        report = DrainReport(
            drained=drained and not dropped_ids,
            dropped=len(dropped_ids),
            dropped_ids=dropped_ids,
            still_running=still_running,
            waited_s=monotonic() - start,
        )
        if dropped_ids:
            logger.warning(
                "celery_ext local lane: dropped %d queued message(s) at stop after %.1fs: %s",
                len(dropped_ids),
                report.waited_s,
                ", ".join(dropped_ids[:20]) + (" ..." if len(dropped_ids) > 20 else ""),
            )
        self._thread = None
        return report

    def _idle(self, queues: list[str], due_before: float | None = None) -> bool:
        """Nothing queued, unacked, reserved or running for this app."""
        app = self.app
        if not self.lane.idle(queues, due_before):
            return False
        # Early-acked tasks are settled on the lane while they still run: ask the worker.
        for requests in (worker_state.active_requests, worker_state.reserved_requests):
            if any(_compat.request_app(r) is app for r in list(requests)):
                return False
        return True

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        # Woken at once by lane traffic; the short re-check covers a task that
        # finishes without touching the lane (early ack).
        deadline = monotonic() + timeout
        while not predicate():
            remaining = deadline - monotonic()
            if remaining <= 0:
                return False
            self.lane.wait_until(predicate, min(remaining, 0.02))
        return True

    def _dead(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def _disconnect(self) -> None:
        signals.task_failure.disconnect(self._on_failure)

    def __enter__(self) -> LocalWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- testing aid --------------------------------------------------------
    def _on_failure(
        self, sender: Any = None, exception: BaseException | None = None, **_: Any
    ) -> None:
        if getattr(sender, "app", None) is self.app and exception is not None:
            self._failures.append(exception)
            self.lane.wake()

    def join(self, queue: str | None = None, timeout: float = 10.0, fail_fast: bool = True) -> None:
        """Wait until ``queue`` (default: every consumed queue) is empty and nothing is unacked.

        With ``fail_fast`` the first task failure since the last ``join`` is
        re-raised as soon as it happens. Raises :class:`TimeoutError` when the
        lane is still busy after ``timeout`` seconds.

        Example::

            add.delay(1, "a")
            worker.join(timeout=5)     # raises the task's TypeError
        """
        queues = [queue] if queue else self.consumed_queues()
        lane = self.lane

        def done() -> bool:
            return bool(fail_fast and self._failures) or self._idle(queues)

        if not self._wait(done, timeout):
            raise TimeoutError(
                f"local lane still busy after {timeout}s: "
                + ", ".join(f"{q}={lane.depth(q)} queued" for q in queues)
                + f", {lane.unacked()} unacked"
            )
        if fail_fast and self._failures:
            raise self._failures.pop(0)
