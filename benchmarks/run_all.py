"""Run every side-by-side benchmark (stock Celery vs celery_ext) and write benchmarks/RESULTS.md.

Each benchmark script already runs stock Celery and celery_ext itself; this runs them
as subprocesses with sizes meant for a whole run of ~15 minutes (``--full``: each
script's own defaults, much longer), keeps their JSON in ``benchmarks/results/run_all/``
and renders one table per benchmark, with the machine's facts, into ``RESULTS.md``.

Run::

    .venv/bin/python benchmarks/run_all.py                       # everything
    .venv/bin/python benchmarks/run_all.py --only overhead drain # a subset
    .venv/bin/python benchmarks/run_all.py --list

With ``--only`` the other sections are rendered from the last stored results (each
section says when it was measured). A benchmark that fails is reported in its section
with the end of its output; the others still run.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import overhead  # noqa: E402

STORE = ROOT / "benchmarks" / "results" / "run_all"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
REPORT_META = STORE / "report.meta.json"
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"

Render = Callable[[list[Any]], str]


@dataclass(frozen=True)
class Bench:
    """One benchmark: its script, one argument list per invocation, and a renderer."""

    name: str
    script: str
    what: str
    runs: dict[str, list[str]]  # invocation label -> arguments (quick sizes)
    full: dict[str, list[str]]  # the same with the script's own default sizes
    render: Render
    default: bool = True  # False: only with --only NAME (too long for the default run)


# -- renderers: JSON of each invocation -> one markdown table ---------------------------


def _num(value: Any, spec: str = ",.0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _ratio(ext: Any, stock: Any) -> str:
    return f"{ext / stock:.2f}x" if ext and stock else "-"


def render_overhead(docs: list[Any]) -> str:
    doc = docs[0]
    return overhead.table(doc["summary"], doc["config"])


def render_local_lane(docs: list[Any]) -> str:
    res = docs[0]
    e2e = res["end_to_end"]
    local = e2e["local"]["tasks_per_s"]
    labels = {
        "memory_1s": "stock `memory://`, 1 s polling",
        "memory_1ms": "stock `memory://`, 1 ms polling",
    }
    lines = [
        "| stock variant | tasks | stock tasks/s | celery_ext `local://` tasks/s | ext / stock "
        "| idle CPU % core, stock / ext |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for key, label in labels.items():
        r = e2e[key]
        lines.append(
            f"| {label} | {r['tasks']:,} | {r['tasks_per_s']:,.0f} | {local:,.0f} "
            f"| {local / r['tasks_per_s']:,.1f}x | {_num(r.get('idle_cpu_pct'), '.2f')} / "
            f"{_num(e2e['local'].get('idle_cpu_pct'), '.2f')} |"
        )
    pub, lat = res["publish_only"], e2e["local"]["latency"]
    lines += [
        "",
        f"Publish only (no worker): stock `memory://` {pub['memory://']:,.0f} delays/s, "
        f"`local://` {pub['local://']:,.0f} ({_ratio(pub['local://'], pub['memory://'])}). "
        f"Local lane publish → start latency ({lat['samples']} tasks, one at a time): "
        f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms.",
    ]
    return "\n".join(lines)


def render_enqueue(docs: list[Any]) -> str:
    res = docs[0]
    lines = [
        f"{res['config']['n']:,} messages per variant, publishing only, one process.",
        "",
        "| broker | stock `apply_async` /s | celery_ext bounded `apply_async` /s (vs stock) "
        "| celery_ext `enqueue_many` /s (vs stock) |",
        "|---|--:|--:|--:|",
    ]
    for broker, r in res["brokers"].items():
        lines.append(
            f"| {broker} | {r['stock']:,.0f} "
            f"| {r['bounded_apply_async']:,.0f} ({_ratio(r['bounded_apply_async'], r['stock'])}) "
            f"| {r['enqueue_many']:,.0f} ({_ratio(r['enqueue_many'], r['stock'])}) |"
        )
    return "\n".join(lines)


def render_durability(docs: list[Any]) -> str:
    lines = [
        "One app with `install(app)`: durable tasks through the broker (Celery's embedded "
        "worker, threads, 4) vs `durable=False` tasks on the local lane (`LocalWorker`, "
        "threads, 4); publishing included.",
        "",
        "| broker | tasks | durable tasks/s | lossy tasks/s (vs durable) "
        "| durable publishes/s | lossy publishes/s (vs durable) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for doc in docs:
        durable, lossy = doc["rows"]
        lines.append(
            f"| {doc['broker']} | {doc['n']:,} | {durable['tasks_per_s']:,.0f} "
            f"| {lossy['tasks_per_s']:,.0f} "
            f"({_ratio(lossy['tasks_per_s'], durable['tasks_per_s'])}) "
            f"| {durable['publish_per_s']:,.0f} | {lossy['publish_per_s']:,.0f} "
            f"({_ratio(lossy['publish_per_s'], durable['publish_per_s'])}) |"
        )
    return "\n".join(lines)


def render_eta_flood(docs: list[Any]) -> str:
    lines = [
        "| broker | variant | ETA tasks | ready started | ready p50 / p99 (s) | peak RSS MB "
        "(vs stock) | peak held |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for doc in docs:
        broker = doc["config"]["broker"]
        stock = next((r for r in doc["rows"] if r["variant"] == "stock"), None)
        for r in doc["rows"]:
            vs = ""
            if stock is not None and r is not stock:
                vs = f" ({_ratio(r['peak_rss_mb'], stock['peak_rss_mb'])})"
            lines.append(
                f"| {broker} | {r['variant']} | {r['eta_tasks']:,} "
                f"| {r['ready_started']}/{r['ready_total']} "
                f"| {_num(r['p50_s'], '.3f')} / {_num(r['p99_s'], '.3f')} "
                f"| {_num(r['peak_rss_mb'])}{vs} | {_num(r['peak_held'], ',')} |"
            )
    return "\n".join(lines)


def _limit(s: dict[str, Any]) -> str:
    if "p50_ms" not in s:
        return f"not enforced ({s['enforced']})"
    return f"{s['enforced']}, late p50 {s['p50_ms']:.0f} / max {s['max_ms']:.0f} ms"


def render_timeouts(docs: list[Any]) -> str:
    rows = docs[0]
    lines = [
        "Soft limit 0.5 s on a task looping on `sleep(0.001)`; hard limit 1 s on a task "
        "that swallows `Exception`; `celery worker -c 2` on Redis (local: in process).",
        "",
        "| transport | pool | soft: stock | soft: celery_ext | hard: stock | hard: celery_ext |",
        "|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["transport"], r["pool"]) for r in rows)
    for transport, pool in keys:
        got = {r["variant"]: r for r in rows if (r["transport"], r["pool"]) == (transport, pool)}
        stock, ext = got.get("stock"), got.get("celery_ext")
        cells = [
            _limit(v[kind]) if v else "(no stock lane)"
            for kind in ("soft", "hard")
            for v in (stock, ext)
        ]
        lines.append(f"| {transport} | {pool} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_drain(docs: list[Any]) -> str:
    rows = docs[0]
    lines = [
        "SIGTERM to a `celery worker -c 2` running two 3 s tasks with six more held: seconds "
        "until the held messages are back in the broker, until the process exits; "
        "lost / run twice.",
        "",
        "| broker | pool | held back in broker (s): stock / ext | exit (s): stock / ext "
        "| lost, twice: stock / ext |",
        "|---|---|--:|--:|--:|",
    ]
    term = [r for r in rows if "pool" in r]
    for broker, pool in dict.fromkeys((r["broker"], r["pool"]) for r in term):
        got = {r["variant"]: r for r in term if (r["broker"], r["pool"]) == (broker, pool)}
        s, e = got.get("stock", {}), got.get("celery_ext", {})
        lines.append(
            f"| {broker} | {pool} | {_num(s.get('back_s'), '.2f', 'never')} / "
            f"{_num(e.get('back_s'), '.2f', 'never')} | {_num(s.get('exit_s'), '.2f')} / "
            f"{_num(e.get('exit_s'), '.2f')} | {s.get('lost')}, {s.get('twice')} / "
            f"{e.get('lost')}, {e.get('twice')} |"
        )
    busy = [r for r in rows if "busy_rounds" in r]
    if busy:
        lines += [
            "",
            f"SIGTERM to a busy prefork worker (`-c 8`, 1 ms tasks), {busy[0]['busy_rounds']} "
            "rounds of 100 tasks, a last worker runs the rest: slowest exit, exits over 10 s, "
            "lost / run twice.",
            "",
            "| broker | slowest exit (s): stock / ext | exits over 10 s: stock / ext "
            "| lost, twice: stock / ext |",
            "|---|--:|--:|--:|",
        ]
        for broker in dict.fromkeys(r["broker"] for r in busy):
            got = {r["variant"]: r for r in busy if r["broker"] == broker}
            s, e = got.get("stock", {}), got.get("celery_ext", {})
            lines.append(
                f"| {broker} | {_num(s.get('slowest_exit_s'), '.2f')} / "
                f"{_num(e.get('slowest_exit_s'), '.2f')} | {s.get('exits_over_10s')} / "
                f"{e.get('exits_over_10s')} | {s.get('lost')}, {s.get('twice')} / "
                f"{e.get('lost')}, {e.get('twice')} |"
            )
    kill = {r["variant"]: r for r in rows if "recover_s" in r}
    if kill:
        never = f"never within {next(iter(kill.values()))['gave_up_after_s']:.0f}"
        stock_s = _num(kill.get("stock", {}).get("recover_s"), ".1f", never)
        ext_s = _num(kill.get("celery_ext", {}).get("recover_s"), ".1f", never)
        lines += [
            "",
            "SIGKILLed worker (2 running `acks_late` + 3 prefetched, Redis) beside a live one: "
            f"its messages ran again after: stock {stock_s} s, celery_ext {ext_s} s.",
        ]
    return "\n".join(lines)


def render_reconnect(docs: list[Any]) -> str:
    from benchmarks.reconnect import table

    return (
        str(table(docs[0]["rows"]))
        + "\n\nRabbitMQ, threads pool, concurrency 4: a broker connection reset while"
        " `acks_late` tasks of 50 ms run; finish: seconds from the reset until every task"
        " was done; stalled: not done within the round's deadline (the finish then shows"
        " the deadline). Stock Celery grows the prefetch back after the reconnect by"
        " sending `basic.qos` from a pool thread, which tears frames the consumer loop is"
        " reading."
    )


def render_chaos_soak(docs: list[Any]) -> str:
    rows = docs[0]["rows"]
    try:
        from benchmarks.chaos_soak import table
    except ImportError:  # its harness lives in tests/: show the rows as they are
        return "\n".join(f"- {r}" for r in rows)
    return (
        str(table(rows))
        + "\n\nlost: published tasks not completed by the round's deadline (the ledger lacks them)."
        " Stock Celery on Redis leaves a killed worker's messages unacked for"
        " `visibility_timeout` (1 h) and loses outright a message popped but not yet recorded."
        " duplicates: extra runs (at-least-once). slowest round: seconds until every task was"
        " done (or the deadline). longest drain: SIGTERM to exit. workers exited 1: died of"
        " an error, or (celery_ext) a drain its deadline cut short. lossy lost: `durable=False`"
        " follow-ups that never ran (combined runs), all where a process was SIGKILLed or a"
        " drained lane reported dropping them; unexplained: any other."
    )


def render_demo_load(docs: list[Any]) -> str:
    doc = docs[0]
    lines = [
        "| round | clients at once | 202 | 503 | other | timeouts | connection errors "
        "| p50 ms | p99 ms | max ms | enqueued, unanswered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in enumerate(doc["rows"], 1):
        counts = dict(row["counts"])
        ok, full = counts.pop("202", 0), counts.pop("503", 0)
        timeouts, errors = counts.pop("timeout", 0), counts.pop("connection error", 0)
        lines.append(
            f"| {n} | {row['clients']:,} | {ok:,} | {full:,} | {sum(counts.values())} | "
            f"{timeouts} | {errors} | {row['p50_s'] * 1000:.0f} | {row['p99_s'] * 1000:.0f} | "
            f"{row['max_s'] * 1000:.0f} | {row['unanswered_enqueued']} |"
        )
    return (
        "\n".join(lines)
        + f"\n\n`examples/email_service.py` (Starlette on uvicorn, local lane bounded at 50,"
        " 4 worker threads, 0.2 s per email): every client POSTs /emails at the same instant,"
        " each on a connection of its own, 120 s client timeout; the client runs on the same"
        f" machine. At SIGTERM: `{doc['drain']}`. The demo it replaced (the standard library's"
        " `http.server`, listen backlog 5), measured once the same way (`demo_load.py --demo`,"
        " 2026-12-07): 403 got 202 and 456 got 503, 820 timed out and 321 got a connection"
        " error; p50 119 s."
    )


def render_production(docs: list[Any]) -> str:
    doc = docs[0]
    return "\n".join(doc["tables"]).strip() + (
        f"\n\n{doc['load']}. {doc['rounds']} rounds of {doc['tasks']:,} publishes, interleaved."
        " Sentinel: a test-owned primary, replica and three sentinels on loopback. Quorum:"
        " the shared RabbitMQ (one node). Max held: the queue's depth once every producer"
        " was refused."
    )


BENCHES = [
    Bench(
        "demo_load",
        "demo_load.py",
        "the demo web service under 2,000 clients at once: 202 or 503, never a hang",
        {"": ["--clients", "2000", "--rounds", "3"]},
        {"": []},
        render_demo_load,
    ),
    Bench(
        "overhead",
        "overhead.py",
        "plugin overhead: no-op task throughput of a `celery worker`, stock vs `install(app)`",
        {"": ["--tasks", "4000", "--rounds", "7", "--pools", "threads", "prefork", "--local"]},
        {"": ["--local"]},
        render_overhead,
    ),
    Bench(
        "local_lane",
        "local_lane.py",
        "local lane vs stock `memory://`, embedded worker, threads pool, concurrency 4",
        {"": []},
        {"": []},
        render_local_lane,
    ),
    Bench(
        "enqueue",
        "enqueue.py",
        "publishing: stock `apply_async` loop vs bounded `apply_async` and `enqueue_many`",
        {"": ["-n", "5000"]},
        {"": []},
        render_enqueue,
    ),
    Bench(
        "durability",
        "durability.py",
        "lossy (`durable=False`, local lane) vs durable (broker) tasks of one app",
        {"redis": ["--broker", "redis"], "amqp": ["--broker", "amqp"]},
        {"redis": ["--broker", "redis"], "amqp": ["--broker", "amqp"]},
        render_durability,
    ),
    Bench(
        "eta_flood",
        "eta_flood.py",
        "ETA flood: countdown=3600 tasks vs worker RAM and ready-task latency",
        {"redis": ["--broker", "redis", "--quick"], "amqp": ["--broker", "amqp", "--quick"]},
        {"redis": ["--broker", "redis"], "amqp": ["--broker", "amqp"]},
        render_eta_flood,
    ),
    Bench(
        "timeouts",
        "timeouts.py",
        "time-limit precision per pool",
        {"": ["--quick"]},
        {"": []},
        render_timeouts,
    ),
    Bench(
        "drain",
        "drain.py",
        "warm shutdown and dead-worker recovery",
        {"": []},
        {"": []},
        render_drain,
    ),
    Bench(
        "reconnect",
        "reconnect.py",
        "broker reconnect on RabbitMQ with the threads pool: time to finish, stalls",
        {"": ["--rounds", "4"]},
        {"": []},
        render_reconnect,
    ),
    Bench(
        "chaos_soak",
        "chaos_soak.py",
        "chaos soak: SIGTERM, SIGKILL and a broker cut; lost and duplicated tasks",
        {"": ["--rounds", "2", "--tasks", "10000", "--deadline", "90"]},
        {"": []},
        render_chaos_soak,
        default=False,
    ),
    Bench(
        "production",
        "production.py",
        "production setups: Sentinel publishes with and without replica acks, quorum queues",
        {"": ["--rounds", "5", "--tasks", "2000"]},
        {"": []},
        render_production,
    ),
    Bench(
        "chaos_production",
        "chaos_soak.py",
        "every feature at once on quorum queues and through Sentinel with a failover, beside stock",
        {
            "": [
                "--combined",
                "--pools",
                "threads",
                "--brokers",
                "sentinel",
                "amqp-quorum",
                "--replica-acks",
                "0",
                "1",
                "--rounds",
                "2",
                "--tasks",
                "1000",
            ]
        },
        {"": ["--combined", "--pools", "threads", "--brokers", "sentinel", "amqp-quorum"]},
        render_chaos_soak,
        default=False,
    ),
    Bench(
        "chaos_combined",
        "chaos_soak.py",
        "every feature at once under SIGTERM, SIGKILL, a broker cut; four pools, beside stock",
        {"": ["--combined", "--rounds", "1", "--tasks", "1000", "--deadline", "120"]},
        {"": ["--combined"]},
        render_chaos_soak,
        default=False,
    ),
]
BY_NAME = {b.name: b for b in BENCHES}


# -- running ----------------------------------------------------------------------------


def source_digest() -> str:
    """Short hash of celery_ext/*.py: which code a result measured (the tree may be dirty)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "celery_ext").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _json_path(name: str, label: str) -> Path:
    return STORE / (f"{name}-{label}.json" if label else f"{name}.json")


def run_bench(bench: Bench, full: bool) -> dict[str, Any]:
    """Run every invocation of ``bench``; store and return its meta (commands, times, status)."""
    meta: dict[str, Any] = {
        "name": bench.name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source": source_digest(),
        "invocations": [],
    }
    started = time.monotonic()
    for label, args in (bench.full if full else bench.runs).items():
        out = _json_path(bench.name, label)
        out.unlink(missing_ok=True)
        argv = [sys.executable, str(ROOT / "benchmarks" / bench.script), *args, "--json", str(out)]
        shown = shlex.join([".venv/bin/python", f"benchmarks/{bench.script}", *args])
        print(f"\n=== {bench.name}{f' ({label})' if label else ''}: {shown}", flush=True)
        t0 = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=30)
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
        meta["invocations"].append(
            {
                "label": label,
                "command": shown,
                "json": str(out.relative_to(ROOT)),
                "returncode": rc,
                "elapsed_s": round(time.monotonic() - t0, 1),
                "tail": list(tail) if rc or not out.exists() else [],
            }
        )
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    (STORE / f"{bench.name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# -- the report -------------------------------------------------------------------------


def _read(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts() -> dict[str, str]:
    """CPU, RAM, OS, Python, library and broker versions, load average."""
    import billiard
    import celery
    import kombu
    import redis

    import celery_ext

    cpuinfo = Path("/proc/cpuinfo").read_text()
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln[:10] == "model name"]
    mem_kb = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal")
    )  # fmt: skip
    try:
        redis_version = str(redis.Redis.from_url(REDIS).info("server")["redis_version"])
    except Exception as exc:
        redis_version = f"unreachable ({exc.__class__.__name__})"
    try:
        with kombu.Connection(AMQP) as conn:
            conn.connect()
            version = conn.connection.server_properties.get("version")
            rabbit = version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:
        rabbit = f"unreachable ({exc.__class__.__name__})"
    commit = _read(["git", "rev-parse", "--short", "HEAD"]).strip() or "?"
    dirty = " (with uncommitted changes)" if _read(["git", "status", "--porcelain"]).strip() else ""
    return {
        "CPU": f"{models[0] if models else platform.processor()} x {len(models) or os.cpu_count()}",
        "RAM": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "Python": platform.python_version(),
        "celery / kombu / billiard / redis-py": (
            f"{celery.__version__} / {kombu.__version__} / {billiard.__version__} / "
            f"{redis.__version__}"
        ),
        "celery_ext": (
            f"{celery_ext.__version__}, commit {commit}{dirty}, sources {source_digest()} "
            "(sha256 of celery_ext/*.py)"
        ),
        "Redis server": redis_version,
        "RabbitMQ server": rabbit,
    }


def section(bench: Bench) -> str:
    """One benchmark's section, from its stored meta and JSON."""
    head = f"## {bench.name}: {bench.what}\n\n"
    meta_path = STORE / f"{bench.name}.meta.json"
    if not meta_path.exists():
        why = "Not run yet" if bench.default else "Not part of the default run (it takes long)"
        return f"{head}{why}: `.venv/bin/python benchmarks/run_all.py --only {bench.name}`.\n"
    meta = json.loads(meta_path.read_text())
    runs = meta["invocations"]
    source = f", celery_ext sources {meta['source']}" if meta.get("source") else ""
    lines = [f"Measured {meta['date']} in {meta['elapsed_s']:.0f} s{source}:"]
    for r in runs:
        status = "" if r["returncode"] == 0 else f" **failed (exit {r['returncode']})**"
        lines.append(f"`{r['command']}`{status}")
    body = "  \n".join(lines) + "\n\n"
    docs = []
    failed = [r for r in runs if r["returncode"] != 0 or not (ROOT / r["json"]).exists()]
    for r in runs:
        path = ROOT / r["json"]
        if path in {ROOT / f["json"] for f in failed}:
            continue
        docs.append(json.loads(path.read_text()))
    if docs:
        try:
            body += bench.render(docs) + "\n"
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            body += f"(could not render the results: {exc!r})\n"
    for r in failed:
        tail = "\n".join(r["tail"]) or "(no output)"
        body += f"\n`{r['command']}` failed; the end of its output:\n\n```\n{tail}\n```\n"
    return head + body


def unregistered() -> list[str]:
    """Benchmark scripts in benchmarks/ that run_all does not know (yet)."""
    known = {b.script for b in BENCHES} | {"run_all.py", "__init__.py"}
    scripts = (ROOT / "benchmarks").glob("*.py")
    return sorted(
        p.name
        for p in scripts
        if p.name not in known and not p.stem.endswith("_app") and not p.name.startswith("_")
    )


def write_report(facts: dict[str, str], meta: dict[str, Any]) -> None:
    load = meta["load"]
    lines = [
        "# Benchmark results: stock Celery vs celery_ext",
        "",
        f"Generated {meta['date']} by `{meta['command']}` in {meta['elapsed_s'] / 60:.1f} min. "
        "Rerun everything with `.venv/bin/python benchmarks/run_all.py` (one benchmark: "
        "`--only NAME`; each script's own, longer defaults: `--full`). Each section names the "
        "command that produced it; the raw JSON is in `benchmarks/results/run_all/`.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in facts.items()),
        f"| load average (1 min) at start / end | {load[0]:.2f} / {load[1]:.2f} |",
        "",
        "The machine is small and was shared with other work during the run (see the load "
        "average): single-run figures move by ±20 % from run to run. The overhead benchmark "
        "compensates by interleaving stock and celery_ext runs, alternating which goes first, "
        "and reporting medians over rounds and the median of the per-round ratios.",
        "",
    ]
    for bench in BENCHES:
        lines.append(section(bench))
    if missing := unregistered():
        lines.append(
            f"Scripts in benchmarks/ that run_all.py does not run yet: {', '.join(missing)}."
        )
    RESULTS_MD.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"run only these: {', '.join(BY_NAME)}"
    )
    parser.add_argument("--full", action="store_true", help="each script's own default sizes")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite RESULTS.md")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from the stored results"
    )
    args = parser.parse_args(argv)
    if args.list:
        for b in BENCHES:
            print(f"{b.name:<12} {b.what}{'' if b.default else ' (only with --only)'}")
        return 0
    names = [n for item in args.only or [] for n in item.split(",") if n]
    names = names or [b.name for b in BENCHES if b.default]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    STORE.mkdir(parents=True, exist_ok=True)
    if missing := unregistered():
        print(f"run_all: not covered (add them to BENCHES): {', '.join(missing)}")
    if args.report_only:
        last = json.loads(REPORT_META.read_text()) if REPORT_META.exists() else None
        if last is None:
            parser.error("no stored run to report on")
        write_report(last["facts"], last)
        print(f"wrote {RESULTS_MD.relative_to(ROOT)}")
        return 0
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([".venv/bin/python", "benchmarks/run_all.py", *given])
    facts = machine_facts()
    load0, started = os.getloadavg()[0], time.monotonic()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    failures = 0
    for name in names:
        meta = run_bench(BY_NAME[name], args.full)
        failures += sum(1 for r in meta["invocations"] if r["returncode"] != 0)
    elapsed = time.monotonic() - started
    if not args.no_report:
        report_meta = {
            "date": date,
            "command": command,
            "elapsed_s": elapsed,
            "load": (load0, os.getloadavg()[0]),
            "facts": facts,
        }
        REPORT_META.write_text(json.dumps(report_meta, indent=2) + "\n")
        write_report(facts, report_meta)
        print(f"\nwrote {RESULTS_MD.relative_to(ROOT)}")
    print(f"run_all: {len(names)} benchmark(s) in {elapsed / 60:.1f} min, {failures} failed run(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
