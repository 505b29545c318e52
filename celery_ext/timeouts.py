"""Per-task timeouts enforced on every pool: soft (``TaskTimeout`` inside the task), then hard.

Stock Celery passes ``time_limit``/``soft_time_limit`` to its pool and only
prefork (and gevent's hard limit) acts on them: the threads and solo pools
ignore them silently. celery_ext keeps Celery's plumbing and makes the pool
honour it:

- ``@app.task(timeout=30, soft_timeout=25)`` (or the :func:`timeout`
  decorator) is the same as ``time_limit=30, soft_time_limit=25``; per call use
  Celery's own ``apply_async(time_limit=..., soft_time_limit=...)`` (in Celery
  5.7 ``apply_async(timeout=...)`` is kombu's publish timeout); the worker
  default is Celery's ``task_time_limit``/``task_soft_time_limit`` setting or
  ``celery worker --time-limit/--soft-time-limit``. The first set of call,
  task, worker default wins, hard and soft separately.
- **threads and solo**: the :class:`TimeoutPool` replaces both (``-P solo``
  becomes one pool thread, so the consumer keeps serving while a task runs).
  At the soft limit :class:`~celery_ext.errors.TaskTimeout` is raised in the
  task's thread; at the hard limit the task is reported failed with Celery's
  ``TimeLimitExceeded`` (result backend, ``task_failure``, task-failed event),
  its slot gets a fresh thread at once and the stuck thread is abandoned (an
  exception that ``except Exception`` cannot catch is raised in it; counted in
  ``inspect stats`` under ``pool``).
- **prefork**: billiard enforces both limits (the child is killed and replaced
  at the hard one); celery_ext makes the soft limit raise ``TaskTimeout``.

:func:`remaining` tells a task how many seconds it has left.

Limits: a thread blocked in C (``time.sleep``, a socket read, a C extension
holding the GIL) sees the soft ``TaskTimeout`` only when it returns to Python;
the hard limit still fails the task and frees the slot on time. Pools other
than prefork, threads and solo get a warning at worker start.

Example::

    @app.task(timeout=30, soft_timeout=25)
    def export(report_id):
        while celery_ext.remaining() > 5:
            step(report_id)
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import itertools
import logging
import mmap
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from celery import Task, bootsteps, current_task
from celery.concurrency.base import BasePool, apply_target
from celery.concurrency.gevent import TaskPool as GeventPool
from celery.worker import state as worker_state

from . import _compat, aio
from ._settings import seconds, task_label
from .errors import ConfigurationError, DrainInterrupted, TaskTimeout

__all__ = ["TimeoutPool", "Timeouts", "remaining", "timeout"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_STARTED = "celery_ext_started"  # task.request attribute: monotonic start of this run
_ATTRS = {"timeout": "time_limit", "soft_timeout": "soft_time_limit"}


# -- options --------------------------------------------------------------------
def _seconds(where: str, option: str, value: object) -> float | None:
    return None if value is None else seconds(f"{where}: {option}", value, positive=True)


def _check_pair(where: str, hard: float | None, soft: float | None) -> None:
    if hard is not None and soft is not None and soft >= hard:
        raise ConfigurationError(
            f"{where}: soft_timeout={soft:g} must be smaller than timeout={hard:g}"
        )


def apply_timeouts(task: Any) -> None:
    """Turn a task's ``timeout``/``soft_timeout`` options into Celery's time limits.

    Called for every task by ``install`` (at finalize) and at worker start;
    raises :class:`~celery_ext.errors.ConfigurationError` naming the task. Only
    celery_ext's own options are checked here: Celery's ``time_limit`` and
    ``soft_time_limit`` keep Celery's meaning and errors (``apply_async``
    raises ``ValueError`` for a soft limit above the hard one; equal is fine).

    Example::

        apply_timeouts(app.tasks["shop.export"])   # time_limit = timeout
    """
    where = f"task {task.name!r}"
    fun = getattr(task, "run", None)
    decorated = getattr(fun, "__celery_ext_timeout__", None) or {}
    ours = {
        option: _seconds(where, option, decorated.get(option, getattr(task, option, None)))
        for option in _ATTRS
    }
    if any(value is not None for value in ours.values()):
        values: dict[str, Any] = {}
        for option, stock in _ATTRS.items():
            theirs = getattr(task, stock, None)
            mine = ours[option]
            explicit = theirs != getattr(task.app.conf, f"task_{stock}", None)  # not the default
            if mine is not None and theirs is not None and mine != theirs and explicit:
                raise ConfigurationError(
                    f"{where}: {option}={mine:g} and {stock}={theirs!r} disagree; set one"
                )
            values[stock] = mine if mine is not None else theirs
        hard, soft = values["time_limit"], values["soft_time_limit"]
        if isinstance(hard, (int, float)) and isinstance(soft, (int, float)):
            _check_pair(where, float(hard), float(soft))
        for stock, value in values.items():
            if value is not None and getattr(task, stock, None) != value:
                setattr(task, stock, value)
    _add_start_stamp(task if isinstance(task, type) else type(task))
    if aio.is_async_task(task):
        aio.wrap_async_task(task, deadlines)
    _mark_body(task if isinstance(task, type) else type(task))


def timeout(hard: float | timedelta | None = None, soft: float | timedelta | None = None) -> Any:
    """Decorator setting a task's hard and soft timeouts (seconds or timedelta).

    Works above or below ``@app.task``; values are checked at once.

    Example::

        @app.task
        @celery_ext.timeout(30, soft=25)
        def export(report_id): ...
    """

    def decorate(obj: F) -> F:
        where = f"task {task_label(obj)!r}"
        hard_s = _seconds(where, "timeout", hard)
        soft_s = _seconds(where, "soft_timeout", soft)
        _check_pair(where, hard_s, soft_s)
        if hasattr(obj, "apply_async"):  # already a task
            obj.time_limit, obj.soft_time_limit = hard_s, soft_s  # type: ignore[attr-defined]
            _compat.forget_exec_options(obj)
        else:
            obj.__celery_ext_timeout__ = {"timeout": hard_s, "soft_timeout": soft_s}  # type: ignore[attr-defined]
        return obj

    if callable(hard) and not isinstance(hard, (int, float)):
        raise TypeError("use @celery_ext.timeout(seconds, soft=seconds), with arguments")
    return decorate


def deadlines() -> tuple[float | None, float | None]:
    """The running task's soft and hard deadlines (``time.monotonic`` clock), None if unlimited.

    Example::

        soft_at, hard_at = deadlines()
    """
    task: Any = current_task
    if task is None:
        return None, None
    request = task.request
    started: float | None = getattr(request, _STARTED, None)
    if started is None:
        return None, None
    hard_call, soft_call = request.timelimit or (None, None)
    soft = soft_call or task.soft_time_limit
    hard = hard_call or task.time_limit
    return (started + soft if soft else None, started + hard if hard else None)


def remaining() -> float | None:
    """Seconds left before the running task's soft limit (else its hard one); None if unlimited.

    Example::

        @app.task(timeout=60)
        def crawl(urls):
            for url in urls:
                if (celery_ext.remaining() or 1e9) < 5:
                    return crawl.delay(urls)   # hand the rest on
                fetch(url)
    """
    soft_at, hard_at = deadlines()
    limit = soft_at if soft_at is not None else hard_at
    if limit is None:
        return None
    return max(0.0, limit - time.monotonic())


def _add_start_stamp(cls: Any) -> None:
    """Make ``cls.before_start`` stamp each run's start, then call the task's own one.

    Celery calls ``before_start`` right before the body when a task class
    defines it: one method call per run, where a ``task_prerun`` receiver
    costs a signal dispatch (the largest part of celery_ext's per-task cost
    on prefork).
    """
    inherited = getattr(cls, "before_start", None)
    if getattr(inherited, "celery_ext_stamps", False):
        return
    own = None if inherited is Task.before_start else inherited

    def before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> None:
        # The run's start: for remaining(), retry deadlines and the soft-limit handler.
        thread = threading.current_thread()
        thread.celery_ext_async_done = False  # type: ignore[attr-defined]
        setattr(self.request, _STARTED, time.monotonic())
        # prefork children: billiard's soft-limit handler raises the stock exception.
        # billiard installs it once, as the child starts: replace it at the first task.
        if _SIGSOFT is not None and not getattr(thread, "celery_ext_soft_checked", False):
            thread.celery_ext_soft_checked = True  # type: ignore[attr-defined]
            billiards = signal.getsignal(_SIGSOFT) is _billiard_handler()
            if billiards and thread is threading.main_thread():
                signal.signal(_SIGSOFT, _raise_task_timeout)
        if own is not None:
            own(self, task_id, args, kwargs)

    before_start.celery_ext_stamps = True  # type: ignore[attr-defined]
    cls.before_start = before_start


_BODY = "__celery_ext_body__"


def _mark_body(cls: Any) -> None:
    """Wrap ``cls.run`` so the worker knows when the task's own code runs.

    prefork's soft-limit signal can come after the body returned (billiard
    sometimes sends it twice, or as the task ends): raised in Celery's tracer or
    billiard's loop it failed a finished task or killed the child. The handler
    raises only inside the body, and once per run for each cause. A prefork
    child also marks its slot in the worker's :class:`SharedState`, so a drain
    deadline tells a child still running a task from one whose result is on its
    way (see :mod:`celery_ext.shutdown`).
    """
    raw: Any = next((k.__dict__["run"] for k in cls.__mro__ if "run" in k.__dict__), None)
    static = isinstance(raw, staticmethod)
    fun = raw.__func__ if static else raw
    if fun is None or getattr(fun, _BODY, False):
        return

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        thread: Any = threading.current_thread()
        outer = getattr(thread, "celery_ext_in_body", False)  # a task called inside one
        slot = None if outer else _slot_of(thread)
        if not outer:
            thread.celery_ext_soft_fired = thread.celery_ext_drain_fired = False
            if slot is not None:
                slot.enter()
        thread.celery_ext_in_body = True
        try:
            return fun(*args, **kwargs)
        finally:
            thread.celery_ext_in_body = outer
            if slot is not None:
                slot.leave()

    setattr(run, _BODY, True)
    cls.run = staticmethod(run) if static else run


_SIGSOFT = getattr(signal, "SIGUSR1", None)


def _billiard_handler() -> Any:
    from billiard import pool

    return pool.soft_timeout_sighandler


def _raise_task_timeout(signum: int, frame: Any) -> None:
    # The parent sends the same signal at a warm shutdown's drain deadline, after
    # setting the drain flag it shares with its children.
    thread: Any = threading.main_thread()
    if not getattr(thread, "celery_ext_in_body", True):
        return  # the task's code is done: a late signal must not fail it or the child
    state = _state_of_running_task()
    draining = state is not None and state.draining()
    fired = "celery_ext_drain_fired" if draining else "celery_ext_soft_fired"
    if getattr(thread, fired, False):
        return  # once per run and cause (billiard can send a soft limit twice)
    setattr(thread, fired, True)
    action = _soft_action(thread)
    if action == "raise":
        raise DrainInterrupted() if draining else TaskTimeout()
    if action == "cancel":
        thread.celery_ext_drain_interrupted = draining
        thread.celery_ext_soft_cancel()


# -- state shared with prefork children -------------------------------------------------
_STATE = "_celery_ext_shared_state"
#: Child slots (billiard's process index); a larger index is not tracked.
_SLOTS = 4095


class SharedState:
    """A page of anonymous shared memory a worker shares with its prefork children.

    Made before the pool forks (children forked later, as replacements, share it
    too). Byte 0: the drain flag, set before the drain signals children at its
    deadline, so a child tells a drain interrupt from its own soft time limit.
    Byte 1 + i: 1 while the child of pool index i runs a task's own code.

    Example::

        state = shared_state(app)
        state.set_draining(); state.draining()   # True, in the children too
    """

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, 1 + _SLOTS)

    def set_draining(self) -> None:
        self._memory[0] = 1

    def draining(self) -> bool:
        return self._memory[0] == 1

    def running(self, index: int) -> bool:
        """Whether the child of pool ``index`` runs a task's code (True when untracked)."""
        return not 0 <= index < _SLOTS or self._memory[1 + index] == 1

    def slot(self, index: int) -> _Slot | None:
        return _Slot(self._memory, 1 + index) if 0 <= index < _SLOTS else None


class _Slot:
    __slots__ = ("memory", "offset")

    def __init__(self, memory: mmap.mmap, offset: int) -> None:
        self.memory, self.offset = memory, offset

    def enter(self) -> None:
        self.memory[self.offset] = 1

    def leave(self) -> None:
        self.memory[self.offset] = 0


def shared_state(app: Any) -> SharedState:
    """``app``'s :class:`SharedState`, made on first use (by the worker, before its pool forks).

    Example::

        shared_state(app).set_draining()
    """
    state: SharedState | None = app.__dict__.get(_STATE)
    if state is None:
        state = app.__dict__.setdefault(_STATE, SharedState())
    return state


def _state_of_running_task() -> SharedState | None:
    task: Any = current_task
    app = getattr(task, "app", None) if task is not None else None
    state = app.__dict__.get(_STATE) if app is not None else None
    return state if isinstance(state, SharedState) else None


def _slot_of(thread: Any) -> _Slot | None:
    """This prefork child's slot (the main thread of a pool child only), cached on the thread."""
    slot: Any = getattr(thread, "celery_ext_slot", False)
    if slot is False:
        slot = None
        if thread is threading.main_thread():
            from billiard.process import current_process

            index = getattr(current_process(), "index", None)
            state = _state_of_running_task()
            if isinstance(index, int) and state is not None:
                slot = state.slot(index)
        thread.celery_ext_slot = slot
    return slot if isinstance(slot, _Slot) else None


def _soft_action(thread: threading.Thread) -> str:
    """What a soft limit does to ``thread``: raise, cancel (async task) or nothing (too late)."""
    if getattr(thread, "celery_ext_cooperative", False):
        return "cancel"
    if getattr(thread, "celery_ext_async_done", False):
        return "ignore"  # an async task already finished; its result is being stored
    return "raise"


# -- the pool ---------------------------------------------------------------------
class _Abandoned(BaseException):
    """Raised in a thread whose task passed its hard limit; ``except Exception`` misses it."""


def _async_raise(ident: int, exc: type[BaseException] | None) -> None:
    # None clears an exception that is pending but not yet raised.
    arg = None if exc is None else ctypes.py_object(exc)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), arg)


class _Run:
    """One task run on one pool thread."""

    __slots__ = (
        "abandoned", "done", "hard_s", "ident", "raised", "result", "returned", "soft_s", "thread",
    )  # fmt: skip

    def __init__(self, soft_s: float | None, hard_s: float | None) -> None:
        self.thread = threading.current_thread()
        self.ident = threading.get_ident()
        self.soft_s, self.hard_s = soft_s, hard_s
        self.done = self.abandoned = self.returned = False
        self.raised = False  # an exception was set to be raised in its thread
        self.result: Any = None


class TimeoutPool(_compat.InfoPool, BasePool):  # type: ignore[misc]
    """Threads pool enforcing soft and hard time limits; used for ``-P threads`` and ``-P solo``.

    N plain threads share one job queue (no Future per task) and see the
    worker's app as ``current_app``. One watchdog thread keeps the deadlines
    in a heap and fires them to the millisecond. Counts (``soft_timeouts``,
    ``hard_timeouts``, ``abandoned_threads``, ``stuck_threads``) are in
    ``inspect stats`` under ``pool``.

    Example::

        celery -A shop worker -P threads -c 8    # install(app) makes this the pool
    """

    body_can_be_buffer = True
    signal_safe = False
    #: Seconds ``stop()`` waits for running tasks; None waits for them all.
    join_timeout_s: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs: SimpleQueue[tuple[Any, ...] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stuck: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._deadlines: list[tuple[float, int, bool, _Run, Any]] = []
        self._wake = threading.Condition(self._lock)
        self._seq = itertools.count()
        self._watchdog: threading.Thread | None = None
        self._stopping = False
        self._running: dict[int, tuple[_Run, Any]] = {}  # thread ident -> (run, request)
        self._idle_waiters = 0
        self.soft_timeouts = self.hard_timeouts = self.abandoned = 0
        self.default_hard_s: float | None = self.options.get("timeout") or None
        self.default_soft_s: float | None = self.options.get("soft_timeout") or None

    # -- threads ---------------------------------------------------------------
    def on_start(self) -> None:
        for _ in range(self.limit):
            self._spawn()
        self._watchdog = threading.Thread(
            target=self._watch, name="celery_ext-timeouts", daemon=True
        )
        self._watchdog.start()

    def _spawn(self) -> None:
        n = len(self._threads) + len(self._stuck)
        thread = threading.Thread(target=self._work, name=f"celery_ext-pool-{n}", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        if self.app is not None:
            self.app.set_current()
        get = self._jobs.get
        while (job := get()) is not None:
            try:
                if self._run(*job):
                    return  # abandoned: a fresh thread took this one's place
            except (TaskTimeout, _Abandoned):  # a limit fired as the task ended
                pass
            except Exception:  # Celery's tracer failed outside the task: keep the thread
                logger.exception("celery_ext: a pool job failed")

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        timeout_callback: Callable[..., Any] | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        **_: Any,
    ) -> None:
        hard_s = timeout or self.default_hard_s
        soft_s = soft_timeout or self.default_soft_s
        self._jobs.put(
            (target, args, kwargs, callback, accept_callback, timeout_callback, soft_s, hard_s)
        )

    def _run(
        self,
        target: Callable[..., Any],
        args: Any,
        kwargs: Any,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
        timeout_callback: Callable[..., Any] | None,
        soft_s: float | None,
        hard_s: float | None,
    ) -> bool:
        """Run one job; True when its thread was abandoned and must exit."""
        run = _Run(soft_s, hard_s)
        request = getattr(accept_callback, "__self__", None)  # Celery's Request, if any
        with self._lock:
            self._running[run.ident] = (run, request)
        if soft_s or hard_s:
            start = time.monotonic()
            with self._lock:
                for limit, soft in ((soft_s, True), (hard_s, False)):
                    if limit:
                        entry = (start + limit, next(self._seq), soft, run, timeout_callback)
                        heapq.heappush(self._deadlines, entry)
                self._wake.notify()

        def traced(*a: Any, **kw: Any) -> Any:
            result = target(*a, **kw)  # a TaskTimeout raised in here is the task's
            run.result, run.returned = result, True
            self._finish(run)
            return result

        def reply(value: Any) -> None:
            if not run.abandoned and callback is not None:
                callback(value)

        try:
            apply_target(traced, args, kwargs, reply, accept_callback)
        except (TaskTimeout, _Abandoned):
            # Raised between the task's return and _finish: the task itself is done.
            self._finish(run)
            if run.returned and not run.abandoned:
                reply(run.result)
        finally:
            self._finish(run)
            with self._lock:
                if self._running.get(run.ident, (None,))[0] is run:
                    del self._running[run.ident]
                if self._idle_waiters:  # only a drain waits for this
                    self._wake.notify_all()
        return run.abandoned

    def _finish(self, run: _Run) -> None:
        with self._lock:
            if not run.done:
                run.done = True
                if run.raised:  # drop a limit that fired just now
                    # Only then: on CPython 3.11 a clearing call when nothing is
                    # pending still slows every thread while a profiler or tracer
                    # is set (a worker ran 18 of 1,000 tasks in 15 s).
                    _async_raise(run.ident, None)

    # -- the watchdog -------------------------------------------------------------
    def _watch(self) -> None:
        with self._lock:
            while not self._stopping:
                deadlines = self._deadlines
                now = time.monotonic()
                while deadlines and deadlines[0][0] <= now:
                    _, _, soft, run, timeout_callback = heapq.heappop(deadlines)
                    if not run.done and not run.abandoned:
                        self._fire(run, soft, timeout_callback)
                wait = deadlines[0][0] - now if deadlines else None
                self._wake.wait(wait)

    def _fire(self, run: _Run, soft: bool, timeout_callback: Any) -> None:
        """A limit passed (called with the lock held)."""
        limit = run.soft_s if soft else run.hard_s
        if soft:
            self.soft_timeouts += 1
            if _soft_action(run.thread) == "raise":  # an async task cancels itself
                run.raised = True
                _async_raise(run.ident, TaskTimeout)
        else:
            self.hard_timeouts += 1
            self.abandoned += 1
            run.abandoned = True
            run.raised = True
            _async_raise(run.ident, _Abandoned)
            thread = next((t for t in self._threads if t.ident == run.ident), None)
            if thread is not None:
                self._threads.remove(thread)
                self._stuck.append(thread)
            threading.Thread(
                target=self._replace, args=(timeout_callback, limit), daemon=True
            ).start()
            return
        if timeout_callback is not None:
            threading.Thread(
                target=self._call, args=(timeout_callback, True, limit), daemon=True
            ).start()

    def _replace(self, timeout_callback: Any, limit: float) -> None:
        if not self._stopping:
            self._spawn()
        stuck = self.stuck_threads()
        if stuck:
            logger.warning(
                "celery_ext: a task passed its hard time limit (%gs); its thread was replaced "
                "(%d abandoned thread(s) still running)",
                limit,
                stuck,
            )
        self._call(timeout_callback, False, limit)

    @staticmethod
    def _call(timeout_callback: Any, soft: bool, limit: float) -> None:
        if timeout_callback is None:
            return
        try:
            timeout_callback(soft, limit)
        except Exception:  # reporting must not kill the pool
            logger.exception("celery_ext: reporting a time limit failed")

    # -- stop and stats -----------------------------------------------------------------
    def on_stop(self) -> None:
        # Jobs not started yet are dropped: their messages are unacked and go back
        # to the broker when the consumer's channel closes.
        while True:
            try:
                self._jobs.get_nowait()
            except Empty:
                break
        threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        deadline = None if self.join_timeout_s is None else time.monotonic() + self.join_timeout_s
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._stopping = True
            self._wake.notify()
        super().on_stop()

    # -- draining (see celery_ext.shutdown) ------------------------------------------------
    def take_waiting(self) -> list[Any]:
        """Remove the jobs no thread has started; returns their Celery Requests.

        Example::

            for request in pool.take_waiting():
                request.reject(requeue=True)
        """
        requests = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except Empty:
                break
            if job is None:
                self._jobs.put(None)  # a stop sentinel stays
                break
            request = getattr(job[4], "__self__", None)  # the accept callback's Request
            if request is not None:
                requests.append(request)
        return requests

    def running_requests(self) -> list[Any]:
        """Requests of the tasks running now (abandoned ones excluded)."""
        with self._lock:
            return [r for run, r in self._running.values() if r is not None and not run.abandoned]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no task runs (at most ``timeout`` s); True when idle.

        Example::

            pool.wait_idle(30)
        """

        def idle() -> bool:
            return not any(not run.abandoned for run, _ in self._running.values())

        with self._lock:
            self._idle_waiters += 1
            try:
                return self._wake.wait_for(idle, max(0.0, timeout))
            finally:
                self._idle_waiters -= 1

    def interrupt_running(self) -> int:
        """Raise :class:`DrainInterrupted` in every running task (the drain deadline).

        An ``async def`` task is cancelled instead and ends with it. Returns how
        many tasks were interrupted.

        Example::

            pool.interrupt_running()   # 2
        """
        with self._lock:
            runs = [run for run, _ in self._running.values() if not run.done and not run.abandoned]
            for run in runs:
                action = _soft_action(run.thread)
                if action == "raise":
                    run.raised = True
                    _async_raise(run.ident, DrainInterrupted)
                elif action == "cancel":
                    run.thread.celery_ext_drain_interrupted = True  # type: ignore[attr-defined]
                    run.thread.celery_ext_soft_cancel()  # type: ignore[attr-defined]
            return len(runs)

    def abandon_running(self) -> list[Any]:
        """Give up on the tasks still running (the drain's grace is over); their Requests.

        Their results are ignored from now on (the drain saves their messages);
        a thread that ends by the drain's interrupt later does not save it again.

        Example::

            for request in pool.abandon_running():
                save(request)
        """
        with self._lock:
            runs = [
                (run, request)
                for run, request in self._running.values()
                if not run.done and not run.abandoned and request is not None
            ]
            for run, _ in runs:
                run.abandoned = True
                run.thread.celery_ext_saved = True  # type: ignore[attr-defined]
            return [request for _, request in runs]

    def alive_threads(self) -> int:
        """Pool threads still running (a task that outlived the stop deadline)."""
        return sum(t.is_alive() for t in self._threads)

    def stuck_threads(self) -> int:
        """Abandoned threads (hard limit passed) whose task has not returned yet."""
        with self._lock:
            self._stuck = [t for t in self._stuck if t.is_alive()]
            return len(self._stuck)

    def extra_info(self) -> dict[str, Any]:
        return {
            "max-concurrency": self.limit,
            "threads": len(self._threads),
            "soft_timeouts": self.soft_timeouts,
            "hard_timeouts": self.hard_timeouts,
            "abandoned_threads": self.abandoned,
            "stuck_threads": self.stuck_threads(),
        }


# -- gevent -----------------------------------------------------------------------------
def _ignore(*_: Any, **__: Any) -> None:
    return None


class GeventTimeoutPool(_compat.InfoPool, GeventPool):  # type: ignore[misc]
    """Celery's gevent pool plus the soft limit: ``TaskTimeout`` thrown into the greenlet.

    The hard limit stays Celery's (a ``gevent.Timeout`` around the task).
    Greenlets are cooperative: a limit fires at the task's next switch (I/O,
    sleep), never inside a CPU-bound stretch.

    Example::

        celery -A shop worker -P gevent -c 100    # install(app) makes this the pool
    """

    soft_timeouts = 0
    #: Set by a warm shutdown's drain: the monotonic time running tasks must end by.
    drain_deadline: float | None = None
    #: Called with each request still running after the deadline and grace (the drain's save).
    drain_abandon: Callable[[Any], None] | None = None
    abandoned = interrupted = 0

    def on_stop(self) -> None:
        """Wait for running greenlets, but only until the drain's deadline.

        Then :class:`DrainInterrupted` is thrown into each, a grace of ``drain_grace_s``,
        and what still runs is handed to :attr:`drain_abandon` and killed.
        """
        pool, deadline = _compat.gevent_pool(self), self.drain_deadline
        if pool is None or deadline is None:
            return super().on_stop()  # type: ignore[no-any-return]
        pool.join(timeout=max(0.0, deadline - time.monotonic()))
        if not len(pool):
            return None
        self.interrupted = len(pool)
        for greenlet in list(pool):
            greenlet.kill(DrainInterrupted, block=False)
        pool.join(timeout=self.drain_grace_s)
        for request in list(worker_state.active_requests):
            self.abandoned += 1
            # Its message goes back (or is published again): no result or ack from the kill.
            request.on_success = request.on_failure = _ignore
            if self.drain_abandon is not None:
                self.drain_abandon(request)
        pool.kill(block=True, timeout=1.0)
        return None

    drain_grace_s = 1.0

    def on_apply(
        self,
        target: Callable[..., Any],
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        timeout: float | None = None,
        timeout_callback: Any = None,
        soft_timeout: float | None = None,
        **options: Any,
    ) -> Any:
        soft_s = soft_timeout or self.options.get("soft_timeout")
        if soft_s:
            target = self._with_soft_limit(target, soft_s, timeout_callback)
        return super().on_apply(
            target,
            args,
            kwargs,
            callback,
            accept_callback,
            timeout=timeout,
            timeout_callback=timeout_callback,
            **options,
        )

    def _with_soft_limit(
        self, target: Callable[..., Any], soft_s: float, timeout_callback: Any
    ) -> Callable[..., Any]:
        import gevent

        def limited(*args: Any, **kwargs: Any) -> Any:
            me, thread = gevent.getcurrent(), threading.current_thread()
            done = False

            def fire() -> None:  # in a greenlet of its own
                if done:
                    return
                action = _soft_action(thread)
                if action == "cancel":
                    thread.celery_ext_soft_cancel()  # type: ignore[attr-defined]
                if action != "raise":
                    return
                self.soft_timeouts += 1
                if timeout_callback is not None:
                    timeout_callback(True, soft_s)
                me.throw(TaskTimeout)

            timer = gevent.spawn_later(soft_s, fire)
            try:
                return target(*args, **kwargs)
            finally:
                done = True
                timer.kill(block=False)

        return limited

    def extra_info(self) -> dict[str, Any]:
        return {"soft_timeouts": self.soft_timeouts}


# -- the worker step ------------------------------------------------------------------


class Timeouts(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: time limits enforced on threads/solo, task options applied, warnings.

    ``install(app)`` adds it. It swaps Celery's threads and solo pools for
    :class:`TimeoutPool` before the pool is built, applies every task's
    ``timeout``/``soft_timeout`` and refuses bad values naming the task.

    Example::

        app.control.inspect().stats()[worker]["pool"]["hard_timeouts"]
    """

    name = "celery_ext.timeouts.Timeouts"
    label = "Timeouts"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        pool = w.pool_cls
        kind = _compat.pool_kind(pool)
        if kind in ("threads", "solo"):
            if kind == "solo":  # one thread; the consumer stays free
                w.concurrency = w.min_concurrency = 1
            w.pool_cls = TimeoutPool
        elif pool is GeventPool:
            w.pool_cls = GeventTimeoutPool
        elif kind != "prefork" and not (
            isinstance(pool, type) and issubclass(pool, (TimeoutPool, GeventTimeoutPool))
        ):
            logger.warning(
                "celery_ext: the %s pool does not enforce soft time limits "
                "(timeouts are enforced on prefork, threads, solo and gevent)",
                getattr(pool, "__name__", pool),
            )
        from ._tasks import apply_all

        shared_state(w.app)  # before the pool forks: prefork children share it
        apply_all(w.app)
        limited = _apply_worker_defaults(w)
        if limited and w.pool_cls is TimeoutPool:
            logger.warning(
                "celery_ext: time limits on a threads pool: a task blocked in C code (sleep, "
                "socket, a C extension) sees its soft limit only when the call returns; the "
                "hard limit still fails it and frees its slot (see stuck_threads in stats)"
            )
        super().__init__(w, **kwargs)


def _apply_worker_defaults(w: Any) -> bool:
    """Give tasks without limits the worker's ``--time-limit``/``--soft-time-limit``.

    Celery hands those to the pool only; on the task they also reach
    :func:`remaining` and ``async def`` tasks (in prefork children too).
    Returns whether any task in this worker has a limit.
    """
    limited = False
    for task in list(w.app.tasks.values()):
        if task.time_limit is None and w.time_limit:
            task.time_limit = w.time_limit
        if task.soft_time_limit is None and w.soft_time_limit:
            task.soft_time_limit = w.soft_time_limit
        limited = limited or bool(task.time_limit or task.soft_time_limit)
    return limited
