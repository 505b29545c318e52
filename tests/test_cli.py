"""`celery -A app ext dlq ...` as a user runs it: a subprocess against Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

import celery_ext
from celery_ext import DeadLetters

ROOT = Path(__file__).parent.parent


@pytest.fixture
def dlq_app(redis_url: str, unique_queue: str) -> Iterator[Celery]:
    app = Celery("cli_probe", broker=redis_url, set_as_current=False)
    app.conf.task_default_queue = unique_queue
    celery_ext.install(app, dead_letter_queue=f"{unique_queue}.dlq")
    yield app
    with app.connection_for_write() as conn:
        conn.default_channel.client.delete(unique_queue, f"{unique_queue}.dlq")


def cli(app: Celery, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        CELERY_EXT_TEST_BROKER=app.conf.broker_url,
        CELERY_EXT_TEST_QUEUE=app.conf.task_default_queue,
        CELERY_EXT_TEST_DLQ=f"{app.conf.task_default_queue}.dlq",
    )
    cmd = [sys.executable, "-m", "celery", "-A", "tests.apps.cli_app", "ext", "dlq", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def entry(task_id: str, n: int) -> dict[str, object]:
    return {
        "id": task_id,
        "task": "cli.work",
        "args": [n],
        "kwargs": {},
        "queue": "",
        "reason": "attempts",
        "exception": {"type": "builtins.OSError", "message": "down", "traceback": "..."},
        "attempts": [{"at": "2026-11-29T06:00:00+00:00", "error": "OSError: down"}] * 3,
        "dead_at": f"2026-11-29T06:00:0{n}+00:00",
    }


def test_dlq_list_show_replay_purge(dlq_app: Celery) -> None:
    dead = DeadLetters(dlq_app)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for n, task_id in enumerate(ids):
        dead.push(entry(task_id, n))

    listed = cli(dlq_app, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "TASK", "REASON", "ATTEMPTS"]
    assert [line.split()[0] for line in lines[1:]] == ids  # oldest first
    assert "OSError: down" in lines[1]

    shown = cli(dlq_app, "show", ids[1])
    assert shown.returncode == 0 and json.loads(shown.stdout)["args"] == [1]
    assert cli(dlq_app, "show", "nope").returncode != 0

    replayed = cli(dlq_app, "replay", ids[0])
    assert replayed.returncode == 0 and f"replayed {ids[0]}" in replayed.stdout
    with dlq_app.connection_for_write() as conn:
        raw = conn.default_channel.client.lrange(dlq_app.conf.task_default_queue, 0, -1)
    assert [json.loads(m)["headers"]["id"] for m in raw] == [ids[0]]  # queued to run again

    assert cli(dlq_app, "purge").returncode != 0  # ids or --all, never a silent purge-all
    unknown = cli(dlq_app, "purge", ids[1], "nope")  # the known one goes, the unknown is named
    assert unknown.returncode == 1 and "purged 1 entry" in unknown.stdout, unknown
    assert "no dead-lettered task nope" in unknown.stderr, unknown.stderr
    assert [e["id"] for e in dead.list()] == [ids[2]]
    purged = cli(dlq_app, "purge", "--all")
    assert purged.returncode == 0 and "purged 1 entry" in purged.stdout
    assert dead.list() == []
    assert "no dead-lettered tasks" in cli(dlq_app, "list").stdout
