"""The app `benchmarks/overhead.py` runs `celery worker` on (configured from the environment).

OVH_BROKER, OVH_QUEUE, OVH_VARIANT (``stock`` or ``celery_ext``), OVH_MARKS (a Redis
URL for the time marks), OVH_WARMUP and OVH_TOTAL (task counts). The no-op task counts
itself in shared memory (inherited by prefork children) and writes a wall-clock mark to
Redis only at task 1, ``OVH_WARMUP`` and ``OVH_TOTAL``: three Redis writes per run, the
same code for both variants.

OVH_PROFILE (optional, a path prefix): cProfile every thread of the worker (and each
prefork child) on its own CPU time and write ``<prefix>-<pid>.prof`` at shutdown, for
``overhead.py --profile``.
"""

from __future__ import annotations

import contextlib
import cProfile
import multiprocessing
import os
import pstats
import threading
import time
from typing import Any

import redis
from celery import Celery, signals

import celery_ext

QUEUE = os.environ.get("OVH_QUEUE", "overhead")
WARMUP = int(os.environ.get("OVH_WARMUP", "500"))
TOTAL = int(os.environ.get("OVH_TOTAL", "10000"))
MARKS = {1: "first", WARMUP: "warm", TOTAL: "end"}

app = Celery("overhead_bench", broker=os.environ.get("OVH_BROKER", "redis://127.0.0.1:6379/13"))
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, worker_hijack_root_logger=False)
if os.environ.get("OVH_VARIANT") == "celery_ext":
    celery_ext.install(app)

_marks = redis.Redis.from_url(os.environ.get("OVH_MARKS", "redis://127.0.0.1:6379/13"))
_done = multiprocessing.Value("q", 0)  # created before the pool forks: shared by children


@app.task(name="overhead.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Counts itself; marks the wall-clock time of task 1, WARMUP and TOTAL."""
    with _done.get_lock():
        _done.value += 1
        n = _done.value
    mark = MARKS.get(n)
    if mark is not None:
        _marks.set(f"{QUEUE}.{mark}", repr(time.time()))


_profiles: list[cProfile.Profile] = []


def _cpu_clock() -> Any:
    """The calling thread's CPU clock, readable from any thread (the dump reads it)."""
    clock = time.pthread_getcpuclockid(threading.get_ident())
    last = [0.0]

    def now() -> float:
        with contextlib.suppress(OSError):  # else the thread has exited
            last[0] = time.clock_gettime(clock)
        return last[0]

    return now


def _profile_this_thread(*_: Any) -> None:
    """Start a profiler on this thread's CPU time (it replaces this profile hook)."""
    profile = cProfile.Profile(_cpu_clock())
    _profiles.append(profile)
    profile.enable()


def _profile_child(**_: Any) -> None:
    """A prefork child: drop the profiles inherited from the parent, profile the child."""
    _profiles.clear()
    _profile_this_thread()


def _dump_profiles(**_: Any) -> None:
    """Merge this process's thread profiles into ``<OVH_PROFILE>-<pid>.prof``."""
    profiles, _profiles[:] = list(_profiles), []
    for profile in profiles:
        profile.create_stats()
    stats = [p for p in profiles if getattr(p, "stats", None)]
    if stats:
        merged = pstats.Stats(stats[0])
        for profile in stats[1:]:
            merged.add(profile)
        merged.dump_stats(f"{os.environ['OVH_PROFILE']}-{os.getpid()}.prof")


if os.environ.get("OVH_PROFILE"):
    if os.environ.get("OVH_VARIANT") == "celery_ext":
        # TimeoutPool clears a pending async exception after every task
        # (PyThreadState_SetAsyncExc(ident, NULL)); with a profile function on the
        # threads that nearly stalls the pool. Profile mode skips the clear (only it).
        from celery_ext import timeouts

        _async_raise = timeouts._async_raise

        def _raise_only(ident: int, exc: type[BaseException] | None) -> None:
            if exc is not None:
                _async_raise(ident, exc)

        timeouts._async_raise = _raise_only
    threading.setprofile(_profile_this_thread)  # every thread started from now on
    _profile_this_thread()
    signals.worker_process_init.connect(_profile_child, weak=False)
    signals.worker_process_shutdown.connect(_dump_profiles, weak=False)
    signals.worker_shutdown.connect(_dump_profiles, weak=False)
