"""Warm shutdown on a real `celery worker` (threads, prefork): hand back at once, drain, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from tests.helpers import wait_for

ROOT = Path(__file__).parent.parent


class Run:
    """One `celery worker` subprocess on one broker, and the ledger of its tasks."""

    def __init__(self, broker: str, ledger_url: str, queue: str, pool: str = "threads") -> None:
        self.broker, self.queue, self.pool = broker, queue, pool
        self.ledger = redis.Redis.from_url(ledger_url)
        self.env = dict(
            os.environ,
            CELERY_EXT_TEST_BROKER=broker,
            CELERY_EXT_TEST_QUEUE=queue,
            CELERY_EXT_TEST_LEDGER=ledger_url,
        )
        self.app = Celery("drain_probe", broker=broker, set_as_current=False)
        self.app.conf.update(task_default_queue=queue, task_ignore_result=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.hostname = f"drain-{uuid.uuid4().hex[:6]}@localhost"

    def start(self, *options: str) -> None:
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.apps.drain_app", "worker",
            "-P", self.pool, "-c", "2", "-n", self.hostname, "-Q", self.queue, *options,
            "--without-mingle", "--without-gossip", "-l", "WARNING",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT)
        wait_for(lambda: self.app.control.ping(destination=[self.hostname], timeout=0.5), 30)

    def send(self, n: int, seconds: float, stubborn: bool = False) -> str:
        return str(self.app.send_task("drain.work", (n, seconds, stubborn)).id)

    def send_early(self, n: int, seconds: float) -> str:
        return str(self.app.send_task("drain.early", (n, seconds)).id)

    def depth(self) -> int:
        with Connection(self.broker) as conn:
            if conn.transport.driver_type == "redis":
                return int(conn.default_channel.client.llen(self.queue))
            return int(conn.default_channel.queue_declare(self.queue, passive=True).message_count)

    def started(self) -> set[int]:
        return {int(x) for x in self.ledger.smembers(f"{self.queue}.started")}

    def finished(self) -> set[int]:
        return {int(x) for x in self.ledger.smembers(f"{self.queue}.finished")}

    def runs(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.ledger.hgetall(f"{self.queue}.runs").items()}

    def failures(self) -> list[str]:
        return [x.decode() for x in self.ledger.lrange(f"{self.queue}.failures", 0, -1)]

    def queued_ids(self) -> list[str]:
        """Task ids of the messages waiting in the queue (read without taking them)."""
        with Connection(self.broker) as conn:
            if conn.transport.driver_type == "redis":
                raw = conn.default_channel.client.lrange(self.queue, 0, -1)
                return [json.loads(item)["headers"]["id"] for item in raw]
            channel = conn.channel()
            try:
                ids = []
                while (message := channel.basic_get(self.queue)) is not None:
                    ids.append(message.headers["id"])
                return ids
            finally:
                channel.close()  # unacked: back in the queue

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.ledger.lrange(f"{self.queue}.drain", 0, -1)]

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for suffix in ("started", "finished", "drain", "runs", "failures"):
            self.ledger.delete(f"{self.queue}.{suffix}")
        # A killed worker's Redis leases: no later test's worker should recover them.
        for key in self.ledger.scan_iter(f"celery_ext.lease.*:{self.hostname}:*"):
            self.ledger.delete(key)
        with Connection(self.broker) as conn:
            channel = conn.default_channel
            channel.queue_delete(self.queue)
            if conn.transport.driver_type == "amqp":
                channel.exchange_delete(self.queue)


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    return redis_url if request.param == "redis" else str(request.getfixturevalue("amqp_url"))


@pytest.fixture
def run(
    request: pytest.FixtureRequest, broker: str, redis_url: str, unique_queue: str
) -> Iterator[Run]:
    r = Run(broker, redis_url, unique_queue, request.param)
    yield r
    r.cleanup()


@pytest.mark.parametrize("run", ["threads", "prefork"], indirect=True)
def test_sigterm_hands_prefetched_work_back_at_once_and_exits_when_in_flight_ends(
    run: Run,
) -> None:
    run.start("--drain-timeout", "30")
    run.send(0, 3.0)
    run.send(1, 3.0)
    for n in range(2, 8):
        run.send(n, 0.01)  # prefetched behind the two slow ones (window: 2 x 4)
    wait_for(lambda: run.started() == {0, 1} and run.depth() == 0)
    # The 6 quick ones are held by the worker, not started: two threads are busy.
    assert run.proc is not None
    sent_at = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: run.depth() == 6, timeout=5)
    handed_back_s = time.monotonic() - sent_at
    code = run.proc.wait(30)
    exit_s = time.monotonic() - sent_at
    assert handed_back_s < 1.0, handed_back_s
    assert code == 0
    assert run.depth() == 6  # the two finished ones were acked, not handed back too
    assert run.finished() == {0, 1} and run.started() == {0, 1}  # nothing else ran
    # In-flight remaining (< 3 s) plus exit overhead; prefork's own pool join adds
    # ~1.5 s of fixed sleeps (billiard's supervisor, the shutdown timer thread).
    assert exit_s < 3.0 + (1.5 if run.pool == "threads" else 3.0), exit_s
    started, finished = run.reports()
    assert started["event"] == "started" and finished["event"] == "finished"
    assert (finished["completed"], finished["requeued"], finished["abandoned"]) == (2, 6, 0)


@pytest.mark.parametrize("run", ["threads", "solo", "prefork", "gevent"], indirect=True)
def test_at_the_deadline_tasks_are_handed_back_never_failed_and_the_exit_status_says_so(
    run: Run,
) -> None:
    # Stock Celery's soft-limit path stored interrupted tasks as FAILURE and acked
    # them: a deploy turned running work into failures. Now a task that ends by the
    # interrupt is handed back (acks_late: requeued; early ack: published again, same
    # id), and one that ignores it is abandoned after the grace, its message saved.
    solo = run.pool == "solo"
    run.start("--drain-timeout", "1", "-c", "1" if solo else "4")
    ids = {run.send(0, 20.0)}  # acks_late, ends by the interrupt
    if not solo:
        ids.add(run.send_early(1, 20.0))  # acked as it started
        ids.add(run.send(2, 20.0, True))  # ignores the interrupt: abandoned after the grace
        ids.add(run.send(3, 20.0, True))
    wait_for(lambda: len(run.started()) == len(ids) and run.depth() == 0)
    assert run.proc is not None
    sent_at = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(30) == 1  # the deadline cut the drain short
    exit_s = time.monotonic() - sent_at
    # deadline + grace + exit overhead (an idle stock gevent worker takes ~4 s to exit)
    assert exit_s < 1.0 + 1.0 + (6.0 if run.pool == "gevent" else 3.0), exit_s
    assert run.failures() == []  # no FAILURE, no task_failure
    wait_for(lambda: run.depth() == len(ids), timeout=10)
    assert sorted(run.queued_ids()) == sorted(ids)
    assert run.finished() == set()
    report = run.reports()[-1]
    handed = 1 if solo else 2
    expected = {
        "completed": 0,
        "requeued": handed,
        "abandoned": len(ids) - handed,
        "interrupted": len(ids),
    }
    assert {k: report[k] for k in expected} == expected, report


@pytest.mark.parametrize("run", ["threads", "prefork"], indirect=True)
def test_sigterm_under_load_loses_nothing_and_runs_nothing_twice(run: Run) -> None:
    total = 200
    run.start("--drain-timeout", "30")
    for n in range(total):
        run.send(n, 0.02)
    wait_for(lambda: len(run.finished()) >= 20)
    assert run.proc is not None
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(30) == 0
    first = run.finished()
    assert 0 < len(first) < total  # stopped mid-way
    assert run.started() == first  # whatever started there, finished there
    run.start()  # a second worker takes what the first handed back
    wait_for(lambda: len(run.finished()) == total, timeout=60)
    assert run.runs() == dict.fromkeys(range(total), 1)


@pytest.mark.parametrize("run", ["prefork"], indirect=True)
def test_sigterm_as_jobs_reach_children_neither_stalls_nor_runs_them_twice(run: Run) -> None:
    # Stock Celery forgets a job written to a child whose acceptance it has not read
    # yet when SIGTERM lands: the child runs it, the result is ignored (the message
    # is never acked, so the task runs again after the restart) and the child waits
    # 30 s for its READY to be read before exiting. Eight children on 1 ms tasks
    # put jobs in that state about every other SIGTERM; three rounds, three chances.
    total = 0
    for _ in range(3):
        run.start("--drain-timeout", "30", "-c", "8")
        for n in range(total, total + 100):
            run.send(n, 0.001)
        total += 100
        wait_for(lambda goal=total - 80: len(run.finished()) >= goal)
        assert run.proc is not None
        sent_at = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(30) == 0
        assert time.monotonic() - sent_at < 10.0
    run.start()
    wait_for(lambda: len(run.finished()) == total, timeout=60)
    assert run.runs() == dict.fromkeys(range(total), 1)
