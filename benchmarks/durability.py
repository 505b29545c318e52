"""Lossy (``durable=False``, local lane) vs durable (Redis/RabbitMQ) tasks of one app.

One process, one app on the broker: ``--n`` no-op tasks are published and run, first as
durable tasks through the broker (Celery's embedded worker, threads pool, ``-c 4``), then
as ``durable=False`` tasks through this process's lane (``LocalWorker``, threads, 4).
Prints tasks/s end to end (publish included), publish-only calls/s and the ratio.

Run::

    .venv/bin/python benchmarks/durability.py             # Redis, 2,000 tasks
    .venv/bin/python benchmarks/durability.py --broker amqp

Uses Redis db 12 and a unique queue name, deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from celery import Celery
from celery.contrib.testing.worker import start_worker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import celery_ext  # noqa: E402
from benchmarks._cleanup import forget_redis_queue  # noqa: E402
from celery_ext import LocalWorker  # noqa: E402

BROKERS = {"redis": "redis://127.0.0.1:6379/12", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    queue = f"durability.bench.{uuid.uuid4().hex[:8]}"
    app = Celery("durability_bench", broker=BROKERS[args.broker], set_as_current=False)
    app.conf.update(
        task_default_queue=queue, task_ignore_result=True, worker_hijack_root_logger=False
    )
    if args.broker == "amqp":
        # With heartbeats the embedded worker's stop can outlast start_worker's 10 s timeout.
        app.conf.broker_heartbeat = 0
    celery_ext.install(app, lane_max_queued=args.n + 10)
    done = {"n": 0}
    lock = threading.Lock()
    finished = threading.Event()

    def count() -> None:
        with lock:
            done["n"] += 1
            if done["n"] == args.n:
                finished.set()

    @app.task(name="bench.durable")
    def durable() -> None:
        count()

    @app.task(name="bench.lossy", durable=False)
    def lossy() -> None:
        count()

    rows = []
    try:
        for label, task, runner in (
            (
                f"durable ({args.broker})",
                durable,
                lambda: start_worker(
                    app, pool="threads", concurrency=4, perform_ping_check=False, queues=[queue]
                ),
            ),
            ("lossy (local lane)", lossy, lambda: LocalWorker(app, concurrency=4)),
        ):
            done["n"] = 0
            finished.clear()
            with runner():
                start = time.perf_counter()
                for _ in range(args.n):
                    task.delay()
                published = time.perf_counter() - start
                finished.wait(300)
                total = time.perf_counter() - start
            rows.append((label, args.n / total, args.n / published))
            print(
                f"{label:<22} {args.n / total:>8,.0f} tasks/s end to end  "
                f"{args.n / published:>8,.0f} publishes/s",
                flush=True,
            )
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            if conn.transport.driver_type == "amqp":
                conn.default_channel.exchange_delete(queue)
            else:
                forget_redis_queue(conn.default_channel.client, queue)
    print(
        f"\nlossy / durable, end to end: {rows[1][1] / rows[0][1]:.1f}x; "
        f"publish: {rows[1][2] / rows[0][2]:.1f}x ({args.n} no-op tasks, one process)"
    )
    if args.json:
        figures = [{"label": r[0], "tasks_per_s": r[1], "publish_per_s": r[2]} for r in rows]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"broker": args.broker, "n": args.n, "rows": figures}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
