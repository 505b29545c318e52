"""``async def`` tasks: run on an event loop celery_ext manages, cancelled at the soft limit.

Stock Celery calls ``task.run`` and stores what it returns: for an ``async def``
task that is an un-awaited coroutine. ``install(app)`` wraps such tasks when
they are bound: the coroutine runs to completion on an asyncio loop owned by
the pool thread (or prefork child) that runs the task, so ``self.request``,
``current_task`` and :func:`celery_ext.remaining` work inside it as in any task.

Time limits: at the soft limit the coroutine is cancelled (``CancelledError``
at its current ``await``); if it ends by that cancellation the task fails with
:class:`~celery_ext.errors.TaskTimeout` (at a warm shutdown's drain deadline:
:class:`~celery_ext.errors.DrainInterrupted`, and the task is handed back), and
if it catches it and returns, its value is the result (as a sync task that
catches ``TaskTimeout``). A coroutine that ignores the cancellation is
abandoned at the hard limit, as a stuck thread is. Calling the task directly
(``task(...)``) runs it the same way and returns its value.

Loops are reused per pool thread (one per greenlet on gevent, closed after the
run) and never shared between threads, so one slow coroutine cannot hold up
another task's loop.

Example::

    @app.task(soft_timeout=10, timeout=15)
    async def fetch(url):
        async with httpx.AsyncClient() as client:
            return (await client.get(url)).status_code
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from .errors import DrainInterrupted, TaskTimeout

__all__ = ["is_async_task", "wrap_async_task"]

_LOOP = "_celery_ext_loop"  # attribute of the pool thread owning a loop
#: After the soft limit, the loop wakes this often so a hard-limit abandon gets in.
_TICK_S = 0.05


def is_async_task(task: Any) -> bool:
    """Whether ``task`` (class or instance) has an ``async def`` body not yet wrapped.

    Example::

        is_async_task(app.tasks["shop.fetch"])   # True for `async def fetch`
    """
    run = _raw_run(task)
    fun = run.__func__ if isinstance(run, staticmethod) else run
    return inspect.iscoroutinefunction(fun) and not getattr(fun, "__celery_ext_async__", False)


def _raw_run(task: Any) -> Any:
    cls = task if isinstance(task, type) else type(task)
    for klass in cls.__mro__:
        if "run" in klass.__dict__:
            return klass.__dict__["run"]
    return None


def wrap_async_task(task: Any, deadlines: Callable[[], tuple[float | None, float | None]]) -> None:
    """Replace an ``async def`` task body by a sync one running it on a managed loop.

    ``deadlines()`` gives the running task's soft and hard deadlines on the
    :func:`time.monotonic` clock (None when unlimited).

    Example::

        wrap_async_task(FetchTask, timeouts.deadlines)
    """
    cls = task if isinstance(task, type) else type(task)
    raw = _raw_run(cls)
    static = isinstance(raw, staticmethod)
    fun = raw.__func__ if static else raw

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        soft_at, hard_at = deadlines()
        return run_coroutine(fun(*args, **kwargs), soft_at, hard_at)

    run.__celery_ext_async__ = True  # type: ignore[attr-defined]
    cls.run = staticmethod(run) if static else run  # type: ignore[attr-defined]


def run_coroutine(
    coro: Coroutine[Any, Any, Any], soft_at: float | None, hard_at: float | None
) -> Any:
    """Run ``coro`` to completion on this thread's loop, cancelling it at ``soft_at``.

    Example::

        run_coroutine(fetch_async(url), time.monotonic() + 10, None)
    """
    green = _green()
    thread = threading.current_thread()
    loop: asyncio.AbstractEventLoop | None = None if green else getattr(thread, _LOOP, None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        if not green:
            setattr(thread, _LOOP, loop)
    task = loop.create_task(coro)
    timed_out: list[bool] = []
    handles: list[asyncio.Handle] = []

    def soft() -> None:
        if not task.done():
            timed_out.append(True)
            task.cancel()
            tick()

    def tick() -> None:
        if not task.done():
            handles.append(loop.call_later(_TICK_S, tick))

    # The loop's clock is time.monotonic(), the clock of the deadlines.
    limit = soft_at if soft_at is not None else hard_at
    if limit is not None:
        handles.append(loop.call_at(limit, soft))
    # The pool's watchdog and prefork's soft-limit signal leave the limit to us
    # (or ask us to cancel) while the coroutine runs, and ignore a late limit after.
    thread.celery_ext_soft_cancel = lambda: loop.call_soon_threadsafe(soft)  # type: ignore[attr-defined]
    thread.celery_ext_cooperative = True  # type: ignore[attr-defined]
    thread.celery_ext_drain_interrupted = False  # type: ignore[attr-defined]
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if timed_out:
            # Cancelled by the soft limit, or by a warm shutdown's drain deadline.
            if getattr(thread, "celery_ext_drain_interrupted", False):
                raise DrainInterrupted() from None
            raise TaskTimeout() from None
        raise
    except BaseException:
        # Abandoned (hard limit) or killed: the loop holds a half-run task.
        task.cancel()
        if not loop.is_running():
            loop.close()
        if not green:
            setattr(thread, _LOOP, None)
        raise
    finally:
        thread.celery_ext_cooperative = False  # type: ignore[attr-defined]
        thread.celery_ext_async_done = True  # type: ignore[attr-defined]
        for handle in handles:
            handle.cancel()
        if green and not loop.is_closed():
            loop.close()


def _green() -> bool:
    """Whether gevent patched threading (one loop per run: greenlets come and go)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey is not None and monkey.is_module_patched("threading"))
