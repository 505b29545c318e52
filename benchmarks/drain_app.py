"""The app `benchmarks/drain.py` runs `celery worker` on (configured from the environment).

DRAIN_BROKER, DRAIN_QUEUE, DRAIN_VARIANT (``stock`` or ``celery_ext``), DRAIN_LEDGER (a
Redis URL: which task numbers started and finished, and how often each ran).
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import celery_ext

QUEUE = os.environ.get("DRAIN_QUEUE", "drain")
ledger = redis.Redis.from_url(os.environ.get("DRAIN_LEDGER", "redis://127.0.0.1:6379/12"))
app = Celery("drain_bench", broker=os.environ.get("DRAIN_BROKER", "redis://127.0.0.1:6379/12"))
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, worker_prefetch_multiplier=4)
if os.environ.get("DRAIN_VARIANT") == "celery_ext":
    celery_ext.install(app)


@app.task(name="bench.work", acks_late=True)
def work(n: int, seconds: float) -> None:
    """Sleeps ``seconds``; the ledger records the start, the end and the run count."""
    ledger.hincrby(f"{QUEUE}.runs", str(n), 1)
    time.sleep(seconds)
    ledger.sadd(f"{QUEUE}.finished", n)
