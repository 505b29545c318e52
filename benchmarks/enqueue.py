"""Publishing throughput: a stock ``apply_async`` loop vs ``celery_ext.enqueue_many``.

What it measures (one process, one run, publishing only, no worker), per broker:

- **stock apply_async**: a plain Celery app (no celery_ext), N calls of
  ``task.apply_async((i,))`` in a loop.
- **bounded apply_async**: the same loop on an app with ``celery_ext.install`` and
  ``queue_limits`` set (Redis: one Lua check-and-push per message; RabbitMQ:
  ``x-max-length`` and a publisher confirm per message): what a bound costs per call.
- **enqueue_many**: ``celery_ext.enqueue_many(task, ((i,) for i in range(N)))`` on that
  bounded app (chunks of 500; Redis: one Lua call per chunk, RabbitMQ: one confirm
  round per chunk). The bound (10 x N) is high enough never to trigger.

Every variant publishes to a fresh queue after a few untimed warm-up messages
(connection, declaration); the queues are deleted at the end (Redis: the keys
named after the unique queue: its lists and kombu's bindings). Messages are
``ignore_result`` no-ops with one int argument.

Run::

    .venv/bin/python benchmarks/enqueue.py                  # N=20000, Redis and RabbitMQ
    .venv/bin/python benchmarks/enqueue.py --quick          # N=2000 smoke run
    .venv/bin/python benchmarks/enqueue.py --brokers redis --redis-url redis://127.0.0.1:6379/11

Results go to ``benchmarks/results/enqueue.json`` and a markdown table on stdout.
Target: enqueue_many >= 5x the stock ``apply_async`` loop on Redis. On a small,
shared machine expect +-20 % run to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celery
import kombu
import redis
from celery import Celery
from kombu import Connection

import celery_ext

RESULTS = Path(__file__).resolve().parent / "results" / "enqueue.json"
WARMUP = 20
URLS = {"redis": "redis://127.0.0.1:6379/11", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}


def make_app(url: str, queue: str, bound: int | None) -> tuple[Celery, Any]:
    app = Celery(f"bench_{queue[-8:]}", broker=url, set_as_current=False)
    app.conf.task_default_queue = queue
    if bound is not None:
        celery_ext.install(app, queue_limits={queue: bound})

    @app.task(name=f"bench.noop.{queue[-8:]}", ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def noop(i: int) -> None:
        pass

    return app, noop


def run(url: str, n: int, variant: str, queues: list[str]) -> float:
    """Publish ``n`` messages one way; return messages/s."""
    queue = f"celery_ext.bench.{uuid.uuid4().hex[:8]}"
    queues.append(queue)
    app, noop = make_app(url, queue, None if variant == "stock" else 10 * n)
    send: Callable[[range], object]
    if variant == "enqueue_many":

        def send(rng: range) -> object:
            return celery_ext.enqueue_many(noop, ((i,) for i in rng), chunk=500)
    else:

        def send(rng: range) -> object:
            for i in rng:
                noop.apply_async((i,))
            return None

    try:
        send(range(WARMUP))
        start = time.perf_counter()
        send(range(n))
        elapsed = time.perf_counter() - start
        # Unconfirmed AMQP publishes may still be in flight: poll, outside the timing.
        deadline, depth = time.monotonic() + 30, -1
        while depth != n + WARMUP and time.monotonic() < deadline:
            with app.connection_for_write() as conn:
                depth = conn.default_channel.queue_declare(queue, passive=True).message_count
        assert depth == n + WARMUP, f"{variant}: {depth} queued, expected {n + WARMUP}"
        return n / elapsed
    finally:
        app.close()


def cleanup(broker: str, url: str, queues: list[str]) -> None:
    if broker == "redis":
        client = redis.Redis.from_url(url)
        for queue in queues:  # its lists (every priority) and kombu's binding keys
            for key in client.scan_iter(match=f"*{queue}*"):
                client.delete(key)
        return
    with Connection(url) as conn:
        for queue in queues:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)  # Celery's, named after the queue


def table(res: dict[str, Any]) -> str:
    lines = [
        f"N = {res['config']['n']:,} messages per variant, publishing only",
        "",
        "| broker | stock apply_async | bounded apply_async | enqueue_many "
        "| enqueue_many / stock |",
        "| --- | --: | --: | --: | --: |",
    ]
    for broker, row in res["brokers"].items():
        lines.append(
            f"| {broker} | {row['stock']:,.0f}/s | {row['bounded_apply_async']:,.0f}/s "
            f"| {row['enqueue_many']:,.0f}/s | {row['ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=20_000, help="messages per variant")
    parser.add_argument("--quick", action="store_true", help="N=2000 for a smoke run")
    parser.add_argument("--brokers", nargs="+", choices=sorted(URLS), default=["redis", "amqp"])
    parser.add_argument("--redis-url", default=URLS["redis"])
    parser.add_argument("--amqp-url", default=URLS["amqp"])
    parser.add_argument("--out", "--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = 2000 if args.quick else args.messages
    logging.basicConfig(level=logging.WARNING)
    res: dict[str, Any] = {
        "config": {"n": n, "chunk": 500, "quick": args.quick, "brokers": args.brokers},
        "env": {
            "python": platform.python_version(),
            "celery": celery.__version__,
            "kombu": kombu.__version__,
            "machine": platform.machine(),
        },
        "brokers": {},
    }
    for broker in args.brokers:
        url = args.redis_url if broker == "redis" else args.amqp_url
        queues: list[str] = []
        try:
            row = {v: run(url, n, v, queues) for v in ("stock", "bounded", "enqueue_many")}
        finally:
            cleanup(broker, url, queues)
        res["brokers"][broker] = {
            "stock": row["stock"],
            "bounded_apply_async": row["bounded"],
            "enqueue_many": row["enqueue_many"],
            "ratio": row["enqueue_many"] / row["stock"],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
