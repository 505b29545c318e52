"""Chaos soak: stock Celery vs celery_ext under SIGTERM, SIGKILL and a broker cut.

Each round runs ``tests.chaos.harness.run_chaos`` on one broker: acks_late tasks
with a Redis ledger, two ``celery worker`` subprocesses (threads pool) SIGTERMed
and SIGKILLed at random and replaced, every broker connection cut once (a
test-owned ``redis-server`` restarted; a TCP proxy in front of RabbitMQ). A task
not done by the deadline counts as lost: stock Celery on Redis leaves a killed
worker's messages unacked for ``visibility_timeout`` (1 h), and loses outright a
message popped but not yet recorded when the worker dies.

Run::

    .venv/bin/python benchmarks/chaos_soak.py                      # 3 rounds, 10,000 tasks
    .venv/bin/python benchmarks/chaos_soak.py --rounds 1 --tasks 3000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.harness import run_chaos  # noqa: E402


def soak(brokers: list[str], rounds: int, tasks: int, deadline_s: float) -> list[dict[str, Any]]:
    """One row per broker, side and round."""
    rows = []
    for n in range(rounds):
        for broker in brokers:
            for side, stock in (("stock", True), ("celery_ext", False)):
                result = run_chaos(
                    broker, tasks=tasks, deadline_s=deadline_s, stock=stock, seed=n, log=False
                )
                print(f"{side:10} round {n + 1}: {result.line()}", flush=True)
                rows.append(
                    {
                        "broker": broker,
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
                    }
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Totals per broker and side as a markdown table."""
    lines = [
        "| broker | side | rounds | tasks | lost | duplicates | SIGTERM | SIGKILL | cuts "
        "| slowest round s | longest drain s | workers exited 1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["broker"], r["side"]) for r in rows}, key=lambda k: (k[0], k[1] != "stock"))
    for broker, side in keys:
        mine = [r for r in rows if (r["broker"], r["side"]) == (broker, side)]
        fields = ("tasks", "lost", "duplicates", "sigterm", "sigkill", "broker_cuts")
        total = {k: sum(r[k] for r in mine) for k in fields}
        lines.append(
            f"| {broker} | {side} | {len(mine)} | {total['tasks']:,} | {total['lost']:,} | "
            f"{total['duplicates']:,} | {total['sigterm']} | {total['sigkill']} | "
            f"{total['broker_cuts']} | {max(r['seconds'] for r in mine):.1f} | "
            f"{max(r.get('longest_drain_s', 0.0) for r in mine):.1f} | "
            f"{sum(r.get('exit_1', 0) for r in mine)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", nargs="+", default=["redis", "amqp"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds per round")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    rows = soak(args.brokers, args.rounds, args.tasks, args.deadline)
    print()
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
