"""Warm shutdown and dead-worker recovery, stock Celery vs celery_ext, side by side.

For each broker (Redis, RabbitMQ), pool (threads, prefork) and variant, one `celery
worker -c 2` subprocess gets 2 tasks of ``--slow`` seconds and 6 quick ones (held
behind them), then SIGTERM once the slow pair runs. Measured from the signal:

- ``back_s``: until the 6 held messages are visible in the broker again;
- ``exit_s``: until the process exits (the slow pair had ``--slow`` - ~0.5 s left);
- whether anything ran twice or got lost (a second worker finishes the rest).

Then, per broker and variant, ``--busy-rounds`` SIGTERMs to a busy prefork worker
(``-c 8``, 1 ms tasks, 100 a round): stock Celery's flush forgets a job already written
to a child that has not acknowledged it yet; the child runs it, the message is never
acked (the task runs again later) and the child waits 30 s before exiting. Reported:
the slowest exit, and how many tasks ran twice once a last worker has run the rest.

Then, on Redis: a worker holding 2 running ``acks_late`` tasks and 3 prefetched ones is
SIGKILLed beside a live second worker; ``recover_s`` is the time until the killed
worker's messages run again (stock: only after ``visibility_timeout``, 1 h by default;
the run gives up after ``--recover-wait`` seconds).

Run::

    .venv/bin/python benchmarks/drain.py              # all of it, ~8 min (stock's 30 s exits)
    .venv/bin/python benchmarks/drain.py --quick      # Redis, threads (busy rounds too)

Uses Redis db 12 and unique queue names, deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._cleanup import forget_redis_queue  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REDIS = "redis://127.0.0.1:6379/12"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


class Worker:
    def __init__(
        self, broker: str, queue: str, variant: str, pool: str, concurrency: int = 2
    ) -> None:
        self.broker, self.queue = broker, queue
        env = dict(
            os.environ,
            DRAIN_BROKER=broker,
            DRAIN_QUEUE=queue,
            DRAIN_VARIANT=variant,
            DRAIN_LEDGER=REDIS,
        )
        self.hostname = f"drainb-{uuid.uuid4().hex[:6]}@localhost"
        cmd = [
            sys.executable, "-m", "celery", "-A", "benchmarks.drain_app", "worker",
            "-P", pool, "-c", str(concurrency), "-n", self.hostname, "-Q", queue,
            "--without-mingle", "--without-gossip", "-l", "ERROR",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )


def depth(broker: str, queue: str) -> int:
    with Connection(broker) as conn:
        if conn.transport.driver_type == "redis":
            return int(conn.default_channel.client.llen(queue))
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def wait(check: Any, timeout: float, step: float = 0.02) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    return None


def send(broker: str, queue: str, n: int, seconds: float) -> None:
    from celery import Celery

    app = Celery("drain_bench_client", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue)
    app.send_task("bench.work", (n, seconds))


def cleanup(broker: str, queue: str, ledger: redis.Redis, *workers: Worker) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)
    for key in ledger.scan_iter(f"{queue}.*"):
        ledger.delete(key)
    for key in ledger.scan_iter("celery_ext.lease.*"):
        if any(w.hostname in key.decode() for w in workers):
            ledger.delete(key)
    with Connection(broker) as conn:
        conn.default_channel.queue_delete(queue)
        if conn.transport.driver_type == "amqp":
            conn.default_channel.exchange_delete(queue)
        else:
            forget_redis_queue(conn.default_channel.client, queue, [w.hostname for w in workers])


def sigterm_run(broker: str, pool: str, variant: str, slow: float) -> dict[str, Any]:
    queue = f"drain.bench.{uuid.uuid4().hex[:8]}"
    ledger = redis.Redis.from_url(REDIS)
    first = Worker(broker, queue, variant, pool)
    second: Worker | None = None
    try:
        time.sleep(0.5)
        send(broker, queue, 0, slow)
        send(broker, queue, 1, slow)
        for n in range(2, 8):
            send(broker, queue, n, 0.01)
        runs = lambda: ledger.hgetall(f"{queue}.runs")  # noqa: E731
        if wait(lambda: len(runs()) == 2 and depth(broker, queue) == 0, 60) is None:
            raise RuntimeError("the slow pair never started")
        first.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        back = wait(lambda: depth(broker, queue) >= 6 or first.proc.poll() is not None, 60)
        back_s = back if depth(broker, queue) >= 6 or back is None else None
        first.proc.wait(120)
        exit_s = time.monotonic() - start
        if back_s is None and depth(broker, queue) >= 6:
            back_s = exit_s  # handed back only as the connection closed
        second = Worker(broker, queue, variant, pool)
        wait(lambda: len(ledger.smembers(f"{queue}.finished")) == 8, 60)
        counts = {int(k): int(v) for k, v in runs().items()}
        return {
            "broker": broker.split(":")[0],
            "pool": pool,
            "variant": variant,
            "back_s": back_s,
            "exit_s": exit_s,
            "in_flight_left_s": slow,
            "lost": 8 - len(ledger.smembers(f"{queue}.finished")),
            "twice": sum(1 for v in counts.values() if v > 1),
        }
    finally:
        cleanup(broker, queue, ledger, first, *([second] if second else []))


def busy_run(broker: str, variant: str, rounds: int) -> dict[str, Any]:
    queue = f"drain.bench.{uuid.uuid4().hex[:8]}"
    ledger = redis.Redis.from_url(REDIS)
    workers: list[Worker] = []
    finished = lambda: len(ledger.smembers(f"{queue}.finished"))  # noqa: E731
    try:
        exits, total = [], 0
        for _ in range(rounds):
            workers.append(Worker(broker, queue, variant, "prefork", concurrency=8))
            time.sleep(0.5)
            for n in range(total, total + 100):
                send(broker, queue, n, 0.001)
            total += 100
            if wait(lambda goal=total - 80: finished() >= goal, 60) is None:
                raise RuntimeError("the busy worker did not run its tasks")
            workers[-1].proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            workers[-1].proc.wait(120)
            exits.append(time.monotonic() - start)
        workers.append(Worker(broker, queue, variant, "prefork", concurrency=8))
        wait(lambda: finished() == total, 60)
        runs = [int(v) for v in ledger.hgetall(f"{queue}.runs").values()]
        return {
            "broker": broker.split(":")[0],
            "variant": variant,
            "busy_rounds": rounds,
            "tasks": total,
            "slowest_exit_s": max(exits),
            "exits_over_10s": sum(1 for x in exits if x > 10),
            "lost": total - finished(),
            "twice": sum(1 for v in runs if v > 1),
        }
    finally:
        cleanup(broker, queue, ledger, *workers)


def sigkill_run(variant: str, recover_wait: float) -> dict[str, Any]:
    queue = f"drain.bench.{uuid.uuid4().hex[:8]}"
    ledger = redis.Redis.from_url(REDIS)
    doomed = Worker(REDIS, queue, variant, "threads")
    survivor: Worker | None = None
    try:
        time.sleep(0.5)
        for n in range(2):
            send(REDIS, queue, n, 60.0)
        for n in range(2, 5):
            send(REDIS, queue, n, 0.01)
        runs = lambda: {int(k): int(v) for k, v in ledger.hgetall(f"{queue}.runs").items()}  # noqa: E731
        wait(lambda: len(runs()) == 2 and depth(REDIS, queue) == 0, 60)
        survivor = Worker(REDIS, queue, variant, "threads")
        time.sleep(7)  # the survivor is up, and has beaten at least once
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        recover_s = wait(lambda: runs().get(0) == 2 and runs().get(1) == 2, recover_wait, 0.1)
        return {"variant": variant, "recover_s": recover_s, "gave_up_after_s": recover_wait}
    finally:
        cleanup(REDIS, queue, ledger, doomed, *([survivor] if survivor else []))


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Redis and threads only")
    parser.add_argument("--slow", type=float, default=3.0, help="seconds of the running pair")
    parser.add_argument("--recover-wait", type=float, default=60.0)
    parser.add_argument("--busy-rounds", type=int, default=5, help="SIGTERMs to a busy worker")
    parser.add_argument("--json", type=Path, help="write the rows here (default: results/)")
    args = parser.parse_args()
    brokers = [REDIS] if args.quick else [REDIS, AMQP]
    pools = ["threads"] if args.quick else ["threads", "prefork"]
    rows = []
    print("broker  pool     variant     back_s  exit_s  lost  twice")
    for broker in brokers:
        for pool in pools:
            for variant in ("stock", "celery_ext"):
                row = sigterm_run(broker, pool, variant, args.slow)
                rows.append(row)
                print(
                    f"{row['broker']:<7} {pool:<8} {variant:<11} {fmt(row['back_s']):>6} "
                    f"{row['exit_s']:>7.2f} {row['lost']:>5} {row['twice']:>6}",
                    flush=True,
                )
    print(f"\nSIGTERM to a busy prefork worker (-c 8, 1 ms tasks), {args.busy_rounds} rounds")
    print("broker  variant     slowest_exit_s  exits>10s  lost  twice")
    for broker in brokers:
        for variant in ("stock", "celery_ext"):
            row = busy_run(broker, variant, args.busy_rounds)
            rows.append(row)
            print(
                f"{row['broker']:<7} {variant:<11} {row['slowest_exit_s']:>14.2f} "
                f"{row['exits_over_10s']:>10} {row['lost']:>5} {row['twice']:>6}",
                flush=True,
            )
    print(f"\nSIGKILL with a live second worker, Redis (gives up after {args.recover_wait:.0f} s)")
    for variant in ("stock", "celery_ext"):
        row = sigkill_run(variant, args.recover_wait)
        rows.append(row)
        print(f"{variant:<11} recovered after {fmt(row['recover_s'])} s", flush=True)
    out = args.json or RESULTS / f"drain-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"\n(slow pair: {args.slow} s; results in {shown})")


if __name__ == "__main__":
    main()
