"""Production broker setups: what Sentinel's replica acks and quorum queues cost, side by side.

One run, rounds interleaved, medians and per-round ratios against stock Celery:

- **Sentinel publish**: a test-owned Sentinel set (primary, replica, three
  sentinels; ``tests.chaos.harness.OwnSentinel``). N ``apply_async`` calls each on
  stock Celery (kombu's Sentinel transport), celery_ext without replica acks, and
  celery_ext with ``replica_acks=1`` (a ``WAIT`` per publish, one round trip).
- **Quorum publish**: the shared RabbitMQ, an app with
  ``task_default_queue_type="quorum"``: stock Celery, celery_ext unbounded, and
  celery_ext with a queue bound (``x-max-length`` + ``reject-publish``, a publisher
  confirm per message).
- **Quorum bound under concurrent producers**: a quorum queue bounded at ``BOUND``,
  ``PRODUCERS`` threads publishing until refused: the most messages the queue
  held (RabbitMQ applies a quorum queue's limit asynchronously: in-flight publishes
  overshoot it) against a classic queue under the same load.

Run::

    .venv/bin/python benchmarks/production.py            # 5 rounds of 2,000 publishes
    .venv/bin/python benchmarks/production.py --rounds 3 --tasks 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402
from kombu import Connection  # noqa: E402

import celery_ext  # noqa: E402
from tests.chaos.harness import OwnSentinel  # noqa: E402

AMQP = "amqp://guest:guest@127.0.0.1:5672//"
BOUND = 100
PRODUCERS = 6


def _app(url: str, queue: str, conf: dict[str, Any], ext: dict[str, Any] | None) -> Celery:
    app = Celery(f"prod_{uuid.uuid4().hex[:6]}", broker=url, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True, **conf)
    if ext is not None:
        celery_ext.install(app, **ext)
    return app


def _noop(n: int) -> None:
    """The benchmark's task (publishing only: no worker runs it)."""


def _rate(app: Celery, tasks: int) -> float:
    """Publishes per second of ``tasks`` ``apply_async`` calls (after a warm-up)."""
    noop = app.task(name="prod.noop", shared=False)(_noop)
    for n in range(20):
        noop.apply_async((n,))
    start = time.perf_counter()
    for n in range(tasks):
        noop.apply_async((n,))
    return tasks / (time.perf_counter() - start)


def _rounds(
    rounds: int,
    tasks: int,
    variants: dict[str, Callable[[str], Celery]],
    clean: Callable[[str], None],
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            queue = f"celery_ext.bench.prod.{uuid.uuid4().hex[:8]}"
            app = make(queue)
            try:
                rates[name].append(_rate(app, tasks))
            finally:
                app.close()
                clean(queue)
    return rates


def _table(title: str, rates: dict[str, list[float]]) -> str:
    stock = rates["stock"]
    lines = [
        f"\n### {title}",
        "",
        "| variant | publishes/s (median) | ratio to stock (per-round median) |",
    ]
    lines.append("|---|--:|--:|")
    for name, values in rates.items():
        ratios = [v / s for v, s in zip(values, stock, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(values):,.0f} | {statistics.median(ratios):.2f}x |"
        )
    return "\n".join(lines)


def sentinel_publish(rounds: int, tasks: int) -> str:
    with OwnSentinel() as sentinel:
        conf = {"broker_transport_options": {"master_name": sentinel.name}}

        def clean(queue: str) -> None:
            sentinel.client().delete(queue)

        variants: dict[str, Callable[[str], Celery]] = {
            "stock": lambda q: _app(sentinel.url, q, conf, None),
            "celery_ext": lambda q: _app(sentinel.url, q, conf, {}),
            "celery_ext replica_acks=1": lambda q: _app(sentinel.url, q, conf, {"replica_acks": 1}),
        }
        return _table("Sentinel publish (apply_async)", _rounds(rounds, tasks, variants, clean))


def quorum_publish(rounds: int, tasks: int) -> str:
    conf = {"task_default_queue_type": "quorum"}

    def clean(queue: str) -> None:
        with Connection(AMQP) as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)

    variants: dict[str, Callable[[str], Celery]] = {
        "stock": lambda q: _app(AMQP, q, conf, None),
        "celery_ext": lambda q: _app(AMQP, q, conf, {}),
        "celery_ext bounded": lambda q: _app(AMQP, q, conf, {"queue_limits": {q: 10 * tasks}}),
    }
    return _table("RabbitMQ quorum publish (apply_async)", _rounds(rounds, tasks, variants, clean))


def quorum_overshoot(rounds: int) -> str:
    lines = [
        f"\n### A bound of {BOUND} under {PRODUCERS} concurrent producers (most messages held)",
        "",
        "| queue type | rounds | max held (median) | max held (worst) |",
        "|---|--:|--:|--:|",
    ]
    for kind in ("classic", "quorum"):
        peaks = []
        for _ in range(rounds):
            queue = f"celery_ext.bench.prod.{uuid.uuid4().hex[:8]}"
            conf = {"task_default_queue_type": kind}
            ext = {"queue_limits": {queue: BOUND}}
            apps = [_app(AMQP, queue, conf, ext) for _ in range(PRODUCERS)]
            apps[0].connection_for_write().ensure_connection()

            def produce(app: Celery) -> None:
                noop = app.task(name="prod.noop", shared=False)(_noop)
                try:
                    for n in range(10 * BOUND):
                        noop.apply_async((n,))
                except celery_ext.QueueFull:
                    pass

            threads = [threading.Thread(target=produce, args=(app,)) for app in apps]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            with Connection(AMQP) as conn:
                peaks.append(conn.default_channel.queue_declare(queue, passive=True).message_count)
                conn.default_channel.queue_delete(queue)
                conn.default_channel.exchange_delete(queue)
            for app in apps:
                app.close()
        lines.append(f"| {kind} | {rounds} | {statistics.median(peaks):.0f} | {max(peaks)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    before = os.getloadavg()[0]
    tables = [
        sentinel_publish(args.rounds, args.tasks),
        quorum_publish(args.rounds, args.tasks),
        quorum_overshoot(args.rounds),
    ]
    load = f"load average (1 min) before / after: {before:.2f} / {os.getloadavg()[0]:.2f}"
    for table in tables:
        print(table)
    print(f"\n{load}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"rounds": args.rounds, "tasks": args.tasks, "tables": tables, "load": load}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
