"""An installed app for `celery worker` and `celery flower` subprocesses (tests/test_flower.py)."""

from __future__ import annotations

import os
import time

from celery import Celery

import celery_ext

app = Celery(
    "flower_app",
    broker=os.environ.get(
        "CELERY_EXT_TEST_BROKER",
        os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11"),
    ),
)
app.conf.update(
    task_default_queue=os.environ.get("CELERY_EXT_TEST_QUEUE", "celery"),
    task_ignore_result=True,
)
celery_ext.install(app)


@app.task(name="flower_app.doomed")
@celery_ext.retry(attempts=2, wait=celery_ext.fixed(0.1))
def doomed() -> None:
    """Fails every attempt: dead-lettered after the second."""
    raise ConnectionError("still down")


@app.task(name="flower_app.pause")
def pause(seconds: float) -> None:
    """Runs long enough for Flower to show the task running."""
    time.sleep(seconds)
