"""The app `benchmarks/eta_flood.py` runs `celery worker` on (configured from the environment).

FLOOD_BROKER, FLOOD_QUEUE, FLOOD_PARK_PREFIX (RabbitMQ delay queues of this run),
FLOOD_RESULTS (Redis URL for latency samples), FLOOD_VARIANT:
``stock``, ``stock-eta-limit`` (worker_eta_task_limit=1000) or ``celery_ext``.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_ext

variant = os.environ.get("FLOOD_VARIANT", "stock")
app = Celery("flood", broker=os.environ.get("FLOOD_BROKER", "redis://127.0.0.1:6379/12"))
app.conf.update(
    task_default_queue=os.environ.get("FLOOD_QUEUE", "flood"),
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)
if variant == "stock-eta-limit":
    app.conf.worker_eta_task_limit = 1000
if variant == "celery_ext":
    celery_ext.install(app, park_prefix=os.environ.get("FLOOD_PARK_PREFIX", "celery_ext"))

_results = redis.Redis.from_url(os.environ.get("FLOOD_RESULTS", "redis://127.0.0.1:6379/12"))
_key = f"{app.conf.task_default_queue}.latency"


@app.task(name="flood.ready")
def ready(sent: float) -> None:
    """A ready task: records enqueue -> start latency."""
    _results.rpush(_key, time.time() - sent)


@app.task(name="flood.later")
def later() -> None:
    """A far-future countdown task (never due during the run)."""
