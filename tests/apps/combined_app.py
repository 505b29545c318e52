"""One app with every celery_ext feature on at once, for the combined chaos runs.

Configured by environment (set by :mod:`tests.chaos.harness`): broker, queue and
a Redis ledger, as for :mod:`tests.apps.chaos_app`; ``CELERY_EXT_CHAOS_LOSSY=0``
leaves out the ``durable=False`` follow-ups (prefork refuses them), and
``CELERY_EXT_CHAOS_QUEUE_TYPE=quorum`` puts it on RabbitMQ quorum queues,
``CELERY_EXT_CHAOS_REPLICA_ACKS=N`` makes its Redis publishes wait for N
replicas (a ``sentinel://`` broker gets the test set's master name);
``CELERY_EXT_CHAOS_STOCK=1`` (``benchmarks/chaos_soak.py --combined``) runs the
same jobs on stock Celery's nearest equivalents: ``autoretry_for`` with a 0.5 s
countdown, the same time limits, countdowns held by the worker, follow-ups as
ordinary tasks on the broker, no queue bound and no drain deadline.

Features on: bounded prefetch (``prefetch_limit``, ``prefetch_bytes``), far
countdowns parked on the broker, retries with parked waits (a policy that also
retries a hard time limit), soft and hard time limits per call, a queue bound
(producers use ``block``), a short drain deadline, Redis leases, lossy
follow-ups on the worker's local lane.

``combo.work(n, kind)`` records each run in ``<queue>.runs`` and each
completion in ``<queue>.done`` / ``<queue>.completions``; the lossy
``combo.follow(n)`` it publishes records ``<queue>.lossy_done``; a worker's
lane report at shutdown records the follow-ups it dropped.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import redis
from celery import Celery, signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

import celery_ext
from celery_ext.signals import drain_finished

QUEUE = os.environ.get("CELERY_EXT_CHAOS_QUEUE", "celery")
LEDGER = os.environ.get(
    "CELERY_EXT_CHAOS_LEDGER", os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11")
)
BROKER = os.environ.get("CELERY_EXT_CHAOS_BROKER", LEDGER)
LOSSY = os.environ.get("CELERY_EXT_CHAOS_LOSSY", "1") == "1"
STOCK = os.environ.get("CELERY_EXT_CHAOS_STOCK") == "1"
QUEUE_TYPE = os.environ.get("CELERY_EXT_CHAOS_QUEUE_TYPE", "classic")
REPLICA_ACKS = int(os.environ.get("CELERY_EXT_CHAOS_REPLICA_ACKS", "0"))
#: The queue bound producers see (they block at it).
QUEUE_LIMIT = 300
RETRYABLE = (ConnectionError, TimeLimitExceeded)

app = Celery("combined_app", broker=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    broker_heartbeat=10,
)
if BROKER.startswith("sentinel://"):  # a test-owned Sentinel set (tests.chaos.harness)
    app.conf.broker_transport_options = {"master_name": "celery_ext_primary"}
if QUEUE_TYPE == "quorum":
    app.conf.task_default_queue_type = "quorum"
if not STOCK:
    celery_ext.install(
        app,
        drain_timeout=1.5,
        prefetch_limit=40,
        prefetch_bytes=16_384,
        eta_horizon=2.0,
        park_interval=0.2,
        queue_limits={QUEUE: QUEUE_LIMIT},
        queue_full_policy="block",
        queue_block_timeout=60.0,
        leases=BROKER.startswith(("redis", "sentinel")),
        lease_interval=1.0,
        dead_worker_after=4.0,
        lane_concurrency=2,
        replica_acks=REPLICA_ACKS,
    )
ledger = redis.Redis.from_url(LEDGER)


def _work(self: Any, n: int, kind: str, pad: str = "") -> None:
    """A durable job of one ``kind``: plain, flaky, slow, soft, hard, countdown, padded."""
    ledger.hincrby(f"{QUEUE}.runs", str(n), 1)
    if LOSSY:
        follow_id = follow.delay(n).id
        pipe = ledger.pipeline()
        pipe.hset(f"{QUEUE}.lossy_ids", follow_id, n)
        pipe.hset(f"{QUEUE}.lossy_pids", follow_id, os.getpid())
        pipe.execute()
    first = not self.request.retries
    if kind == "flaky" and first:
        raise ConnectionError("the first attempt fails; the retry's wait is parked")
    if kind == "hard" and first:
        time.sleep(2.0)  # past its 1 s hard limit: the policy retries it
    if kind == "slow":
        end = time.monotonic() + random.uniform(0.2, 1.2)  # may outlast the drain deadline
        while time.monotonic() < end:
            time.sleep(0.01)
    if kind == "soft":
        try:
            while True:  # until the soft limit (or the drain deadline) interrupts
                time.sleep(0.01)
        except SoftTimeLimitExceeded as exc:
            if isinstance(exc, celery_ext.DrainInterrupted):
                raise  # handed back: it runs again elsewhere
    time.sleep(random.uniform(0, 0.01))
    pipe = ledger.pipeline()
    pipe.hincrby(f"{QUEUE}.completions", str(n), 1)
    pipe.sadd(f"{QUEUE}.done", n)
    pipe.execute()


if STOCK:
    work = app.task(
        name="combo.work",
        bind=True,
        autoretry_for=RETRYABLE,
        max_retries=8,
        default_retry_delay=0.5,
    )(_work)
else:
    policy = celery_ext.retry(on=RETRYABLE, attempts=8, wait=celery_ext.fixed(0.5))
    work = app.task(name="combo.work", bind=True)(policy(_work))


def _follow(n: int) -> None:
    """The lossy follow-up: runs on the publishing worker's local lane."""
    ledger.sadd(f"{QUEUE}.lossy_done", n)


if LOSSY:  # a prefork worker refuses an app with durable=False tasks
    follow = app.task(name="combo.follow", **({} if STOCK else {"durable": False}))(_follow)


@signals.worker_shutdown.connect
def _lane_report(sender: Any = None, **_: Any) -> None:
    report = getattr(sender, "celery_ext_lane_report", None)
    if report is not None and report.dropped_ids:
        ledger.sadd(f"{QUEUE}.lossy_dropped_ids", *report.dropped_ids)


@drain_finished.connect
def _drain_report(sender: Any = None, **counts: Any) -> None:
    counts.pop("signal", None)
    ledger.rpush(f"{QUEUE}.drains", repr(counts))
