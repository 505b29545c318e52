"""Plugin overhead: no-op task throughput of a `celery worker`, stock Celery vs celery_ext.

Same broker, same pool, same concurrency, same task, same measurement; the only
difference is ``celery_ext.install(app)`` (no options) in the worker's app
(``benchmarks/overhead_app.py``) and in the publishing app. One run:

1. publish ``--tasks`` no-op tasks (``ignore_result``) to a fresh queue with the
   variant's own app, no worker running (publish calls/s is reported too);
2. start ``celery worker -P <pool> -c <concurrency>`` on that queue (a subprocess);
3. the task counts itself in shared memory and writes a wall-clock mark to Redis at
   task 1, ``--warmup`` and the last one; throughput = (tasks - warmup) / (last - warmup
   mark), i.e. steady state after the worker warmed up; the worker's CPU (main process
   and children, from ``/proc``) is sampled at the same two marks: CPU µs per task.

Runs are interleaved: every round runs every (broker, pool) pair, stock and celery_ext
back to back, alternating which goes first, so drift and the noise of other processes
on the machine fall on both sides alike. Reported: medians over rounds and the median
of the per-round ratios celery_ext / stock. Target: >= 0.97 on Redis and RabbitMQ.

Optionally (``--local``) the same count on celery_ext's in-process local lane
(``LocalWorker``, threads pool), which has no stock counterpart. ``--profile DIR`` runs
one round with every worker thread (and prefork child) under cProfile and prints where
celery_ext's code spends its time, per task (cProfile slows everything down: read the
profile for proportions, the normal run for rates). Profile mode skips celery_ext's
per-task ``PyThreadState_SetAsyncExc(ident, NULL)`` on the threads pool, which under any
profile or trace function nearly stalls that pool (see ``overhead_app.py``).

Run::

    .venv/bin/python benchmarks/overhead.py                 # 5 rounds x 10,000 tasks, 15-20 min
    .venv/bin/python benchmarks/overhead.py --quick         # 3 rounds x 5,000, threads only
    .venv/bin/python benchmarks/overhead.py --brokers redis --pools threads --rounds 7
    .venv/bin/python benchmarks/overhead.py --profile /tmp/ovh --brokers redis --pools threads

Results: ``benchmarks/results/overhead.json`` (``--json PATH``) and a markdown table on
stdout. Uses Redis db 13 and unique queue names; deletes its queues and keys.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import celery
import kombu
import redis
from celery import Celery
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import celery_ext  # noqa: E402
from benchmarks._cleanup import forget_redis_queue  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "overhead.json"
REDIS = "redis://127.0.0.1:6379/13"
BROKERS = {"redis": REDIS, "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
VARIANTS = ("stock", "celery_ext")
TARGET = 0.97
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children (prefork)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) * TICK_S
    return total


def depth(conn: Connection, queue: str) -> int:
    if conn.transport.driver_type == "redis":
        return int(conn.default_channel.client.llen(queue))
    return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def publish(broker: str, queue: str, variant: str, n: int) -> float:
    """Publish ``n`` no-ops with the variant's own app; return calls/s."""
    app = Celery(f"overhead_client_{queue[-8:]}", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)
    if variant == "celery_ext":
        celery_ext.install(app)

    @app.task(name="overhead.noop", shared=False)  # type: ignore[untyped-decorator]
    def noop() -> None:
        pass

    try:
        start = time.perf_counter()
        for _ in range(n):
            noop.delay()
        elapsed = time.perf_counter() - start
        with app.connection_for_write() as conn:  # unconfirmed AMQP publishes: settle
            deadline = time.monotonic() + 30
            while depth(conn, queue) < n and time.monotonic() < deadline:
                time.sleep(0.05)
            if (got := depth(conn, queue)) != n:
                raise RuntimeError(f"{variant}: {got} queued, expected {n}")
        return n / elapsed
    finally:
        app.close()


def cleanup(broker: str, queue: str, name: str, marks: redis.Redis) -> None:
    """Delete the run's queue, exchange, bindings, marks, lease and pidbox keys."""
    for key in marks.scan_iter(match=f"{queue}.*"):
        marks.delete(key)
    if broker.startswith("redis"):
        forget_redis_queue(marks, queue, [name])
        for key in marks.scan_iter(match=f"*lease*{name}*"):
            marks.delete(key)
        return
    with Connection(broker) as conn:
        conn.default_channel.queue_delete(queue)
        conn.default_channel.exchange_delete(queue)


def wait_mark(marks: redis.Redis, key: str, worker: subprocess.Popen[bytes], until: float) -> float:
    """Poll Redis for a mark the worker writes; return its wall-clock value."""
    while True:
        value = marks.get(key)
        if value is not None:
            return float(value)
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode} before {key}")
        if time.monotonic() > until:
            raise RuntimeError(f"no {key} within the deadline")
        time.sleep(0.005)


def run_once(args: argparse.Namespace, broker_key: str, pool: str, variant: str) -> dict[str, Any]:
    """One worker run: publish, start the worker, time the steady state."""
    token = uuid.uuid4().hex[:8]
    queue = f"overhead.bench.{token}"
    broker = BROKERS[broker_key]
    marks = redis.Redis.from_url(REDIS)
    name = f"overhead-{token}@localhost"
    env = dict(
        os.environ,
        OVH_BROKER=broker,
        OVH_QUEUE=queue,
        OVH_VARIANT=variant,
        OVH_MARKS=REDIS,
        OVH_WARMUP=str(args.warmup),
        OVH_TOTAL=str(args.tasks),
    )
    if args.profile:
        env["OVH_PROFILE"] = str(args.profile / f"{broker_key}-{pool}-{variant}")
    cmd = [
        *(sys.executable, "-m", "celery", "-A", "benchmarks.overhead_app", "worker"),
        *("-P", pool, "-c", str(args.concurrency), "-Q", queue, "-n", name),
        *("--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "ERROR"),
    ]
    worker: subprocess.Popen[bytes] | None = None
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    try:
        publish_rate = publish(broker, queue, variant, args.tasks)
        worker = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log)
        until = time.monotonic() + 60 + args.tasks / 50
        first = wait_mark(marks, f"{queue}.first", worker, until)
        warm = wait_mark(marks, f"{queue}.warm", worker, until)
        cpu0 = cpu_s(worker.pid)
        end = wait_mark(marks, f"{queue}.end", worker, until)
        cpu1 = cpu_s(worker.pid)
        steady = args.tasks - args.warmup
        return {
            "broker": broker_key,
            "pool": pool,
            "variant": variant,
            "tasks": args.tasks,
            "warmup": args.warmup,
            "tasks_per_s": steady / (end - warm),
            "tasks_per_s_incl_warmup": (args.tasks - 1) / (end - first),
            "cpu_us_per_task": 1e6 * (cpu1 - cpu0) / steady,
            "publish_per_s": publish_rate,
        }
    except Exception:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-4000:])
        raise
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        log.close()
        cleanup(broker, queue, name, marks)


def run_local(args: argparse.Namespace) -> dict[str, Any]:
    """The same count on celery_ext's local lane: LocalWorker (threads), in this process."""
    app = Celery("overhead_local", broker="local://", set_as_current=False)
    app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)
    celery_ext.install(app, lane_max_queued=args.tasks + 100)
    lock, done = threading.Lock(), threading.Event()
    state: dict[str, Any] = {"n": 0}

    @app.task(name="overhead.noop", shared=False)  # type: ignore[untyped-decorator]
    def noop() -> None:
        with lock:
            state["n"] += 1
            n = state["n"]
        if n in (args.warmup, args.tasks):
            state[n] = (time.perf_counter(), time.process_time())
            if n == args.tasks:
                done.set()

    start = time.perf_counter()
    for _ in range(args.tasks):
        noop.delay()
    publish_rate = args.tasks / (time.perf_counter() - start)
    with celery_ext.LocalWorker(app, concurrency=args.concurrency, loglevel="ERROR"):
        if not done.wait(60 + args.tasks / 50):
            raise RuntimeError(f"local lane: {state['n']}/{args.tasks} tasks done")
    (t0, c0), (t1, c1) = state[args.warmup], state[args.tasks]
    steady = args.tasks - args.warmup
    return {
        "broker": "local",
        "pool": "threads",
        "variant": "celery_ext",
        "tasks": args.tasks,
        "warmup": args.warmup,
        "tasks_per_s": steady / (t1 - t0),
        "cpu_us_per_task": 1e6 * (c1 - c0) / steady,
        "publish_per_s": publish_rate,
    }


def _load_profile(prefix: Path) -> tuple[dict[Any, Any], int]:
    """Merged pstats entries of one run's ``<prefix>-<pid>.prof`` files, and their count."""
    files = sorted(prefix.parent.glob(f"{prefix.name}-*.prof"))
    if not files:
        return {}, 0
    return pstats.Stats(*map(str, files)).stats, len(files)  # type: ignore[attr-defined]


def _where(func: tuple[str, int, str]) -> str:
    path, line, name = func
    shown = Path(path).relative_to(ROOT) if path.startswith(str(ROOT)) else path
    shown = str(shown).split("site-packages/")[-1]
    return f"{shown}:{line}({name})"


def profile_report(stock: Path, ext: Path, tasks: int, top: int = 20) -> str:
    """CPU per task by function: celery_ext's own code, and the largest self-time deltas."""
    base, n_base = _load_profile(stock)
    prof, n_prof = _load_profile(ext)
    if not prof or not base:
        return f"{ext.name}: no profile written"
    per = 1e6 / tasks
    # Fewer than 10 calls: start-up, or a thread loop still blocked when the profile was
    # taken (its CPU timer was then read from another thread: meaningless). Left out.
    base = {f: v for f, v in base.items() if v[1] >= 10}
    prof = {f: v for f, v in prof.items() if v[1] >= 10}
    ours = [(f, v) for f, v in prof.items() if f"{os.sep}celery_ext{os.sep}" in f[0]]
    total = {k: sum(v[2] for v in d.values()) * per for k, d in (("s", base), ("e", prof))}
    lines = [
        f"{ext.name} ({n_prof} process(es)) vs stock ({n_base}): profiled CPU "
        f"{total['e']:,.0f} vs {total['s']:,.0f} µs/task; celery_ext's own code "
        f"{sum(v[2] for _, v in ours) * per:,.1f} µs/task self time",
        f"  {'cum µs':>9} {'self µs':>8} {'calls':>6}  per task, celery_ext functions",
    ]
    ours.sort(key=lambda item: item[1][3], reverse=True)
    for func, (_, calls, tt, ct, _) in ours[:top]:
        lines.append(f"  {ct * per:>9,.1f} {tt * per:>8,.1f} {calls / tasks:>6.2f}  {_where(func)}")
    lines.append(f"  {'delta µs':>9} {'stock':>8} {'ext':>8}  self time per task, largest changes")
    funcs = set(base) | set(prof)
    delta = {f: (prof.get(f, (0, 0, 0.0))[2] - base.get(f, (0, 0, 0.0))[2]) * per for f in funcs}
    for func in sorted(funcs, key=lambda f: abs(delta[f]), reverse=True)[:top]:
        was, now = (d.get(func, (0, 0, 0.0))[2] * per for d in (base, prof))
        lines.append(f"  {delta[func]:>+9,.1f} {was:>8,.1f} {now:>8,.1f}  {_where(func)}")
    return "\n".join(lines)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (broker, pool, variant) and the per-round ext/stock ratios."""
    out = []
    pairs = dict.fromkeys((r["broker"], r["pool"]) for r in runs)
    for broker, pool in pairs:
        by = {
            v: [r for r in runs if (r["broker"], r["pool"], r["variant"]) == (broker, pool, v)]
            for v in VARIANTS
        }
        row: dict[str, Any] = {"broker": broker, "pool": pool, "rounds": len(by["celery_ext"])}
        for v in VARIANTS:
            if by[v]:
                for metric in ("tasks_per_s", "cpu_us_per_task", "publish_per_s"):
                    row[f"{v}_{metric}"] = statistics.median(r[metric] for r in by[v])
        if by["stock"] and by["celery_ext"]:
            paired = list(zip(by["stock"], by["celery_ext"], strict=False))
            ratios = [e["tasks_per_s"] / s["tasks_per_s"] for s, e in paired]
            row["ratio"] = statistics.median(ratios)
            row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
            row["cpu_ratio"] = statistics.median(
                e["cpu_us_per_task"] / s["cpu_us_per_task"] for s, e in paired
            )
            row["publish_ratio"] = statistics.median(
                e["publish_per_s"] / s["publish_per_s"] for s, e in paired
            )
            row["meets_target"] = row["ratio"] >= TARGET
        out.append(row)
    return out


def table(summary: list[dict[str, Any]], config: dict[str, Any]) -> str:
    lines = [
        f"{config['tasks']:,} no-op tasks per run ({config['warmup']} warm-up), "
        f"concurrency {config['concurrency']}, median of {config['rounds']} interleaved rounds",
        "",
        "| broker | pool | stock tasks/s | celery_ext tasks/s | ext / stock (min-max) "
        "| CPU µs/task stock / ext | publish calls/s stock / ext | target 0.97 |",
        "|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in summary:
        if "ratio" not in r:  # the local lane: celery_ext only
            lines.append(
                f"| {r['broker']} (celery_ext only) | {r['pool']} | - "
                f"| {r['celery_ext_tasks_per_s']:,.0f} | - "
                f"| - / {r['celery_ext_cpu_us_per_task']:,.0f} "
                f"| - / {r['celery_ext_publish_per_s']:,.0f} | - |"
            )
            continue
        lines.append(
            f"| {r['broker']} | {r['pool']} | {r['stock_tasks_per_s']:,.0f} "
            f"| {r['celery_ext_tasks_per_s']:,.0f} "
            f"| {r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
            f"| {r['stock_cpu_us_per_task']:,.0f} / {r['celery_ext_cpu_us_per_task']:,.0f} "
            f"| {r['stock_publish_per_s']:,.0f} / {r['celery_ext_publish_per_s']:,.0f} "
            f"| {'meets' if r['meets_target'] else 'BELOW'} |"
        )
    lines += [
        "",
        "tasks/s: steady state, after the warm-up tasks; ext / stock: median of the per-round "
        "ratios. CPU µs/task: the worker's CPU (main process and prefork children) over the "
        "same window, less sensitive to other load on the machine than tasks/s. Publish: "
        "`.delay()` calls/s of each variant's own app, before the worker starts.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per run")
    parser.add_argument("--warmup", type=int, default=500, help="tasks not timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--brokers", nargs="+", choices=sorted(BROKERS), default=["redis", "amqp"])
    parser.add_argument("--pools", nargs="+", default=["threads", "prefork"])
    parser.add_argument("--local", action="store_true", help="also the local lane (ext only)")
    parser.add_argument("--quick", action="store_true", help="3 rounds x 5,000, threads only")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--profile", type=Path, help="one round under cProfile, files in DIR")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.rounds, args.pools = 5000, 3, ["threads"]
    if args.profile:
        args.rounds = 1
        args.profile.mkdir(parents=True, exist_ok=True)
        for old in args.profile.glob("*.prof"):
            old.unlink()
    if not 1 < args.warmup < args.tasks:
        parser.error("need 1 < --warmup < --tasks")
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for rnd in range(args.rounds):
        order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
        for broker in args.brokers:
            for pool in args.pools:
                for variant in order:
                    row = run_once(args, broker, pool, variant)
                    runs.append({**row, "round": rnd})
                    print(
                        f"round {rnd + 1}/{args.rounds} {broker:<5} {pool:<8} {variant:<10} "
                        f"{row['tasks_per_s']:>7,.0f} tasks/s {row['cpu_us_per_task']:>5,.0f} "
                        f"CPU µs/task {row['publish_per_s']:>7,.0f} publishes/s",
                        flush=True,
                    )
        if args.local:
            runs.append({**run_local(args), "round": rnd})
    config = {k: v for k, v in vars(args).items() if k not in ("json", "profile")}
    res: dict[str, Any] = {
        "config": config,
        "env": {
            "python": platform.python_version(),
            "celery": celery.__version__,
            "kombu": kombu.__version__,
            "cpus": os.cpu_count(),
        },
        "elapsed_s": time.monotonic() - started,
        "summary": summarize(runs),
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(table(res["summary"], config))
    print(f"\nwrote {args.json}")
    if args.profile:
        for broker in args.brokers:
            for pool in args.pools:
                stock, ext = (args.profile / f"{broker}-{pool}-{v}" for v in VARIANTS)
                print(f"\n{profile_report(stock, ext, args.tasks)}")
    return res


if __name__ == "__main__":
    main()
