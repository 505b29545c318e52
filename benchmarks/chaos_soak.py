"""Chaos soak: stock Celery vs celery_ext under SIGTERM, SIGKILL and a broker cut.

Each round runs ``tests.chaos.harness.run_chaos`` on one broker: acks_late tasks
with a Redis ledger, two ``celery worker`` subprocesses (threads pool) SIGTERMed
and SIGKILLed at random and replaced, every broker connection cut once (a
test-owned ``redis-server`` restarted; a TCP proxy in front of RabbitMQ). A task
not done by the deadline counts as lost: stock Celery on Redis leaves a killed
worker's messages unacked for ``visibility_timeout`` (1 h), and loses outright a
message popped but not yet recorded when the worker dies.

``--combined`` runs the every-feature-at-once app instead (``tests.apps.combined_app``:
lossy follow-ups, parked retries and countdowns, time limits, a blocking queue bound,
a short drain deadline) on each ``--pools`` pool, beside stock Celery running the
same jobs with its nearest equivalents (autoretry, worker-held countdowns, no bound).

Run::

    .venv/bin/python benchmarks/chaos_soak.py                      # 3 rounds, 10,000 tasks
    .venv/bin/python benchmarks/chaos_soak.py --rounds 1 --tasks 3000 --json out.json
    .venv/bin/python benchmarks/chaos_soak.py --combined --tasks 2000 --rounds 3
    .venv/bin/python benchmarks/chaos_soak.py --combined --pools threads \
        --brokers sentinel amqp-quorum --replica-acks 0 1 --tasks 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.harness import publish_combined, run_chaos  # noqa: E402


def soak(
    brokers: list[str],
    rounds: int,
    tasks: int,
    deadline_s: float,
    combined: bool = False,
    pools: tuple[str, ...] = ("threads",),
    replica_acks: tuple[int, ...] = (0,),
) -> list[dict[str, Any]]:
    """One row per broker, pool, side and round (celery_ext once per ``replica_acks``
    value on Redis brokers)."""
    rows = []
    for n in range(rounds):
        for broker in brokers:
            acks = replica_acks if broker in ("redis", "sentinel") else (0,)
            sides = [("stock", True, 0)] + [
                ("celery_ext" + (f" replica_acks={r}" if r else ""), False, r) for r in acks
            ]
            for pool in pools:
                for side, stock, wait in sides:
                    options: dict[str, Any] = {"replica_acks": wait}
                    if combined:
                        queue_type = "quorum" if broker == "amqp-quorum" else "classic"
                        publish = functools.partial(
                            publish_combined,
                            stock=stock,
                            seed=n,
                            queue_type=queue_type,
                            replica_acks=wait,
                        )
                        options.update(
                            app="tests.apps.combined_app",
                            publish=publish,
                            lossy=pool != "prefork",
                            faults=("term", "kill", "cut"),
                            every_s=(0.7, 1.5),
                            min_age_s=2.0,
                            chaos_until=0.9,
                        )
                    result = run_chaos(
                        broker,
                        tasks=tasks,
                        deadline_s=deadline_s,
                        stock=stock,
                        seed=n,
                        log=False,
                        pool=pool,
                        concurrency=1 if pool == "solo" else 4,
                        **options,
                    )
                    print(f"{side:10} round {n + 1}: {result.line()}", flush=True)
                    rows.append(_row(broker, pool, side, n, tasks, result))
    return rows


def _row(broker: str, pool: str, side: str, n: int, tasks: int, result: Any) -> dict[str, Any]:
    return {
        "broker": broker,
        "pool": pool,
        "side": side,
        "round": n + 1,
        "tasks": tasks,
        "lost": result.lost,
        "duplicates": result.duplicates,
        "sigterm": result.terms,
        "sigkill": result.kills,
        "broker_cuts": result.cuts,
        "seconds": round(result.seconds, 1),
        "longest_drain_s": round(result.longest_drain_s, 1),
        "exit_1": result.exit_codes.count(1),
        "lossy_lost": result.lossy_killed + result.lossy_reported + result.lossy_unexplained,
        "lossy_unexplained": result.lossy_unexplained,
        "crashed": len(result.crashed),
    }


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["broker"], row.get("pool", "threads"), row["side"]


def table(rows: list[dict[str, Any]]) -> str:
    """Totals per broker, pool and side as a markdown table."""
    lines = [
        "| broker | pool | side | rounds | tasks | lost | duplicates | lossy lost (unexplained) "
        "| SIGTERM | SIGKILL | cuts | slowest round s | longest drain s | workers exited 1 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted(
        {_key(r) for r in rows},
        key=lambda k: (k[0], k[1], k[2] != "stock"),
    )
    for broker, pool, side in keys:
        mine = [
            r
            for r in rows
            if (r["broker"], r.get("pool", "threads"), r["side"]) == (broker, pool, side)
        ]
        fields = ("tasks", "lost", "duplicates", "sigterm", "sigkill", "broker_cuts")
        total = {k: sum(r[k] for r in mine) for k in fields}
        lossy = sum(r.get("lossy_lost", 0) for r in mine)
        unexplained = sum(r.get("lossy_unexplained", 0) for r in mine)
        lines.append(
            f"| {broker} | {pool} | {side} | {len(mine)} | {total['tasks']:,} | "
            f"{total['lost']:,} | {total['duplicates']:,} | {lossy} ({unexplained}) | "
            f"{total['sigterm']} | {total['sigkill']} | "
            f"{total['broker_cuts']} | {max(r['seconds'] for r in mine):.1f} | "
            f"{max(r.get('longest_drain_s', 0.0) for r in mine):.1f} | "
            f"{sum(r.get('exit_1', 0) for r in mine)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--brokers",
        nargs="+",
        default=["redis", "amqp"],
        help="redis, amqp, amqp-quorum (quorum queues), sentinel (a failover as the cut)",
    )
    parser.add_argument(
        "--replica-acks",
        nargs="+",
        type=int,
        default=[0],
        help="Redis brokers: run celery_ext once per value (0: no WAIT)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds per round")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--combined", action="store_true", help="every feature at once")
    parser.add_argument(
        "--pools", nargs="+", default=None, help="threads (default), or with --combined all four"
    )
    args = parser.parse_args()
    pools = args.pools or (
        ["threads", "solo", "prefork", "gevent"] if args.combined else ["threads"]
    )
    rows = soak(
        args.brokers,
        args.rounds,
        args.tasks,
        args.deadline,
        args.combined,
        tuple(pools),
        tuple(args.replica_acks),
    )
    print()
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
