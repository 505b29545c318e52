"""An app for `celery worker` drain tests; a Redis ledger of starts, finishes and reports."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, signals
from celery.worker.control import control_command

import celery_ext
from celery_ext.signals import drain_finished, drain_started

QUEUE = os.environ.get("CELERY_EXT_TEST_QUEUE", "celery")
LEDGER = os.environ.get(
    "CELERY_EXT_TEST_LEDGER", os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11")
)

app = Celery("drain_app", broker=os.environ.get("CELERY_EXT_TEST_BROKER", LEDGER))
app.conf.update(task_default_queue=QUEUE, task_ignore_result=True, worker_prefetch_multiplier=4)
app.conf.celery_ext_probe_stale_after = float(os.environ.get("CELERY_EXT_TEST_STALE_AFTER", "30"))
app.conf.celery_ext_leases = os.environ.get("CELERY_EXT_TEST_LEASES", "1") == "1"
if "CELERY_EXT_TEST_VISIBILITY" in os.environ:
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["CELERY_EXT_TEST_VISIBILITY"])
    }
celery_ext.install(app)
ledger = redis.Redis.from_url(LEDGER)


@app.task(name="drain.work", acks_late=True)
def work(n: int, seconds: float, stubborn: bool = False) -> None:
    """Runs ``seconds`` in small sleeps; ``stubborn`` ignores TaskTimeout."""
    _work(n, seconds, stubborn)


@app.task(name="drain.early")
def early(n: int, seconds: float) -> None:
    """Like ``work``, acked as it starts (no acks_late)."""
    _work(n, seconds, False)


def _work(n: int, seconds: float, stubborn: bool) -> None:
    ledger.sadd(f"{QUEUE}.started", n)
    ledger.hincrby(f"{QUEUE}.runs", str(n), 1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.01)
        except Exception:
            if not stubborn:
                raise
    ledger.sadd(f"{QUEUE}.finished", n)


@signals.task_failure.connect
def _failed(task_id: str | None = None, exception: Any = None, **_: Any) -> None:
    ledger.rpush(f"{QUEUE}.failures", f"{task_id} {exception!r}")


@control_command(args=[("seconds", float)], signature="<seconds>")
def block_loop(state: Any, seconds: float = 1.0) -> dict[str, str]:
    """Stalls the consumer's event loop (remote control runs on it): a stuck loop."""
    time.sleep(seconds)
    return {"ok": "blocked"}


@drain_started.connect
def _started(sender: Any = None, **_: Any) -> None:
    ledger.rpush(f"{QUEUE}.drain", json.dumps({"event": "started", "at": time.time()}))


@drain_finished.connect
def _finished(sender: Any = None, **counts: Any) -> None:
    counts.pop("signal", None)
    ledger.rpush(f"{QUEUE}.drain", json.dumps({"event": "finished", "at": time.time(), **counts}))
