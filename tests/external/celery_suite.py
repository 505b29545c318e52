"""Celery's own integration suite, stock and with ``celery_ext.install(app)``: what differs.

Fetches the sdist of the installed Celery (``pip download --no-binary :all:``) into a
cache dir once, keeps its ``t/`` and ``pyproject.toml`` (Celery's pytest settings), and
runs ``t/integration`` on each broker twice: stock, then with ``-p dropin_plugin``
(``install(app)`` on the suite's apps, see that module). Brokers: Redis db 8 (flushed
before each run; our own tests use 11-15) and RabbitMQ ``//`` (queue ``celery`` purged);
results in Redis db 0, where the suite's helpers read them. Prints per-broker counts,
each test whose outcome differs, and the tests failing on stock too; exits 1 when a test
passing stock fails installed, a run gives no results or hits its time cap, or the
plugin could not show celery_ext running in the worker.

Usage::

    tox -e celery-suite
    tox -e celery-suite -- --broker redis -- -k test_chord   # after a 2nd --: pytest's
    python tests/external/celery_suite.py --cache-dir /tmp/cs --run-timeout 900

Results (junit XML, logs) and the sdist stay in the cache dir: ``--cache-dir``, else
``$XDG_CACHE_HOME/celery_ext/celery-suite-cache``, else ``.tox/celery-suite-cache``.

Left out of both runs:

- ``test_backend.py``, ``test_database_backend.py``, ``test_security.py``: need Azure,
  SQLAlchemy, cryptography and their servers; ``test_cache_backend.py`` (memcached)
  skips itself.
- ``DESELECT`` below, measured on stock: the four chord errback-flag tests take 1-2.5
  min each (one fails there too); two more take 45-65 s with a rerun; the pidbox-reset
  test fails in the full session (state left by an earlier test);
  ``test_backend_leak_in_fixture_teardown.py`` runs 20 worker start/stop cycles past
  the 120 s test timeout, after which the leaked worker thread hangs every later test.

A full run (both brokers, both modes) takes about an hour on 2 cores: Celery's tests
take 1-3 s each (the manager's idle check waits out a 1 s broadcast), ~400 per run.
``--broker`` halves it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REDIS = ("127.0.0.1", 6379)
BROKER_DB = 8
BROKERS = {
    "redis": f"redis://{REDIS[0]}:{REDIS[1]}/{BROKER_DB}",
    "amqp": "pyamqp://guest:guest@127.0.0.1:5672//",
}
# db 0: the suite's own helpers (get_redis_connection) read result keys there.
BACKEND = f"redis://{REDIS[0]}:{REDIS[1]}/0"
MODES = ("stock", "installed")
IGNORE = ("test_backend.py", "test_database_backend.py", "test_security.py")
# Deselected on both runs: stock takes a minute or more on each (errback waits), or
# leaves a hang behind. Seconds measured on stock Redis here.
_CHORD = "t/integration/test_canvas.py::test_chord::"
DESELECT = {
    f"{_CHORD}test_disabling_flag_allow_error_cb_on_chord_header": "142 s, fails on stock",
    f"{_CHORD}test_enabling_flag_allow_error_cb_on_chord_header": "84 s",
    f"{_CHORD}test_flag_allow_error_cb_on_chord_header_on_upgraded_chord": "67 s",
    f"{_CHORD}test_error_propagates_from_chord": "61 s",
    f"{_CHORD}test_nested_chord_header_link_error": "43 s with a rerun on stock",
    "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas": (
        "66 s with a rerun on stock"
    ),
    # Passes alone; in the full session a task_join_will_block flag left by an earlier
    # test makes it fail on stock after 6 tries.
    "t/integration/test_worker.py::test_pidbox_reset_after_repeated_control_errors": "45 s",
    # 20 embedded worker start/stop cycles: over 120 s here, and its timeout leaves a
    # worker thread running that hangs the session worker of every later test.
    "t/integration/test_backend_leak_in_fixture_teardown.py": "> 120 s, then hangs the rest",
}
BAD = ("failed", "error")


@dataclass
class Run:
    """One pytest run: each test's outcome and detail, how it ended, how long it took."""

    outcomes: dict[str, tuple[str, str]]
    summary: str
    seconds: float
    log: Path
    note: str = ""


def fetch_suite(cache: Path) -> Path:
    """The extracted sdist of the installed Celery (``t/``, ``pyproject.toml``), cached."""
    release = version("celery")
    src = cache / f"celery-{release}"
    if (src / "t" / "integration" / "conftest.py").exists():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp]
        subprocess.run([*pip, "--no-binary", ":all:", f"celery=={release}"], check=True)
        (sdist,) = Path(tmp).glob("celery-*.tar.gz")
        out = Path(tmp) / "out"
        top = f"celery-{release}"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if not member.isfile() or path.parts[0] != top or ".." in path.parts:
                    continue
                inner = path.relative_to(top)
                if inner.parts[0] != "t" and str(inner) != "pyproject.toml":
                    continue
                target = out / inner
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
        out.rename(src)
    return src


def flush_redis(db: int) -> None:
    """FLUSHDB on our broker db: no message or unacked entry of an earlier run survives."""
    with socket.create_connection(REDIS, timeout=10) as sock:
        sock.sendall(f"SELECT {db}\r\nFLUSHDB\r\n".encode())
        reply = b""
        while reply.count(b"\r\n") < 2:
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
    if reply != b"+OK\r\n+OK\r\n":
        raise RuntimeError(f"Redis FLUSHDB on db {db}: {reply!r}")


def clean_broker(broker: str) -> None:
    flush_redis(BROKER_DB)
    if broker == "amqp":  # the suite's one queue, 'celery', on the default vhost
        subprocess.run(
            [sys.executable, "-m", "celery", "-b", BROKERS[broker], "purge", "-f"],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def read_junit(path: Path) -> dict[str, tuple[str, str]]:
    """``{node: (outcome, detail)}``; outcome is passed, failed, error or skipped."""
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).iter("testcase"):
        node = f"{case.get('classname')}::{case.get('name')}"
        outcome, detail = "passed", ""
        for kind in ("skipped", "error", "failure"):  # the last found wins: failure first
            found = case.find(kind)
            if found is not None:
                outcome = "failed" if kind == "failure" else kind
                detail = f"{found.get('message', '')}\n{found.text or ''}".strip()
        outcomes[node] = (outcome, detail)
    return outcomes


def run_suite(src: Path, out: Path, broker: str, mode: str, args: argparse.Namespace) -> Run:
    name = f"{broker}-{mode}"
    junit, log, report = (out / f"{name}{ext}" for ext in (".xml", ".log", ".json"))
    for path in (junit, report):
        path.unlink(missing_ok=True)
    clean_broker(broker)
    env = dict(
        os.environ,
        TEST_BROKER=BROKERS[broker],
        TEST_BACKEND=BACKEND,
        REDIS_HOST=REDIS[0],
        REDIS_PORT=str(REDIS[1]),
        # As Celery's tox.ini: test_trace_log_arguments reads the worker's INFO lines.
        WORKER_LOGLEVEL="INFO",
        # Subprocess tests run `celery` from PATH.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    # celery.contrib.pytest registers the `celery` marker (pytest-celery would, in Celery's CI).
    cmd = [sys.executable, "-m", "pytest", "t/integration", "-p", "celery.contrib.pytest"]
    if mode == "installed":
        cmd += ["-p", "dropin_plugin"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env["CELERY_EXT_DROPIN_REPORT"] = str(report)
    cmd += [f"--junitxml={junit}", f"--timeout={args.test_timeout}", "-p", "no:cacheprovider"]
    cmd += ["-o", "junit_logging=no", "-rfER", "-q"]  # R: reruns (flaky on this run)
    cmd += [f"--ignore=t/integration/{file}" for file in IGNORE]
    cmd += [f"--deselect={node}" for node in DESELECT]
    cmd += args.pytest_args
    print(f"--- {name}: {' '.join(cmd[2:])}", flush=True)
    started, note = time.monotonic(), ""
    with log.open("w") as sink:
        # Own session: prefork children and subprocess workers go with it at the end.
        proc = subprocess.Popen(
            cmd, cwd=src, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            note = f"stopped after {args.run_timeout}s"
            os.killpg(proc.pid, signal.SIGINT)  # pytest still writes its junitxml
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    lines = log.read_text(errors="replace").strip().splitlines()
    summary = lines[-1] if lines else "(no output)"
    outcomes = read_junit(junit) if junit.exists() else {}
    if not outcomes:
        note = note or f"no results (exit {proc.returncode})"
    if mode == "installed":
        note = "; ".join(filter(None, [note, check_dropin(report)]))
    print(f"    {summary} [{seconds:.0f}s] {note}", flush=True)
    return Run(outcomes, summary, seconds, log, note)


def check_dropin(report: Path) -> str:
    """'' when the plugin showed celery_ext running in a worker, else what went wrong."""
    if not report.exists():
        return "no drop-in report from dropin_plugin"
    data = json.loads(report.read_text())
    workers = data["workers"]
    print(f"    celery_ext installed on {data['installed_apps']} apps", flush=True)
    for worker in workers:
        for kind in ("worker_steps", "consumer_steps"):
            steps = worker[kind]
            print(
                f"    {worker['hostname']} {kind}: {len(steps['expected'])} celery_ext steps"
                f" built, enabled: {', '.join(steps['enabled'])}"
            )
        print(
            f"    {worker['hostname']} inspect stats has celery_ext rows: {worker['stats_section']}"
            f"; broker_transport: {worker['broker_transport']}"
        )
    return "" if workers else "no worker was verified to run celery_ext"


def excerpt(detail: str, lines: int) -> str:
    """The message, then the traceback's ``E`` lines and where it was raised."""
    text = detail.strip().splitlines()
    errors = [line for line in text[1:] if line.startswith("E ") and line[1:].strip()][:lines]
    where = [line for line in text if line.rstrip().endswith("Error")][-1:]
    return "\n".join("        " + line for line in text[:1] + errors + where)


def report(runs: dict[tuple[str, str], Run], brokers: list[str], lines: int) -> bool:
    """Print the comparison; True when installed broke nothing that passes stock."""
    ok = True
    print(
        f"\n{'broker':8} {'run':10} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8}"
        f" {'time':>6}  note"
    )
    for broker in brokers:
        for mode in MODES:
            run = runs[broker, mode]
            counts = Counter(outcome for outcome, _ in run.outcomes.values())
            print(
                f"{broker:8} {mode:10} {counts['passed']:7} {counts['failed']:7}"
                f" {counts['error']:7} {counts['skipped']:8} {run.seconds:5.0f}s  {run.note}"
            )
            ok = ok and not run.note
    for broker in brokers:
        stock, installed = runs[broker, "stock"], runs[broker, "installed"]
        print(f"\n== {broker}: tests whose outcome differs (stock -> installed)")
        differ = 0
        for node in sorted(stock.outcomes.keys() | installed.outcomes.keys()):
            before, _ = stock.outcomes.get(node, ("missing", ""))
            after, detail = installed.outcomes.get(node, ("missing", ""))
            if before == after:
                continue
            differ += 1
            regression = before == "passed" and (after in BAD or after == "missing")
            ok = ok and not regression
            print(f"  {'REGRESSION ' if regression else ''}{node}: {before} -> {after}")
            if after in BAD:
                print(excerpt(detail, lines))
        if not differ:
            print("  none")
        print(f"\n== {broker}: failing on stock too (log: {stock.log})")
        bad = [(node, o) for node, o in sorted(stock.outcomes.items()) if o[0] in BAD]
        for node, (outcome, detail) in bad:
            print(
                f"  {node}: {outcome} (installed: {installed.outcomes.get(node, ('missing',))[0]})"
            )
            print(excerpt(detail, min(lines, 3)))
        if not bad:
            print("  none")
    return ok


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ours, pytest_args = argv[:split], argv[split + 1 :]  # after `--`: pytest's
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg, "celery_ext") if xdg else ROOT / ".tox"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=cache / "celery-suite-cache")
    parser.add_argument("--broker", action="append", choices=list(BROKERS))
    parser.add_argument("--test-timeout", type=int, default=120, help="seconds, per test")
    parser.add_argument("--run-timeout", type=int, default=1500, help="seconds, per pytest run")
    parser.add_argument("--traceback-lines", type=int, default=12)
    args = parser.parse_args(ours)
    args.pytest_args = pytest_args
    brokers = args.broker or list(BROKERS)
    started = time.monotonic()
    src = fetch_suite(args.cache_dir.resolve())
    out = args.cache_dir.resolve() / "results"
    out.mkdir(exist_ok=True)
    print(f"Celery {version('celery')} suite at {src}; results in {out}", flush=True)
    runs = {(b, m): run_suite(src, out, b, m, args) for b in brokers for m in MODES}
    ok = report(runs, brokers, args.traceback_lines)
    print(f"\n{'OK' if ok else 'FAILED'}: {time.monotonic() - started:.0f}s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
