"""Tasks with time limits, shared by the embedded and the subprocess (prefork) timeout tests."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from celery import Celery
from celery.exceptions import TimeLimitExceeded

import celery_ext
from celery_ext import TaskTimeout


def define_tasks(app: Celery) -> dict[str, Any]:
    """Register the timeout test tasks on ``app``; returns them by short name."""

    @app.task(shared=False, name="to.soft_caught", soft_timeout=0.5, timeout=5)
    def soft_caught() -> Any:
        start = time.monotonic()
        try:
            while True:
                time.sleep(0.005)
        except TaskTimeout:
            return ["caught", time.monotonic() - start]

    @app.task(shared=False, name="to.swallow", soft_timeout=0.3, timeout=1.0)
    def swallow() -> None:
        while True:
            try:  # noqa: SIM105 - the soft limit is swallowed here, as real code does
                time.sleep(0.005)
            except Exception:
                pass

    @app.task(shared=False, name="to.blocked")
    @celery_ext.timeout(1.0)
    def blocked(seconds: float) -> str:
        time.sleep(seconds)  # in C: only the hard limit can end this on a thread
        return "woke"

    @app.task(shared=False, name="to.left", timeout=10, soft_timeout=8)
    def left() -> list[float | None]:
        first = celery_ext.remaining()
        time.sleep(0.2)
        return [first, celery_ext.remaining()]

    @app.task(shared=False, name="to.ok")
    def ok() -> str:
        return "ok"

    @app.task(shared=False, name="to.unlimited_left")
    def unlimited_left() -> float | None:
        return celery_ext.remaining()

    @app.task(shared=False, name="to.async_soft", soft_timeout=0.5, timeout=5)
    async def async_soft() -> None:
        await asyncio.sleep(10)

    @app.task(shared=False, name="to.async_caught", soft_timeout=0.5, timeout=5)
    async def async_caught() -> list[Any]:
        start = time.monotonic()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return ["cleaned", time.monotonic() - start]
        return ["not cancelled", 0]

    @app.task(shared=False, name="to.async_stubborn", soft_timeout=0.3, timeout=1.0)
    async def async_stubborn() -> None:
        while True:
            try:  # noqa: SIM105 - ignores its cancellation
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass

    @app.task(shared=False, bind=True, name="to.async_ok", timeout=10)
    async def async_ok(self: Any, x: int) -> list[Any]:
        await asyncio.sleep(0.01)
        return [x * 2, self.request.id, celery_ext.remaining()]

    @app.task(shared=False, bind=True, name="to.hard_retry", timeout=0.5, acks_late=True)
    @celery_ext.retry(on=TimeLimitExceeded, attempts=3, wait=celery_ext.fixed(0.1))
    def hard_retry(self: Any) -> int:
        if self.request.retries == 0:
            time.sleep(5)  # the first attempt passes its hard limit
        return int(self.request.retries)

    return {
        "hard_retry": hard_retry,
        "async_soft": async_soft,
        "async_caught": async_caught,
        "async_stubborn": async_stubborn,
        "async_ok": async_ok,
        "soft_caught": soft_caught,
        "swallow": swallow,
        "blocked": blocked,
        "left": left,
        "ok": ok,
        "unlimited_left": unlimited_left,
    }


app = Celery(
    "timeout_app",
    broker=os.environ.get(
        "CELERY_EXT_TEST_BROKER",
        os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11"),
    ),
    backend=os.environ.get(
        "CELERY_EXT_TEST_BACKEND",
        os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11"),
    ),
)
app.conf.task_default_queue = os.environ.get("CELERY_EXT_TEST_QUEUE", "celery")
celery_ext.install(app)
tasks = define_tasks(app)
