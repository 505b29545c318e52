"""ETA flood: far-future countdown tasks must not eat worker RAM nor starve ready work.

For each variant (stock Celery; stock with ``worker_eta_task_limit=1000``; celery_ext),
one run against one broker:

1. start ``celery worker -P threads -c 4`` (a subprocess, app in ``benchmarks/flood_app.py``);
2. enqueue ``--eta`` tasks with ``countdown=3600``;
3. enqueue ``--ready`` tasks at ``--rate`` per second, each carrying its enqueue time;
4. sample the worker's RSS (``/proc``) and the messages it holds
   (published - waiting in the broker - parked - finished) every 0.5 s;
5. report peak RSS, peak held, and ready-task latency p50/p99 (enqueue -> start), or how
   many ready tasks never started within ``--timeout`` seconds (starvation).

Run::

    .venv/bin/python benchmarks/eta_flood.py --broker redis      # 100,000 ETA + 1,000 ready
    .venv/bin/python benchmarks/eta_flood.py --broker amqp --quick

Targets for celery_ext: peak RSS <= 150 MB and flat, ready p99 < 1 s, on both brokers.
Uses Redis db 12 (and unique queue names); cleans up its keys and queues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._cleanup import forget_redis_queue  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REDIS = "redis://127.0.0.1:6379/12"
BROKERS = {"redis": REDIS, "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
VARIANTS = ("stock", "stock-eta-limit", "celery_ext")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def waiting(conn: Connection, queue: str) -> int:
    """Messages ready in the broker (not delivered to any worker)."""
    if conn.transport.driver_type == "redis":
        return int(conn.default_channel.client.llen(queue))
    return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def parked(conn: Connection, queue: str, prefix: str) -> int:
    if conn.transport.driver_type == "redis":
        from celery_ext.transports.redis import RedisParking

        return RedisParking(conn.default_channel).parked(queue)
    try:
        from celery_ext.transports.amqp import AmqpParking
    except ImportError:
        return 0
    return int(AmqpParking(conn.default_channel, prefix=prefix).parked(queue))


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    queue = f"flood.{variant}.{uuid.uuid4().hex[:6]}"
    broker = BROKERS[args.broker]
    prefix = f"flood_{uuid.uuid4().hex[:8]}"  # this run's own RabbitMQ delay queues
    env = dict(os.environ, FLOOD_BROKER=broker, FLOOD_QUEUE=queue, FLOOD_VARIANT=variant)
    env["FLOOD_PARK_PREFIX"] = prefix
    env["FLOOD_RESULTS"] = REDIS
    results = redis.Redis.from_url(REDIS)
    app = Celery("flood-producer", broker=broker, set_as_current=False)
    app.conf.task_default_queue = queue
    if variant == "celery_ext":
        import celery_ext

        celery_ext.install(app, park_prefix=prefix)  # producers park far ETAs themselves
    name = f"flood-{variant}-{uuid.uuid4().hex[:4]}@localhost"
    cmd = [
        *(sys.executable, "-m", "celery", "-A", "benchmarks.flood_app", "worker"),
        *("-P", "threads", "-c", "4", "-Q", queue, "-n", name),
        *("--without-mingle", "--without-gossip", "-l", "ERROR"),
    ]
    worker = subprocess.Popen(cmd, env=env, cwd=ROOT)
    samples: list[tuple[float, float, int]] = []
    stop = threading.Event()
    published = [0]
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[name], timeout=0.5):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"{variant}: worker did not start")
        with Connection(broker) as conn:

            def sample() -> None:
                while not stop.is_set():
                    done = int(results.llen(f"{queue}.latency"))
                    held = published[0] - waiting(conn, queue) - parked(conn, queue, prefix) - done
                    samples.append((time.monotonic(), rss_mb(worker.pid), max(0, held)))
                    stop.wait(0.5)

            with app.connection_for_write() as pconn, app.producer_or_acquire() as producer:
                pconn.default_channel.queue_declare(queue, durable=True, auto_delete=False)
                t0 = time.monotonic()
                for _ in range(args.eta):
                    app.send_task("flood.later", countdown=3600, producer=producer)
                    published[0] += 1
                flood_s = time.monotonic() - t0
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                interval = 1.0 / args.rate
                next_at = time.monotonic()
                for _ in range(args.ready):
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))
                    app.send_task("flood.ready", (time.time(),), producer=producer)
                    published[0] += 1
            end = time.monotonic() + args.timeout
            while results.llen(f"{queue}.latency") < args.ready and time.monotonic() < end:
                time.sleep(0.2)
            stop.set()
            sampler.join(5)
        lat = sorted(float(x) for x in results.lrange(f"{queue}.latency", 0, -1))
        rss = [s[1] for s in samples]
        return {
            "variant": variant,
            "eta_tasks": args.eta,
            "flood_enqueue_s": round(flood_s, 1),
            "ready_started": len(lat),
            "ready_total": args.ready,
            "p50_s": statistics.median(lat) if lat else None,
            "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else None,
            "peak_rss_mb": round(max(rss), 1) if rss else None,
            "end_rss_mb": round(rss[-1], 1) if rss else None,
            "peak_held": max(s[2] for s in samples) if samples else None,
        }
    finally:
        stop.set()
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        with Connection(broker) as conn:
            channel = conn.default_channel
            if conn.transport.driver_type == "redis":
                channel.client.delete(queue, f"celery_ext.parked:{queue}")
                channel.client.hdel("celery_ext.parked", f"celery_ext.parked:{queue}")
                forget_redis_queue(channel.client, queue, [name])
            else:
                channel.queue_delete(queue)
                channel.exchange_delete(queue)
                # Parked messages would wait an hour on the shared server: drop ours.
                from celery_ext.transports.amqp import AmqpParking

                AmqpParking(channel, prefix=prefix).delete()
        results.delete(f"{queue}.latency")


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| variant | ETA tasks | ready started | p50 (s) | p99 (s) | peak RSS (MB) | peak held |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        out.append(
            f"| {r['variant']} | {r['eta_tasks']:,} | {r['ready_started']}/{r['ready_total']} | "
            f"{fmt(r['p50_s'], '.3f')} | {fmt(r['p99_s'], '.3f')} | {fmt(r['peak_rss_mb'], '.0f')} "
            f"| {fmt(r['peak_held'], ',')} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), default="redis")
    parser.add_argument("--eta", type=int, default=100_000, help="countdown=3600 tasks")
    parser.add_argument("--ready", type=int, default=1000, help="ready tasks after the flood")
    parser.add_argument("--rate", type=float, default=100.0, help="ready tasks per second")
    parser.add_argument("--timeout", type=float, default=30.0, help="wait for ready tasks (s)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="10,000 ETA + 200 ready")
    parser.add_argument("--json", type=Path, help="results file (default: results/)")
    args = parser.parse_args()
    if args.quick:
        args.eta, args.ready = 10_000, 200
    rows = [run_variant(args, v) for v in args.variants.split(",")]
    out = args.json or RESULTS / f"eta_flood_{args.broker}.json"
    config = {k: v for k, v in vars(args).items() if k != "json"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    print(f"broker: {args.broker}\n\n{table(rows)}\n\nwrote {out}")


if __name__ == "__main__":
    main()
