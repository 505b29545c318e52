"""The demo under load: thousands of clients POST /emails at the same instant.

Starts ``examples/email_service.py`` (Starlette on uvicorn, the local lane bounded
at ``--max-queued``), then sends ``--clients`` requests at once, each on a
connection of its own (as many clients would), with a 120 s client timeout. The
point of the pattern: every client gets 202 or 503 quickly, never a timeout or a
reset, and nothing is enqueued whose client got no answer. Prints per round the
counts (202, 503, other statuses, timeouts, connection errors), the latency
p50/p99/max, and how many enqueued emails no client heard of; then SIGTERMs the
demo and prints its drain line. The client runs on the same machine (2 cores
here): its own CPU time is in the figures.

Run::

    .venv/bin/python benchmarks/demo_load.py                   # 3 rounds of 2,000
    .venv/bin/python benchmarks/demo_load.py --clients 5000 --rounds 1 --json out.json
    git show ae8706b:examples/email_service.py > /tmp/old_demo.py   # the http.server one
    .venv/bin/python benchmarks/demo_load.py --rounds 1 --demo /tmp/old_demo.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "email_service.py"
CLIENT_TIMEOUT_S = 120.0


class Demo:
    """The demo service as a subprocess; its output is collected by a thread."""

    def __init__(self, script: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(60):
            self.proc.kill()
            raise SystemExit("demo did not start:\n" + "".join(self.lines))
        self.url = next(m.group(1) for ln in self.lines if (m := re.search(r"on (http\S+)", ln)))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith("sent to="):  # one per email: not kept
                self.lines.append(line)
            if line.startswith("listening on"):
                self._listening.set()

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as response:
            stats: dict[str, int] = json.loads(response.read())
            return stats

    def stop(self) -> str:
        """SIGTERM, wait for the drain; the drain line."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        return next((ln.strip() for ln in self.lines if ln.startswith("drained:")), "no drain line")


async def one(
    session: aiohttp.ClientSession, url: str, n: int, go: asyncio.Event
) -> tuple[str, float]:
    body = {"to": f"user{n}@example.com", "subject": f"load {n}"}
    await go.wait()
    started = time.perf_counter()
    try:
        async with session.post(url + "/emails", json=body) as response:
            await response.read()
            outcome = str(response.status)
    except asyncio.TimeoutError:
        outcome = "timeout"
    except (aiohttp.ClientConnectionError, ConnectionError):
        outcome = "connection error"
    return outcome, time.perf_counter() - started


async def round_(url: str, clients: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a connection per client
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        go = asyncio.Event()
        tasks = [asyncio.create_task(one(session, url, n, go)) for n in range(clients)]
        await asyncio.sleep(0.5)  # every client is waiting at the line
        started = time.perf_counter()
        go.set()
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    outcomes = [o for o, _ in results]
    latencies = sorted(t for _, t in results)
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    return {
        "clients": clients,
        "counts": counts,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[int(len(latencies) * 0.99) - 1],
        "max_s": latencies[-1],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-queued", type=int, default=50, help="the demo's lane bound")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--demo", type=Path, default=DEMO, help="another version of the demo, to compare"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a socket per client
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.clients)), hard))

    demo = Demo(args.demo, "--max-queued", str(args.max_queued), "--concurrency", "4")
    rows = []
    try:
        for n in range(args.rounds):
            before = demo.stats()
            row = asyncio.run(round_(demo.url, args.clients))
            after = demo.stats()
            # Enqueued emails whose client heard nothing (a 202 lost on the way back).
            row["unanswered_enqueued"] = (after["accepted"] - before["accepted"]) - row[
                "counts"
            ].get("202", 0)
            rows.append(row)
            print(
                f"round {n + 1}: {args.clients} clients at once: "
                + ", ".join(f"{k}: {v}" for k, v in row["counts"].items())
                + f"; p50 {row['p50_s'] * 1000:.0f} ms, p99 {row['p99_s'] * 1000:.0f} ms, "
                f"max {row['max_s'] * 1000:.0f} ms; enqueued but unanswered: "
                f"{row['unanswered_enqueued']}",
                flush=True,
            )
    finally:
        drain = demo.stop()
    print(drain)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "drain": drain}, indent=2) + "\n")


if __name__ == "__main__":
    main()
