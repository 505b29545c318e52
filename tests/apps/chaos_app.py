"""The app chaos runs start as `celery worker` subprocesses: acks_late tasks and a Redis ledger.

Configured by environment (set by :mod:`tests.chaos.harness`): the broker URL,
the queue, and the ledger (a Redis URL on the shared server, which no chaos
action touches). ``chaos.work(n)`` records each run of ``n`` in the hash
``<queue>.runs`` and each completion in the set ``<queue>.done``.
"""

from __future__ import annotations

import os
import random
import time

import redis
from celery import Celery

import celery_ext

QUEUE = os.environ.get("CELERY_EXT_CHAOS_QUEUE", "celery")
LEDGER = os.environ.get(
    "CELERY_EXT_CHAOS_LEDGER", os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11")
)
BROKER = os.environ.get("CELERY_EXT_CHAOS_BROKER", LEDGER)

app = Celery("chaos_app", broker=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=8,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    broker_heartbeat=10,
)
app.conf.celery_ext_drain_timeout = float(os.environ.get("CELERY_EXT_CHAOS_DRAIN_TIMEOUT", "5"))
if BROKER.startswith("sentinel://"):  # a test-owned Sentinel set (tests.chaos.harness)
    app.conf.broker_transport_options = {"master_name": "celery_ext_primary"}
if os.environ.get("CELERY_EXT_CHAOS_QUEUE_TYPE") == "quorum":
    app.conf.task_default_queue_type = "quorum"
app.conf.celery_ext_leases = BROKER.startswith(("redis", "sentinel"))
app.conf.celery_ext_replica_acks = int(os.environ.get("CELERY_EXT_CHAOS_REPLICA_ACKS", "0"))
app.conf.celery_ext_lease_interval = 1
app.conf.celery_ext_dead_worker_after = 4
if os.environ.get("CELERY_EXT_CHAOS_STOCK") != "1":  # stock: benchmarks/chaos_soak.py
    celery_ext.install(app)
ledger = redis.Redis.from_url(LEDGER)
_MAX_SLEEP_S = float(os.environ.get("CELERY_EXT_CHAOS_TASK_S", "0.01"))


@app.task(name="chaos.work")
def work(n: int) -> None:
    """A short job that records its run and its completion in the ledger."""
    time.sleep(random.uniform(0, _MAX_SLEEP_S))
    pipe = ledger.pipeline()
    pipe.hincrby(f"{QUEUE}.runs", str(n), 1)
    pipe.sadd(f"{QUEUE}.done", n)
    pipe.execute()
