"""Broker reconnect on RabbitMQ, threads pool: stock Celery vs celery_ext, side by side.

After a connection restart Celery lowers the prefetch count while tasks still run and
raises it again from each ack's callback with a synchronous ``basic.qos``. On the
threads pool that callback runs in a pool thread, which then reads the connection the
consumer loop is reading; when the two interleave, frames are torn
(``UnexpectedFrame``) and the worker stalls. celery_ext leaves the ``basic.qos`` to
the consumer loop.

Each round runs in its own process: an embedded worker (threads pool, concurrency 4)
behind a TCP proxy to RabbitMQ gets ``--tasks`` ``acks_late`` tasks of 50 ms; once 20
are done the proxy resets every connection. ``finish_s`` is the time from the cut
until all tasks are done; a round that does not finish within ``--deadline`` seconds
counts as stalled.

Run::

    .venv/bin/python benchmarks/reconnect.py              # 6 rounds per side, ~2-4 min
    .venv/bin/python benchmarks/reconnect.py --rounds 2

Uses unique queue names on the shared RabbitMQ, deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
SIDES = ("stock", "celery_ext")


def one_round(side: str, tasks: int, deadline_s: float) -> dict[str, Any]:
    """Run one round in this process; the caller exits right after (a stalled worker
    thread would keep it alive)."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker
    from kombu import Connection

    import celery_ext
    from tests.chaos.harness import AMQP, TcpProxy

    queue = f"celery_ext.bench.reconnect.{uuid.uuid4().hex[:8]}"
    done: set[int] = set()
    row: dict[str, Any] = {"side": side, "tasks": tasks}
    with TcpProxy(AMQP) as proxy:
        app = Celery("reconnect", broker=f"amqp://guest:guest@127.0.0.1:{proxy.port}//")
        app.conf.update(
            task_default_queue=queue,
            result_backend="cache+memory://",
            worker_hijack_root_logger=False,
            broker_heartbeat=0,
        )
        if side == "celery_ext":
            celery_ext.install(app)

        @app.task(shared=False, name="reconnect.slow", acks_late=True)
        def slow(n: int) -> None:
            time.sleep(0.05)
            done.add(n)

        try:
            for n in range(tasks):
                slow.delay(n)
            worker = start_worker(
                app, pool="threads", concurrency=4, perform_ping_check=False, queues=[queue]
            )
            worker.__enter__()
            while len(done) < 20:
                time.sleep(0.01)
            proxy.cut()
            cut_at = time.monotonic()
            while len(done) < tasks and time.monotonic() - cut_at < deadline_s:
                time.sleep(0.02)
            row["finish_s"] = round(time.monotonic() - cut_at, 2)
            row["done"] = len(done)
            row["stalled"] = len(done) < tasks
        finally:
            with Connection(AMQP_URL) as conn:
                conn.default_channel.queue_delete(queue)
                conn.default_channel.exchange_delete(queue)
    return row


def run(rounds: int, tasks: int, deadline_s: float) -> list[dict[str, Any]]:
    rows = []
    for n in range(rounds):
        for side in SIDES:
            out = subprocess.run(
                [sys.executable, __file__, "--one", side, "--tasks", str(tasks),
                 "--deadline", str(deadline_s)],
                capture_output=True, text=True, cwd=ROOT, timeout=deadline_s + 120,
            )  # fmt: skip
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                raise RuntimeError(f"round {n + 1} ({side}) failed:\n{out.stderr[-2000:]}")
            row = json.loads(lines[-1]) | {"round": n + 1}
            print(f"{side:10} round {n + 1}: {row}", flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| side | rounds | stalled rounds | median finish s | slowest finish s |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        if not mine:
            continue
        finish = [r["finish_s"] for r in mine]
        lines.append(
            f"| {side} | {len(mine)} | {sum(r['stalled'] for r in mine)} | "
            f"{statistics.median(finish):.1f} | {max(finish):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds after the cut")
    parser.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_round(args.one, args.tasks, args.deadline)), flush=True)
        os._exit(0)  # a stalled worker thread must not keep the round alive
    rows = run(args.rounds, args.tasks, args.deadline)
    print()
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
