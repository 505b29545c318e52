"""Durability per task: `durable=False` tasks run on the publishing process's local lane,
the rest on Redis or RabbitMQ, in one app and one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

import celery_ext
from celery_ext import LocalWorker, QueueFull
from tests.helpers import broker_url, depth, embedded_worker, new_app, wait_for
from tests.test_shutdown import ROOT


@pytest.fixture(params=["redis", "amqp"])
def app(request: pytest.FixtureRequest, unique_queue: str) -> Iterator[Celery]:
    kind = request.param
    app = new_app(broker_url(request, kind), unique_queue)
    app.conf.task_create_missing_queues = True
    celery_ext.install(app, lane_max_queued=50, lane_full_policy="raise")
    with app.connection_for_write() as conn:  # the durable queue exists before any worker
        app.amqp.queues[unique_queue].bind(conn.default_channel).declare()
    yield app
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(unique_queue)
        if kind == "amqp":
            conn.default_channel.exchange_delete(unique_queue)


def test_lossy_tasks_run_on_the_lane_and_never_reach_the_broker(app: Celery) -> None:
    ran: list[int] = []

    @app.task(shared=False, name=f"d.lossy.{uuid.uuid4().hex[:6]}", durable=False)
    def lossy(n: int) -> int:
        ran.append(n)
        return n

    @app.task(shared=False, name=f"d.durable.{uuid.uuid4().hex[:6]}")
    def durable(n: int) -> int:
        return n

    queue = app.conf.task_default_queue
    with LocalWorker(app):  # this process's lane worker; no broker worker yet
        for n in range(20):
            lossy.delay(n)
            if n % 4 == 0:
                durable.delay(n)  # interleaved
        wait_for(lambda: len(ran) == 20)
        assert depth(app, queue) == 5  # only the durable ones reached the broker
        with embedded_worker(app):  # the broker's worker takes the durable ones
            wait_for(lambda: depth(app, queue) == 0)
            assert lossy.delay(99).get(timeout=20) == 99
    assert sorted(ran) == [*range(20), 99]


def test_a_full_lane_raises_while_the_durable_lane_keeps_accepting(app: Celery) -> None:
    @app.task(shared=False, name=f"d.lossy.{uuid.uuid4().hex[:6]}", durable=False)
    def lossy() -> None: ...

    @app.task(shared=False, name=f"d.durable.{uuid.uuid4().hex[:6]}")
    def durable() -> None: ...

    for _ in range(50):  # no lane worker: the lane fills up (lane_max_queued=50)
        lossy.delay()
    with pytest.raises(QueueFull) as info:
        lossy.delay()
    assert info.value.limit == 50
    for _ in range(10):
        durable.delay()
    assert depth(app, app.conf.task_default_queue) == 10


# -- a real `celery worker` ---------------------------------------------------------------
class Worker:
    def __init__(
        self, redis_url: str, queue: str, *options: str, broker: str = "", dead_after: float = 15
    ) -> None:
        self.queue = queue
        self.hostname = f"dur-{uuid.uuid4().hex[:6]}@localhost"
        self.env = dict(
            os.environ,
            CELERY_EXT_TEST_DEAD_AFTER=str(dead_after),
            CELERY_EXT_TEST_BROKER=broker or redis_url,
            CELERY_EXT_TEST_QUEUE=queue,
            CELERY_EXT_TEST_LEDGER=redis_url,
        )
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.apps.durability_app", "worker",
            "-c", "2", "-n", self.hostname, "-Q", queue, *options,
            "--without-mingle", "--without-gossip", "-l", "WARNING",
        ]  # fmt: skip
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - read, then closed by stop()
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stderr=self.log)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


@pytest.fixture
def ledger(redis_url: str, unique_queue: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(f"{unique_queue}*"):
        client.delete(key)


def send(redis_url: str, queue: str, n: int, seconds: float) -> None:
    app = Celery("dur_client", broker=redis_url, set_as_current=False)
    app.conf.task_default_queue = queue
    app.send_task("dur.fan", (n, seconds))
    app.close()


def stop(worker: Worker) -> None:
    if worker.proc.poll() is None:
        worker.proc.kill()
        worker.proc.wait(10)
    worker.log.close()


def test_a_celery_worker_runs_its_lossy_tasks_in_process_and_a_kill_loses_only_them(
    redis_url: str, unique_queue: str, ledger: redis.Redis
) -> None:
    first = Worker(redis_url, unique_queue, "-P", "threads", dead_after=4)
    second: Worker | None = None
    try:
        for n in range(4):
            send(redis_url, unique_queue, n, 0.0)
        wait_for(lambda: ledger.scard(f"{unique_queue}.lossy_done") == 4, timeout=30)
        pids = {int(v) for v in ledger.hvals(f"{unique_queue}.lossy")}
        assert pids == {first.proc.pid}  # run in the worker's own process, on its lane
        # Two durable acks_late tasks run 30 s, each beside a lossy one of 30 s: SIGKILL.
        for n in (10, 11):
            send(redis_url, unique_queue, n, 30.0)
        wait_for(lambda: {b"10", b"11"} <= set(ledger.hkeys(f"{unique_queue}.lossy")), 30)
        # Owned within RECEIVED_BEAT_S of the delivery (leases): then SIGKILL.
        owned = f"celery_ext.lease.owned:{first.hostname}:*"
        wait_for(lambda: any(ledger.scard(k) >= 2 for k in ledger.scan_iter(owned)))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        killed_at = time.monotonic()
        second = Worker(redis_url, unique_queue, "-P", "threads", dead_after=4)
        # The durable ones come back (leases: within dead_worker_after) and run again...
        wait_for(lambda: ledger.hget(f"{unique_queue}.durable", "10") == b"2", timeout=45)
        wait_for(lambda: ledger.hget(f"{unique_queue}.durable", "11") == b"2", timeout=45)
        assert time.monotonic() - killed_at <= 30
        # ...and publish their lossy ping anew; the killed worker's lossy runs are gone.
        assert second is not None
        pid = str(second.proc.pid).encode()
        wait_for(lambda: ledger.hget(f"{unique_queue}.lossy", "10") == pid)
        assert not {b"10", b"11"} & ledger.smembers(f"{unique_queue}.lossy_done")
    finally:
        for worker in (first, second):
            if worker is not None:
                stop(worker)
        for key in ledger.scan_iter("celery_ext.lease.*"):
            if any(w is not None and w.hostname in key.decode() for w in (first, second)):
                ledger.delete(key)
        with Connection(redis_url) as conn:
            conn.default_channel.queue_delete(unique_queue)


def test_prefork_is_refused_with_a_reason(redis_url: str, unique_queue: str) -> None:
    worker = Worker(redis_url, unique_queue, "-P", "prefork")
    try:
        worker.proc.wait(60)
        err = worker.stderr()
    finally:
        stop(worker)
    # One line, not Celery's 50-line traceback of a bootstep's ImproperlyConfigured.
    assert worker.proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "the task dur.ping is durable=False" in errors[0], err
    assert "-P threads, -P solo or -P gevent" in errors[0], err


def test_a_lossy_tasks_retries_stay_on_the_lane(app: Celery) -> None:
    calls: list[int] = []

    @app.task(shared=False, name=f"d.flaky.{uuid.uuid4().hex[:6]}", durable=False)
    @celery_ext.retry(on=ConnectionError, attempts=5, wait=celery_ext.fixed(0.1))
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    with LocalWorker(app):  # no broker worker: a retry sent to the broker would never run
        assert flaky.delay().get(timeout=20) == "ok"
    assert len(calls) == 3
    assert depth(app, app.conf.task_default_queue) == 0


@pytest.mark.parametrize("pool", ["solo", "gevent"])
def test_lossy_tasks_run_in_the_workers_process_on_other_pools(
    redis_url: str, unique_queue: str, ledger: redis.Redis, pool: str
) -> None:
    worker = Worker(redis_url, unique_queue, "-P", pool)
    try:
        for n in range(4):
            send(redis_url, unique_queue, n, 0.0)
        wait_for(lambda: ledger.scard(f"{unique_queue}.lossy_done") == 4, timeout=30)
        assert {int(v) for v in ledger.hvals(f"{unique_queue}.lossy")} == {worker.proc.pid}
        worker.proc.terminate()
        assert worker.proc.wait(30) == 0
        assert "local lane stopped: 0 lossy message(s) dropped" in worker.stderr()
    finally:
        stop(worker)
        with Connection(redis_url) as conn:
            conn.default_channel.queue_delete(unique_queue)


def test_flower_shows_the_lossy_tasks_a_worker_ran_on_its_lane(
    redis_url: str, unique_queue: str, ledger: redis.Redis, tmp_path: Any
) -> None:
    from tests.test_flower import free_port, http_get, poll, service

    port = free_port()
    worker = Worker(redis_url, unique_queue, "-P", "threads", "-E")
    env = dict(worker.env, FLOWER_UNAUTHENTICATED_API="true")
    flower_cmd = [
        sys.executable, "-m", "celery", "-A", "tests.apps.durability_app", "flower",
        "--address=127.0.0.1", f"--port={port}",
    ]  # fmt: skip
    try:
        with service("flower", flower_cmd, env, tmp_path / "flower.log", 10) as flower:
            base = f"http://127.0.0.1:{port}"
            poll("flower up", lambda: http_get(base + "/healthcheck") == (200, "OK"), 60, flower)
            warmups = iter(range(100, 10_000))
            last_sent = [0.0]

            def lossy_seen(expected: set[str]) -> dict[str, Any] | None:
                reply = http_get(base + "/api/tasks?taskname=dur.ping")
                if reply is None or reply[0] != 200:
                    return None
                tasks: dict[str, Any] = json.loads(reply[1])
                done = {
                    k: v
                    for k, v in tasks.items()
                    if v.get("state") == "SUCCESS" and (not expected or v.get("args") in expected)
                }
                return done if len(done) >= max(1, len(expected)) else None

            def flower_listening() -> bool:
                # Events are pub/sub: Flower sees only those sent after it subscribed,
                # which can be a while after its HTTP server answers on a busy machine.
                if lossy_seen(set()):
                    return True
                if time.monotonic() - last_sent[0] > 1.0:
                    send(redis_url, unique_queue, next(warmups), 0.0)
                    last_sent[0] = time.monotonic()
                return False

            poll("Flower receiving task events", flower_listening, 60, flower)
            for n in range(3):
                send(redis_url, unique_queue, n, 0.0)
            wait_for(lambda: {b"0", b"1", b"2"} <= ledger.smembers(f"{unique_queue}.lossy_done"))
            expected = {f"({n}, 0.0)" for n in range(3)}
            seen = poll("lossy tasks in Flower", lambda: lossy_seen(expected), 30, flower)
            assert sorted(t["args"] for t in seen.values()) == sorted(expected)
    finally:
        stop(worker)
        with Connection(redis_url) as conn:
            conn.default_channel.queue_delete(unique_queue)


# -- the lane's stop never reaches the broker --------------------------------------------------
@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_sigterm_hands_durable_work_back_and_drops_only_lane_messages(
    app: Celery, redis_url: str, unique_queue: str, ledger: redis.Redis, pool: str
) -> None:
    # An app with one durable=False task: its worker runs a lane worker beside the broker
    # consumer, and stopping that lane once dropped the *broker* queue of the same name
    # (36 of 40 durable tasks gone on SIGTERM). Now the broker keeps every one. And the
    # lane used to stop at the SIGTERM itself (Celery's process-wide shutdown flag): the
    # lossy follow-ups the draining tasks publish as they end were dropped; now they run.
    broker = app.conf.broker_url
    concurrency = 4 if pool == "threads" else 1
    worker = Worker(
        redis_url, unique_queue, "-P", pool, "-c", str(concurrency), "--drain-timeout", "30",
        broker=broker,
    )  # fmt: skip
    try:
        wait_for(lambda: app.control.ping(destination=[worker.hostname], timeout=0.5), 30)
        for n in range(40):
            app.send_task("dur.fan_late", (n, 1.5), queue=unique_queue)
        wait_for(lambda: ledger.hlen(f"{unique_queue}.durable") == concurrency)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0
        started = {int(n) for n in ledger.hkeys(f"{unique_queue}.durable")}
        assert len(started) == concurrency, started
        assert {int(n) for n in ledger.smembers(f"{unique_queue}.durable_done")} == started
        assert {int(n) for n in ledger.smembers(f"{unique_queue}.lossy_done")} == started
        wait_for(lambda: depth(app, unique_queue) == 40 - concurrency, timeout=15)
        assert "local lane stopped: 0 lossy message(s) dropped" in worker.stderr()
    finally:
        stop(worker)


def test_a_web_process_lane_worker_stop_leaves_the_broker_queue_alone(app: Celery) -> None:
    @app.task(shared=False, name=f"d.lossy.{uuid.uuid4().hex[:6]}", durable=False)
    def lossy() -> None: ...

    @app.task(shared=False, name=f"d.durable.{uuid.uuid4().hex[:6]}")
    def durable() -> None: ...

    queue = app.conf.task_default_queue
    for _ in range(10):
        durable.delay()  # waiting on the broker for the cluster's workers
    worker = LocalWorker(app, queues=[queue]).start()  # the web process's lane worker
    lane = worker.lane
    release = threading.Event()

    @app.task(shared=False, name=f"d.blocker.{uuid.uuid4().hex[:6]}", durable=False)
    def blocker() -> None:
        release.wait(5)

    for _ in range(4):  # fill the lane's threads ...
        blocker.delay()
    wait_for(lambda: lane.depth(queue) == 0)
    for _ in range(3):  # ... so these lossy ones are still queued at the stop
        lossy.delay()
    report = worker.stop(timeout=0.2)
    release.set()
    assert report.dropped == 3, report
    assert depth(app, queue) == 10  # the broker queue of the same name is untouched


# -- a lossy publish with nobody to run it is never silent -------------------------------------
_SCRIPT = """
import logging, sys
from celery import Celery
import celery_ext

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
app = Celery("script", broker=sys.argv[1], set_as_current=False)
app.conf.task_default_queue = sys.argv[2]
celery_ext.install(app)

@app.task(name="script.warm", durable=False)
def warm(n):
    pass

for n in range(3):
    warm.delay(n)
print("published", flush=True)
"""


def test_a_lossy_publish_with_no_lane_worker_warns_once_and_counts_the_loss_at_exit(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"d.lossy.{uuid.uuid4().hex[:6]}"

    @app.task(shared=False, name=name, durable=False)
    def lossy() -> None: ...

    with caplog.at_level("WARNING", logger="celery_ext.lane"):
        lossy.delay()
        lossy.delay()
    warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "no worker consumes it" in warnings[0] and "LocalWorker(app)" in warnings[0]

    # A script (or a web process) that exits with lossy tasks never run: one line counts them.
    queue = app.conf.task_default_queue
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, app.conf.broker_url, queue],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "published" in done.stdout, done.stderr
    assert done.stderr.count("no worker consumes it") == 1, done.stderr
    assert "3 message(s) lost as the process exits: script.warm x3" in done.stderr
    assert depth(app, queue) == 0  # nothing went to the broker


def test_a_lossy_publish_with_a_lane_worker_is_quiet(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(shared=False, name=f"d.lossy.{uuid.uuid4().hex[:6]}", durable=False)
    def lossy() -> int:
        return 1

    with caplog.at_level("WARNING", logger="celery_ext.lane"), LocalWorker(app):
        assert lossy.delay().get(timeout=20) == 1
    assert not [r for r in caplog.records if "no worker consumes it" in r.getMessage()]


def test_a_sigterm_while_the_broker_is_down_at_start_stops_cleanly(
    redis_url: str, unique_queue: str
) -> None:
    # The lane worker starts before the broker consumer, and its event dispatcher
    # connects to the broker. A SIGTERM while that connection retried ended the lane
    # worker's start; the worker waited 30 s for it, then died ("Unrecoverable error").
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"  # nothing listens there
    worker = Worker(redis_url, unique_queue, "-P", "threads", broker=down)
    try:
        wait_for(lambda: "Cannot connect to redis" in worker.stderr(), timeout=30)
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(20) == 0, worker.stderr()
        assert time.monotonic() - started < 10.0
        assert "Unrecoverable error" not in worker.stderr()
    finally:
        stop(worker)
