"""The app `benchmarks/timeouts.py` runs `celery worker` on (configured from the environment).

TIMEOUT_BROKER, TIMEOUT_QUEUE, TIMEOUT_VARIANT (``stock`` or ``celery_ext``). The tasks
use Celery's own ``soft_time_limit``/``time_limit`` so both variants run the same code.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

import celery_ext

SOFT_S, HARD_S = 0.5, 1.0
RUN_FOR_S = 4.0  # a task nothing stops returns after this

url = os.environ.get("TIMEOUT_BROKER", "redis://127.0.0.1:6379/12")
app = Celery("timeouts_bench", broker=url, backend=url)
app.conf.update(
    task_default_queue=os.environ.get("TIMEOUT_QUEUE", "timeouts"),
    worker_hijack_root_logger=False,
)
if os.environ.get("TIMEOUT_VARIANT") == "celery_ext":
    celery_ext.install(app)


def define(app: Celery) -> dict[str, Any]:
    """The two probe tasks, on ``app``."""

    @app.task(name="bench.soft", soft_time_limit=SOFT_S, time_limit=SOFT_S + RUN_FOR_S + 5)
    def soft() -> float | None:
        """Seconds between the soft limit and SoftTimeLimitExceeded; None if never raised."""
        start = time.monotonic()
        try:
            while time.monotonic() - start < RUN_FOR_S:
                time.sleep(0.001)
        except SoftTimeLimitExceeded:
            return time.monotonic() - start - SOFT_S
        return None

    @app.task(name="bench.hard", time_limit=HARD_S)
    def hard(key: str) -> str:
        """Stamps its start (wall clock) in the result backend, then runs RUN_FOR_S."""
        app.backend.set(key, repr(time.time()).encode())
        start = time.monotonic()
        while time.monotonic() - start < RUN_FOR_S:
            try:  # noqa: SIM105 - a task that swallows everything it can
                time.sleep(0.001)
            except Exception:
                pass
        return "ran to the end"

    return {"soft": soft, "hard": hard}


tasks = define(app)
