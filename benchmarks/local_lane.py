"""Local lane vs stock ``memory://``: no-op tasks end to end through an embedded worker.

What it measures (one process, one run, same ``threads`` pool and concurrency for all):

- **End to end**: tasks/s from the first ``.delay()`` until the last task body has run, for
  N ``@app.task(ignore_result=True)`` no-ops published as fast as possible from the main thread.
  Variants: stock ``memory://`` with ``celery.contrib.testing.worker.start_worker`` at the default
  1 s polling interval (a small N: it manages ~16 tasks/s) and at ``polling_interval=0.001``, and
  celery_ext's ``local://`` lane with :class:`celery_ext.LocalWorker`. Each worker first runs a few
  warm-up tasks (connection, queue declaration) that are not timed.
- **Publish only**: N ``.delay()`` calls with no worker, for ``memory://`` and ``local://``.
- **Idle CPU**: ``time.process_time()`` over ``--idle-seconds`` of wall time with the worker up and
  no tasks, as % of one core (local lane, and stock ``memory://`` at 1 ms polling).
- **Latency**: publish -> task-start on an idle local-lane worker, one task at a time; p50/p99.

Run::

    .venv/bin/python benchmarks/local_lane.py              # N=5000, concurrency 4, 5 s idle
    .venv/bin/python benchmarks/local_lane.py --quick      # smoke run, a few seconds

Results go to ``benchmarks/results/local_lane.json`` and a markdown table on stdout.

Everything runs under one GIL, so end-to-end throughput is bounded by the sum of the publisher's,
the consumer's and the pool's CPU per task; on a small, shared machine expect +-20 % run to run.

Targets for the local lane: >= 5,000 tasks/s end to end with publishing included (aim 10,000);
idle CPU near zero; p99 publish -> start latency < 10 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import kombu
from celery import Celery
from celery.contrib.testing.worker import start_worker

import celery_ext

RESULTS = Path(__file__).resolve().parent / "results" / "local_lane.json"
WARMUP_TASKS = 20


class Tally:
    """Counts finished tasks; records the moment the expected one finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.expected = 0
        self.count = 0
        self.finished_at = 0.0

    def reset(self, expected: int) -> None:
        with self._lock:
            self.expected, self.count, self.finished_at = expected, 0, 0.0
            self._done.clear()

    def hit(self) -> None:
        with self._lock:
            self.count += 1
            if self.count == self.expected:
                self.finished_at = time.perf_counter()
                self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


@dataclass
class Bench:
    """One Celery app with its no-op task, latency task and counters."""

    label: str
    app: Celery
    local: bool
    tally: Tally = field(default_factory=Tally)
    latencies: list[float] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    noop: Any = None
    stamp: Any = None


def make_bench(label: str, main: str, *, local: bool, polling_s: float | None = None) -> Bench:
    app = Celery(main, broker="local://" if local else "memory://", set_as_current=False)
    app.conf.worker_hijack_root_logger = False
    app.conf.task_default_queue = f"q-{main}"  # memory:// queues are process-global
    if polling_s is not None:
        app.conf.broker_transport_options = {"polling_interval": polling_s}
    if local:
        celery_ext.install(app)
    bench = Bench(label, app, local)
    # Unique names and shared=False: a shared task with the same generated name would be
    # bound into every app finalized later, counting into the wrong app's tally.
    opts: dict[str, Any] = {"ignore_result": True, "shared": False}

    @app.task(name=f"{main}.noop", **opts)  # type: ignore[untyped-decorator]
    def noop() -> None:
        bench.tally.hit()

    @app.task(name=f"{main}.stamp", **opts)  # type: ignore[untyped-decorator]
    def stamp(sent: float) -> None:
        bench.latencies.append(time.perf_counter() - sent)
        bench.started.set()

    bench.noop, bench.stamp = noop, stamp
    return bench


def worker(bench: Bench, concurrency: int) -> AbstractContextManager[Any]:
    if bench.local:
        return celery_ext.LocalWorker(bench.app, concurrency=concurrency, loglevel="ERROR")
    stock: AbstractContextManager[Any] = start_worker(
        bench.app,
        pool="threads",
        concurrency=concurrency,
        perform_ping_check=False,
        loglevel="ERROR",
        shutdown_timeout=30.0,
    )
    return stock


def run_tasks(bench: Bench, n: int, deadline_s: float) -> float:
    """Publish ``n`` no-ops and wait for all of them; return tasks/s (publish included)."""
    bench.tally.reset(n)
    start = time.perf_counter()
    for _ in range(n):
        bench.noop.delay()
    if not bench.tally.wait(deadline_s):
        raise RuntimeError(f"{bench.label}: {bench.tally.count}/{n} tasks done in {deadline_s}s")
    return n / (bench.tally.finished_at - start)


def idle_cpu_pct(seconds: float) -> float:
    """Process CPU time over ``seconds`` of wall time, as % of one core."""
    time.sleep(0.5)  # let the previous run's bookkeeping settle
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return 100.0 * (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def latency_ms(bench: Bench, samples: int) -> dict[str, float]:
    """Publish -> task-start latency, one task in flight at a time."""
    bench.latencies.clear()
    for _ in range(samples):
        bench.started.clear()
        bench.stamp.delay(time.perf_counter())
        if not bench.started.wait(10.0):
            raise RuntimeError(f"{bench.label}: latency task did not start within 10 s")
    ms = sorted(x * 1000.0 for x in bench.latencies)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"p50_ms": statistics.median(ms), "p99_ms": p99, "max_ms": ms[-1], "samples": len(ms)}


def end_to_end(bench: Bench, n: int, args: argparse.Namespace, *, idle: bool) -> dict[str, Any]:
    deadline_s = 60.0 + n / 10.0
    result: dict[str, Any] = {"tasks": n}
    with worker(bench, args.concurrency):
        run_tasks(bench, min(WARMUP_TASKS, n), deadline_s)
        result["tasks_per_s"] = run_tasks(bench, n, deadline_s)
        if bench.local:
            result["latency"] = latency_ms(bench, args.latency_samples)
        if idle:
            result["idle_cpu_pct"] = idle_cpu_pct(args.idle_seconds)
    return result


def publish_only(bench: Bench, n: int) -> float:
    """Rate of ``n`` ``.delay()`` calls with no worker (queue purged afterwards)."""
    for _ in range(WARMUP_TASKS):
        bench.noop.delay()
    start = time.perf_counter()
    for _ in range(n):
        bench.noop.delay()
    rate = n / (time.perf_counter() - start)
    with bench.app.connection_for_write() as conn:
        conn.default_channel.queue_purge(bench.app.conf.task_default_queue)
    return rate


@contextmanager
def quiet() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def table(res: dict[str, Any]) -> str:
    e2e, local = res["end_to_end"], res["end_to_end"]["local"]["tasks_per_s"]
    rows = [
        "| variant | tasks | end-to-end tasks/s | celery_ext / variant | idle CPU (% core) |",
        "|---|--:|--:|--:|--:|",
    ]
    for key, label in LABELS.items():
        r = e2e[key]
        idle = f"{r['idle_cpu_pct']:.2f}" if "idle_cpu_pct" in r else "-"
        ratio = local / r["tasks_per_s"]
        rows.append(
            f"| {label} | {r['tasks']} | {r['tasks_per_s']:,.0f} | {ratio:,.1f}x | {idle} |"
        )
    pub = res["publish_only"]
    rows += ["", "| publish only (no worker) | tasks | delays/s |", "|---|--:|--:|"]
    rows += [f"| {k} | {res['config']['tasks']} | {v:,.0f} |" for k, v in pub.items()]
    lat = e2e["local"]["latency"]
    rows += [
        "",
        f"local lane publish -> start latency ({lat['samples']} tasks, one at a time): "
        f"p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms, max {lat['max_ms']:.3f} ms",
    ]
    return "\n".join(rows)


LABELS = {
    "memory_1s": "stock memory:// (polling 1 s)",
    "memory_1ms": "stock memory:// (polling 1 ms)",
    "local": "celery_ext local://",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per fast variant")
    parser.add_argument("--slow-tasks", type=int, default=64, help="tasks at 1 s polling")
    parser.add_argument("--concurrency", type=int, default=4, help="threads per worker")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU window")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="small N for a smoke run")
    parser.add_argument("--out", "--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.slow_tasks, args.idle_seconds, args.latency_samples = 500, 16, 1.0, 50

    res: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "env": {
            "python": platform.python_version(),
            "celery": celery.__version__,
            "kombu": kombu.__version__,
            "machine": platform.machine(),
        },
        "end_to_end": {},
        "publish_only": {},
    }
    with quiet():
        e2e = res["end_to_end"]
        slow = make_bench(LABELS["memory_1s"], "bench-mem-1s", local=False)
        e2e["memory_1s"] = end_to_end(slow, args.slow_tasks, args, idle=False)
        fast = make_bench(LABELS["memory_1ms"], "bench-mem-1ms", local=False, polling_s=0.001)
        e2e["memory_1ms"] = end_to_end(fast, args.tasks, args, idle=True)
        lane = make_bench(LABELS["local"], "bench-local", local=True)
        e2e["local"] = end_to_end(lane, args.tasks, args, idle=True)
        for key, local in (("memory://", False), ("local://", True)):
            pub = make_bench(f"publish {key}", f"bench-pub-{key[:-3]}", local=local)
            res["publish_only"][key] = publish_only(pub, args.tasks)
    local_rate = e2e["local"]["tasks_per_s"]
    res["ratios"] = {
        f"local/{k}": local_rate / v["tasks_per_s"] for k, v in e2e.items() if k != "local"
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
