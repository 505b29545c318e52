"""An app for `celery -A tests.apps.cli_app worker` in subprocess tests (broker from env)."""

from __future__ import annotations

import os

from celery import Celery

import celery_ext

app = Celery(
    "cli_app",
    broker=os.environ.get(
        "CELERY_EXT_TEST_BROKER",
        os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11"),
    ),
)
app.conf.task_default_queue = os.environ.get("CELERY_EXT_TEST_QUEUE", "celery")
app.conf.celery_ext_dead_letter_queue = os.environ.get(
    "CELERY_EXT_TEST_DLQ", "celery_ext.dead_letters"
)
celery_ext.install(app)
