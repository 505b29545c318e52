"""An app with durable and lossy (``durable=False``) tasks, for `celery worker` tests.

Broker and queue from CELERY_EXT_TEST_BROKER / CELERY_EXT_TEST_QUEUE; a Redis ledger
(CELERY_EXT_TEST_LEDGER) records where each run happened.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

import celery_ext

QUEUE = os.environ.get("CELERY_EXT_TEST_QUEUE", "celery")
LEDGER = os.environ.get(
    "CELERY_EXT_TEST_LEDGER", os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11")
)

app = Celery("durability_app", broker=os.environ.get("CELERY_EXT_TEST_BROKER", LEDGER))
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True)
# A test that SIGKILLs a worker waits for the leases to give its messages back.
app.conf.celery_ext_dead_worker_after = float(os.environ.get("CELERY_EXT_TEST_DEAD_AFTER", "15"))
app.conf.celery_ext_lease_interval = min(5.0, app.conf.celery_ext_dead_worker_after / 4)
celery_ext.install(app)
ledger = redis.Redis.from_url(LEDGER)


@app.task(name="dur.fan", bind=True, acks_late=True)
def fan(self: Any, n: int, seconds: float = 0.0) -> None:
    """Durable: records its run, publishes a lossy ``ping(n)``, then works ``seconds``."""
    ledger.hincrby(f"{QUEUE}.durable", str(n), 1)
    ledger.hset(f"{QUEUE}.durable_pid", str(n), os.getpid())
    ping.delay(n, seconds)
    time.sleep(seconds)
    ledger.sadd(f"{QUEUE}.durable_done", n)


@app.task(name="dur.ping", bind=True, durable=False)
def ping(self: Any, n: int, seconds: float = 0.0) -> None:
    """Lossy: records which process ran it."""
    ledger.hset(f"{QUEUE}.lossy", str(n), os.getpid())
    time.sleep(seconds)
    ledger.sadd(f"{QUEUE}.lossy_done", n)


@app.task(name="dur.fan_late", bind=True, acks_late=True)
def fan_late(self: Any, n: int, seconds: float = 0.0) -> None:
    """Durable: works ``seconds``, then publishes its lossy ``ping(n)``."""
    ledger.hincrby(f"{QUEUE}.durable", str(n), 1)
    time.sleep(seconds)
    ping.delay(n)
    ledger.sadd(f"{QUEUE}.durable_done", n)
