"""Drain on warm shutdown: hand prefetched work back at once, finish in-flight within a deadline.

Stock Celery's warm shutdown has no deadline and releases prefetched messages
only when the connection closes, after in-flight work finished. The
:class:`Drain` consumer step acts when a warm shutdown (SIGTERM, the first
SIGINT, ``app.control.shutdown()``) stops the consumer, in the worker's own
thread, not in the OS signal handler:

1. :data:`~celery_ext.signals.drain_started` fires;
2. consuming stops, and what the worker holds but has not started goes back to
   the broker at once: ETA-held requests and tasks queued in the thread pool
   are rejected with requeue (Redis restore, RabbitMQ reject, local-lane
   re-queue);
3. the worker waits for running tasks (event driven, no fixed sleep) at most
   ``drain_timeout`` seconds (setting, or ``celery worker --drain-timeout``);
4. past it, running tasks get :class:`~celery_ext.errors.DrainInterrupted`
   (a ``TaskTimeout``). A task that ends by it is **handed back**, never
   failed: no result is stored, no ``task_failure`` fires, an ``acks_late``
   message is requeued and an early-acked task is published again (same id),
   by :class:`~celery_ext.errors.HandedBack` (a ``Reject``). Its retry policy
   does not count it as an attempt. After a short grace, what still runs is
   abandoned the same way (requeued, or published again) and the worker exits
   with status 1 (also when tasks were handed back at the deadline);
5. :data:`~celery_ext.signals.drain_finished` fires with the counts, logged as
   one line.

Pools: threads and solo raise the interrupt in the task's thread; prefork sets
a flag shared with its children (:class:`celery_ext.timeouts.SharedState`) and
sends ``SIGUSR1``, which the child's soft-limit handler turns into
``DrainInterrupted``, then kills the children still in a task's code after the
grace (a child whose task ended has its result on the way: it is left alone);
gevent throws it into the greenlets; an ``async def`` task is cancelled.
On prefork, step 2 requeues the prefetched tasks no child has been given and
:data:`~celery_ext.signals.drain_finished` fires once the pool has stopped; on
gevent prefetched messages come back when the connection closes, as in stock
Celery. A second SIGTERM/SIGINT keeps Celery's cold-shutdown meaning.

Example::

    celery -A shop worker -P threads --drain-timeout 20
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps, current_task, signals
from celery.exceptions import Ignore, Reject, Retry
from celery.worker import state as worker_state

from . import _compat
from ._settings import settings_of
from .consumer_state import state_of
from .errors import DrainInterrupted, HandedBack
from .metrics import counters_of, send_worker_event
from .signals import drain_finished, drain_started
from .timeouts import GeventTimeoutPool, TimeoutPool, shared_state

__all__ = ["Drain", "interrupted_by_drain", "wrap_hand_back"]

logger = logging.getLogger(__name__)

#: Seconds running tasks get to react to TaskTimeout once the deadline passed.
GRACE_S = 1.0


class Drain(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step draining a warm shutdown within ``drain_timeout``; see the module docs.

    ``install(app)`` adds it and the ``--drain-timeout`` worker option. It
    acts when the consumer stops because the worker shuts down warm: after
    Celery cleared its ETA timer, before the task consumer and the pool stop,
    with the broker connection still open for acks and requeues.

    Example::

        @celery_ext.signals.drain_finished.connect
        def report(sender=None, completed=0, requeued=0, abandoned=0, seconds=0.0, **kw):
            print(completed, requeued, abandoned, seconds)
    """

    name = "celery_ext.shutdown.Drain"
    requires = ("celery.worker.consumer.tasks:Tasks",)  # stops before Tasks and Connection

    def __init__(self, c: Any, drain_timeout: float | None = None, **kwargs: Any) -> None:
        settings = settings_of(c.app)
        self.timeout_s = float(settings.drain_timeout if drain_timeout is None else drain_timeout)
        self.done = False
        self.state = "running"
        self._wakeup: tuple[int, int] | None = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        state_of(c).drain = self
        pool: Any = getattr(c, "pool", None)
        if _compat.prefork_pool(pool) is not None and not isinstance(pool.flush, _NotingFlush):
            noting = _NotingFlush(pool)
            _compat.replace_consumer_method(pool, "flush", noting)
            _note_unstarted_on_close(c, noting)
        hub = getattr(c, "hub", None)
        if hub is None or self._wakeup is not None:
            return
        # Python retries an interrupted poll (PEP 475), so the event loop would
        # notice SIGTERM only at its next timeout or event; a byte on this pipe on
        # every signal wakes it at once.
        try:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread (embedded workers): skip
            return
        self._wakeup = (r, w)
        hub.add_reader(r, self._drain_pipe, r)

    @staticmethod
    def _drain_pipe(fd: int) -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 512):
                pass

    def stop(self, c: Any) -> None:
        worker = getattr(c, "controller", None)
        blueprint = getattr(worker, "blueprint", None)
        if (
            self.done
            or blueprint is None
            or blueprint.state != bootsteps.CLOSE  # a reconnect, not a shutdown
            or worker_state.should_terminate  # a cold shutdown keeps Celery's meaning
            or getattr(worker, "celery_ext_embedded", False)  # LocalWorker drains itself
        ):
            return
        self.done = True
        self.state = "draining"
        self._drain(c, worker)

    def _drain(self, c: Any, worker: Any) -> None:
        tally = _Tally(worker, time.monotonic())
        probes = state_of(c).probes
        if probes is not None:
            probes.stop(c)  # not ready from the first moment of the drain
        send_worker_event(c, "drain-started", drain_timeout_s=self.timeout_s)
        try:
            drain_started.send(sender=worker)
        except Exception:  # a receiver must not stop the drain
            logger.exception("celery_ext: a drain_started receiver failed")
        task_consumer = getattr(c, "task_consumer", None)
        if task_consumer is not None:
            try:
                task_consumer.cancel()
            except Exception:  # the connection may already be gone: nothing to stop
                logger.debug("celery_ext: cancelling the task consumer failed", exc_info=True)
        tally.requeued = self._hand_back(c)
        tally.in_flight = len(worker_state.active_requests) + len(kept_written(c))
        deadline = tally.started_at + self.timeout_s
        worker.celery_ext_drain_deadline = deadline  # the lane worker's stop keeps it too
        pool = getattr(c, "pool", None)
        if (
            _compat.prefork_pool(pool) is not None
        ):  # prefork: the pool's own stop waits for in-flight
            _PreforkDeadline(pool, tally, deadline).arm()
            return
        if isinstance(pool, GeventTimeoutPool):  # its on_stop waits until the deadline
            pool.drain_deadline = deadline
            pool.drain_grace_s, pool.drain_abandon = GRACE_S, _save

            def counts() -> tuple[int, int]:
                return pool.interrupted, pool.abandoned

            tally.report_after_pool(counts)
            return
        if isinstance(pool, TimeoutPool) and not pool.wait_idle(deadline - time.monotonic()):
            tally.interrupted = pool.interrupt_running()
            pool.wait_idle(GRACE_S)
            for request in pool.abandon_running():
                tally.abandoned += 1
                _save(request)
            pool.join_timeout_s = 0.0  # what still runs is abandoned, not awaited
        tally.report()
        send_worker_event(c, "drain-finished", **worker.celery_ext_drain_report)

    def _hand_back(self, c: Any) -> int:
        handed = 0
        # ETA-held messages: Celery already cleared its timer (Consumer.on_close), so
        # they will not run here; the Backpressure step kept the messages.
        backpressure = state_of(c).backpressure
        for message in backpressure.take_eta_messages() if backpressure is not None else ():
            try:
                message.reject(requeue=True)
                handed += 1
            except Exception:  # the connection may be gone: the broker restores it anyway
                logger.debug("celery_ext: could not requeue an ETA message", exc_info=True)
        pool = getattr(c, "pool", None)
        if isinstance(pool, TimeoutPool):
            for request in pool.take_waiting():
                handed += _requeue(request)
        return handed + _requeue_unstarted(pool)

    def section(self, worker: Any) -> dict[str, Any]:
        """Its part of the ``celery_ext`` section of ``inspect stats`` (see :mod:`.metrics`)."""
        report = getattr(worker, "celery_ext_drain_report", None)
        state = "drained" if report is not None else self.state
        return {"state": state, "drain_timeout_s": self.timeout_s, "last": report}


def requests_now(*sets: Any) -> list[Any]:
    """A copy of worker-state request sets, taken from a thread other than the consumer's.

    Example::

        requests_now(worker_state.reserved_requests, worker_state.active_requests)
    """
    while True:
        try:
            return [request for requests in sets for request in list(requests)]
        except RuntimeError:  # a set changed while copied (the consumer acked one): again
            continue


class _Tally:
    """The counts of one drain, reported once through the log, the signal and stats."""

    def __init__(self, worker: Any, started_at: float) -> None:
        self.worker, self.started_at = worker, started_at
        self.in_flight = self.requeued = self.interrupted = self.abandoned = 0
        # Tasks interrupted at the deadline that ended by it are counted as they
        # come back to this process (CountingRequest), prefork children included.
        self._counters = counters_of(worker.app)
        self._handed_back_before = self._counters.snapshot().get("handed_back", 0)

    def handed_back(self) -> int:
        return self._counters.snapshot().get("handed_back", 0) - self._handed_back_before

    def report_after_pool(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Report from ``worker_shutdown``: after the pool stopped, before the exit.

        ``counts()`` then gives (interrupted, abandoned).
        """
        worker = self.worker
        uid = f"celery_ext.drain.report.{id(worker)}"

        def report(sender: Any = None, **_: Any) -> None:
            signals.worker_shutdown.disconnect(sender=worker, dispatch_uid=uid)
            self.interrupted, self.abandoned = counts()
            self.report()

        signals.worker_shutdown.connect(report, sender=worker, weak=False, dispatch_uid=uid)

    def report(self) -> None:
        worker = self.worker
        seconds = time.monotonic() - self.started_at
        handed_back = self.handed_back()
        if self.interrupted or self.abandoned:
            worker.exitcode = 1  # the deadline cut the drain short
        completed = max(0, self.in_flight - self.abandoned - handed_back)
        requeued = self.requeued + handed_back
        worker.celery_ext_drain_report = {
            "completed": completed,
            "requeued": requeued,
            "abandoned": self.abandoned,
            "interrupted": self.interrupted,
            "seconds": round(seconds, 3),
        }
        logger.warning(
            "celery_ext: drained in %.2fs: %d completed, %d handed back (%d of them "
            "interrupted at the deadline), %d abandoned",
            seconds,
            completed,
            requeued,
            handed_back,
            self.abandoned,
        )
        try:
            drain_finished.send(
                sender=worker,
                completed=completed,
                requeued=requeued,
                abandoned=self.abandoned,
                interrupted=self.interrupted,
                seconds=seconds,
            )
        except Exception:
            logger.exception("celery_ext: a drain_finished receiver failed")


class _NotingFlush:
    """Prefork's ``pool.flush``, noting first which tasks a child may already have.

    A prefetched prefork task waits for a free child in the worker's semaphore
    (or, once applied, in the pool's outbound buffer). As the consumer closes,
    Celery clears the semaphore and flushes the pool, dropping the jobs not yet
    accepted, and leaves their messages to come back when the connection
    closes, after in-flight work. The drain requeues them at once, except a
    job already scheduled for or being written to a child: that one runs.

    Stock ``flush`` forgets such a written job too, yet the child runs it: its
    result is ignored (an ``acks_late`` message is never acked and runs again
    after the restart) and the child, its READY never read, waits 30 s for it
    before exiting. In a warm shutdown the job goes back into the pool's cache,
    so its acceptance and result are handled like any running task's.
    """

    def __init__(self, pool: Any) -> None:
        self._pool, self._flush = pool, pool.flush
        #: Requests reserved, not running, as the consumer closed.
        self.unstarted: list[Any] = []
        #: Ids of jobs a child has, or may get.
        self.celery_ext_unsafe: set[str] = set()
        #: Set by the consumer's close in a warm shutdown: keep the written jobs.
        self.keep_written = False
        #: Requests of the written jobs kept, in flight from then on.
        self.written: list[Any] = []

    def __call__(self) -> Any:
        asyn = _compat.prefork_pool(self._pool)
        if asyn is None:
            return self._flush()
        jobs = _compat.pool_jobs(asyn)
        outbound = list(asyn.outbound_buffer)  # put back after a child died: not written
        written = [
            job
            for job in jobs
            if not _compat.job_accepted(job) and _compat.job_written(job) and job not in outbound
        ]
        self.celery_ext_unsafe = {
            job.correlation_id
            for job in jobs
            if _compat.job_accepted(job) or _compat.job_written(job) or _compat.job_scheduled(job)
        }
        flushed = self._flush()
        if not self.keep_written or asyn.synack:  # with synack the child is told not to run it
            return flushed
        for job in written:
            _compat.keep_job(asyn, job)
        ids = {job.correlation_id for job in written}
        self.written = [r for r in self.unstarted if r.id in ids]
        return flushed


def _note_unstarted_on_close(c: Any, flush: _NotingFlush) -> None:
    """Note the reserved, not running requests before the consumer forgets them.

    ``Consumer.on_close`` (the blueprint's close callback, before any step's
    ``close``) clears the semaphore and keeps only running requests as reserved.
    """
    blueprint = getattr(c, "blueprint", None)
    on_close = getattr(blueprint, "on_close", None)
    if blueprint is None or on_close is None:
        return

    def noting_on_close() -> Any:
        active = worker_state.active_requests
        flush.unstarted = [r for r in list(worker_state.reserved_requests) if r not in active]
        worker_blueprint = getattr(getattr(c, "controller", None), "blueprint", None)
        flush.keep_written = (
            getattr(worker_blueprint, "state", None) == bootsteps.CLOSE  # not a reconnect
            and not worker_state.should_terminate
        )
        return on_close()

    _compat.replace_consumer_method(blueprint, "on_close", noting_on_close)


def kept_written(c: Any) -> list[Any]:
    """Prefork requests a child got just before a warm shutdown's close, not yet accepted.

    Example::

        kept_written(consumer)   # [] on other pools
    """
    flush = getattr(getattr(c, "pool", None), "flush", None)
    if not isinstance(flush, _NotingFlush):
        return []
    return [r for r in flush.written if r not in worker_state.active_requests]


def _requeue_unstarted(pool: Any) -> int:
    """Requeue prefork's reserved requests that no child has or can get."""
    asyn, flush = _compat.prefork_pool(pool), getattr(pool, "flush", None)
    if asyn is None or not isinstance(flush, _NotingFlush):
        return 0
    unsafe = set(flush.celery_ext_unsafe)
    unsafe.update(str(getattr(job, "correlation_id", "")) for job in _compat.pool_jobs(asyn))
    unstarted, flush.unstarted = flush.unstarted, []
    handed = 0
    for request in unstarted:
        if request.id not in unsafe and request not in worker_state.active_requests:
            handed += _requeue(request)
    return handed


class _PreforkDeadline:
    """Enforces ``drain_timeout`` on prefork while the pool's own stop waits for children.

    A thread sleeps until the deadline (or until the pool stopped): then it sets
    the drain flag the children share and sends ``SIGUSR1`` to every child still
    running a task (:class:`~celery_ext.errors.DrainInterrupted` there, which
    hands the task back), waits :data:`GRACE_S`, then saves the tasks still
    running (requeued, or published again) and kills their children. The report
    goes out from ``worker_shutdown``, once the pool has stopped.
    """

    def __init__(self, pool: Any, tally: _Tally, deadline: float) -> None:
        self.worker, self.pool, self.tally = tally.worker, pool, tally
        self.asyn = _compat.prefork_pool(pool)
        self.deadline = deadline
        self.interrupted = self.abandoned = 0
        self.stopped = threading.Event()
        self._uid = f"celery_ext.drain.{id(self)}"

    def arm(self) -> None:
        signals.worker_shutdown.connect(
            self._on_shutdown, sender=self.worker, weak=False, dispatch_uid=self._uid
        )
        self.tally.report_after_pool(lambda: (self.interrupted, self.abandoned))
        threading.Thread(target=self._watch, name="celery_ext-drain", daemon=True).start()

    def _running(self) -> list[Any]:
        return [r for r in requests_now(worker_state.active_requests) if r.worker_pid]

    def _watch(self) -> None:
        if self.stopped.wait(max(0.0, self.deadline - time.monotonic())) or not self._running():
            return
        state = shared_state(self.worker.app)
        state.set_draining()  # the children's SIGUSR1 handler reads it
        for request in self._running():
            self.interrupted += 1
            self._signal(request, getattr(signal, "SIGUSR1", signal.SIGTERM))
        if self.stopped.wait(GRACE_S):
            return
        jobs = {getattr(job, "correlation_id", None): job for job in _compat.pool_jobs(self.asyn)}
        index = _compat.pool_process_index(self.asyn)
        for request in self._running():
            # The consumer no longer reads results during a drain (the pool's join
            # does, later): a child that left the task's code has handed it back or
            # finished, and its result is on the way. Saving it too would run it twice.
            if not state.running(index.get(request.worker_pid, -1)):
                continue
            self.abandoned += 1
            job = jobs.get(request.id)
            if job is not None:  # it runs again elsewhere: no WorkerLostError failure for it
                _compat.forget_job_callbacks(job)
            _save(request)
            self._signal(request, signal.SIGKILL)

    def _signal(self, request: Any, signum: int) -> None:
        try:
            self.pool.terminate_job(request.worker_pid, signum)
        except Exception:  # the child may be gone already
            logger.debug("celery_ext: could not signal %s", request.worker_pid, exc_info=True)

    def _on_shutdown(self, sender: Any = None, **_: Any) -> None:
        self.stopped.set()
        signals.worker_shutdown.disconnect(sender=self.worker, dispatch_uid=self._uid)


def _requeue(request: Any) -> int:
    """Give a held, not started request's message back to the broker, now.

    ``Request.reject`` goes through the event loop (``hub.call_soon``), which no
    longer runs during a shutdown; the message is rejected directly instead.
    """
    message = _compat.request_message(request)
    if request.acknowledged or message is None or message.acknowledged:
        return 0
    try:
        message.reject(requeue=True)
    except Exception:  # the connection may be gone: the broker restores it anyway
        logger.debug("celery_ext: could not requeue %s", request.id, exc_info=True)
        return 0
    request.acknowledged = True
    worker_state.task_ready(request)
    return 1


def _save(request: Any) -> None:
    """A task still running at the deadline: requeue its message, or publish it again."""
    if _requeue(request):  # acks_late: the message was still ours to return
        return
    try:  # early ack: the message is gone; a copy keeps the task (at-least-once)
        request.task.signature_from_request(_compat.request_context(request)).apply_async()
    except Exception:
        logger.error(
            "celery_ext: %s[%s] was abandoned at the drain deadline and could not be "
            "published again: %r",
            request.name,
            request.id,
            request.info(),
        )


# -- the task side: a run ended by the drain's interrupt is handed back, not failed --------
_HANDS_BACK = "__celery_ext_hands_back__"
#: Celery's own control flow: what the task (or Celery) decided stands.
_DECIDED = (Retry, Ignore, Reject)


def interrupted_by_drain(exc: BaseException) -> bool:
    """Whether ``exc`` is the drain's interrupt, or was raised while handling it.

    Example::

        interrupted_by_drain(RuntimeError("cleanup failed"))   # True inside `except TaskTimeout`
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DrainInterrupted):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def wrap_hand_back(task: Any) -> None:
    """Wrap ``task``'s body so a run ended by the drain's interrupt is handed back.

    Applied to every task by ``install(app)``; outside a worker's drain the
    wrapper only passes exceptions through.

    Example::

        wrap_hand_back(app.tasks["shop.export"])
    """
    cls: Any = task if isinstance(task, type) else type(task)
    raw: Any = next((k.__dict__["run"] for k in cls.__mro__ if "run" in k.__dict__), None)
    static = isinstance(raw, staticmethod)
    fun = raw.__func__ if static else raw
    if fun is None or getattr(fun, _HANDS_BACK, False):
        return

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fun(*args, **kwargs)
        except _DECIDED:
            raise
        except Exception as exc:
            if interrupted_by_drain(exc):
                _hand_back(exc)
            raise

    setattr(run, _HANDS_BACK, True)
    cls.run = staticmethod(run) if static else run


def _hand_back(exc: BaseException) -> None:
    """Give the running task back to the broker; raises :class:`HandedBack`."""
    task: Any = current_task
    request = getattr(task, "request", None)
    if task is None or request is None or request.called_directly or request.is_eager:
        return  # not a worker run: the exception stands
    if not task.acks_late:
        # Early ack: the message is gone; a copy (same id) keeps the task.
        thread = threading.current_thread()
        if not getattr(thread, "celery_ext_saved", False):  # abandoned: the drain did it
            try:
                task.signature_from_request(request).apply_async()
            except Exception as publish_error:
                logger.error(
                    "celery_ext: %s[%s] was interrupted by the drain and could not be "
                    "published again: %r",
                    task.name,
                    request.id,
                    publish_error,
                )
                return  # it fails as the exception says
    raise HandedBack(f"{type(exc).__name__} at the warm shutdown's drain deadline") from exc
