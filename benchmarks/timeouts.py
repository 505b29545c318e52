"""Time-limit precision: how late the soft and hard limits fire, stock Celery vs celery_ext.

For each pool (threads, solo, prefork, gevent) and variant (stock, celery_ext) one
`celery worker` subprocess on Redis runs ``--runs`` probes of each kind, one at a time:

- soft: a task loops on ``time.sleep(0.001)`` until ``SoftTimeLimitExceeded`` (limit 0.5 s)
  and returns how late it came; "not enforced" when it ran 4 s untouched;
- hard: a task that swallows ``Exception`` stamps its start, then loops (limit 1 s); the
  client polls the result every 2 ms and takes FAILURE time - start - limit.

Then the same on the local lane (celery_ext only, in process; stock has no such lane).

Run::

    .venv/bin/python benchmarks/timeouts.py            # 10 probes of each kind
    .venv/bin/python benchmarks/timeouts.py --quick    # 3

Target for celery_ext: every limit fires within 100 ms, on every pool and transport.
Uses Redis db 12 and unique queue names.
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

from celery import Celery, signals

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._cleanup import forget_redis_queue  # noqa: E402
from benchmarks.timeout_app import HARD_S, RUN_FOR_S, define  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REDIS = "redis://127.0.0.1:6379/12"
POOLS = ("threads", "solo", "prefork", "gevent")


def probe(
    tasks: dict[str, Any], app: Celery, runs: int, starts: dict[str, float] | None = None
) -> dict[str, list[float | None]]:
    """Soft and hard lateness samples; ``starts`` (task id -> start) replaces the backend stamp."""
    soft: list[float | None] = []
    hard: list[float | None] = []
    for _ in range(runs):
        soft.append(tasks["soft"].delay().get(timeout=60))
    for _ in range(runs):
        key = f"timeouts-bench-start-{uuid.uuid4().hex}"
        result = tasks["hard"].delay(key)
        deadline = time.monotonic() + HARD_S + RUN_FOR_S + 10
        while result.state not in ("FAILURE", "SUCCESS") and time.monotonic() < deadline:
            time.sleep(0.002)
        seen = time.time()
        if starts is not None:
            started: Any = starts.get(result.id)
        else:
            started = app.backend.get(key)
            app.backend.delete(key)
        if result.state == "FAILURE" and started is not None:
            hard.append(seen - float(started) - HARD_S)
        else:
            hard.append(None)
    return {"soft": soft, "hard": hard}


def run_pool(pool: str, variant: str, runs: int) -> dict[str, list[float | None]]:
    queue = f"timeouts.{variant}.{pool}.{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, TIMEOUT_BROKER=REDIS, TIMEOUT_QUEUE=queue, TIMEOUT_VARIANT=variant)
    name = f"timeouts-{variant}-{pool}-{uuid.uuid4().hex[:4]}@localhost"
    cmd = [
        *(sys.executable, "-m", "celery", "-A", "benchmarks.timeout_app", "worker"),
        *("-P", pool, "-c", "2", "-Q", queue, "-n", name),
        *("--without-mingle", "--without-gossip", "-l", "ERROR"),
    ]
    worker = subprocess.Popen(cmd, env=env, cwd=ROOT)
    app = Celery("timeouts-client", broker=REDIS, backend=REDIS, set_as_current=False)
    app.conf.task_default_queue = queue
    tasks = define(app)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[name], timeout=0.5):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"{variant}/{pool}: worker did not start")
        return probe(tasks, app, runs)
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        with app.connection_for_write() as conn:
            forget_redis_queue(conn.default_channel.client, queue, [name])


def run_local(pool: str, runs: int) -> dict[str, list[float | None]]:
    import celery_ext

    app = Celery("timeouts-local", broker="local://", backend="cache+memory://")
    app.conf.update(task_default_queue="timeouts", worker_hijack_root_logger=False)
    celery_ext.install(app)
    tasks = define(app)
    starts: dict[str, float] = {}

    def stamp(task_id: str = "", **_: Any) -> None:
        starts[task_id] = time.time()

    signals.task_prerun.connect(stamp, weak=False)
    try:
        with celery_ext.LocalWorker(app, pool=pool, concurrency=2):
            return probe(tasks, app, runs, starts)
    finally:
        signals.task_prerun.disconnect(stamp)


def summary(samples: list[float | None]) -> dict[str, Any]:
    fired = [s for s in samples if s is not None]
    if not fired:
        return {"enforced": f"0/{len(samples)}"}
    fired.sort()
    return {
        "enforced": f"{len(fired)}/{len(samples)}",
        "p50_ms": round(statistics.median(fired) * 1000, 1),
        "max_ms": round(fired[-1] * 1000, 1),
    }


def cell(s: dict[str, Any]) -> str:
    if "p50_ms" not in s:
        return f"not enforced ({s['enforced']})"
    return f"{s['enforced']}: p50 {s['p50_ms']:.0f} ms, max {s['max_ms']:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 probes of each kind")
    parser.add_argument("--pools", default=",".join(POOLS))
    parser.add_argument("--json", type=Path, default=RESULTS / "timeouts.json")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    rows: list[dict[str, Any]] = []
    for pool in args.pools.split(","):
        for variant in ("stock", "celery_ext"):
            got = run_pool(pool, variant, runs)
            rows.append(
                {
                    "transport": "redis",
                    "pool": pool,
                    "variant": variant,
                    "soft": summary(got["soft"]),
                    "hard": summary(got["hard"]),
                }
            )
            print(rows[-1], flush=True)
    for pool in ("threads", "solo"):
        got = run_local(pool, runs)
        rows.append(
            {
                "transport": "local",
                "pool": pool,
                "variant": "celery_ext",
                "soft": summary(got["soft"]),
                "hard": summary(got["hard"]),
            }
        )
    lines = [
        "| transport | pool | variant | soft limit (0.5 s): late by | hard limit (1 s): late by |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['transport']} | {r['pool']} | {r['variant']} | {cell(r['soft'])} "
            f"| {cell(r['hard'])} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    (RESULTS / "timeouts.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
