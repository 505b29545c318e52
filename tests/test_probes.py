"""Readiness and liveness probes of a real `celery worker` (HTTP on loopback, and a file)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.test_shutdown import ROOT, Run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe(port: int, path: str, host: str = "127.0.0.1") -> int:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as response:
            if path != "/metrics":
                json.loads(response.read())
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0  # not listening (yet, or any more)


@pytest.fixture
def run(redis_url: str, unique_queue: str) -> Run:
    r = Run(redis_url, redis_url, unique_queue)
    r.env["CELERY_EXT_TEST_STALE_AFTER"] = "1"
    yield r  # type: ignore[misc]
    r.cleanup()


def test_ready_and_live_over_http_through_a_stuck_loop_and_a_drain(
    run: Run, tmp_path: Path
) -> None:
    port, ready_file = free_port(), tmp_path / "worker.ready"
    run.start("--probe-port", str(port), "--probe-file", str(ready_file), "--drain-timeout", "30")
    wait_for(lambda: probe(port, "/ready") == 200)
    assert probe(port, "/live") == 200 and probe(port, "/nope") == 404
    assert json.loads(ready_file.read_text())["ready"] is True

    # A stuck event loop: liveness fails within the stale window, then recovers.
    run.app.control.broadcast("block_loop", arguments={"seconds": 3.0}, reply=False)
    wait_for(lambda: probe(port, "/live") == 503, timeout=5)
    wait_for(lambda: probe(port, "/live") == 200, timeout=10)

    # A drain: not ready while the in-flight task finishes, still alive.
    run.send(0, 3.0)
    wait_for(lambda: run.started() == {0})
    assert run.proc is not None
    run.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: probe(port, "/ready") == 503, timeout=5)
    wait_for(lambda: not ready_file.exists(), timeout=2)  # removed as the drain starts
    assert run.proc.poll() is None, "the worker should still be draining"
    assert run.proc.wait(30) == 0
    assert probe(port, "/ready") == 0  # the server went away with the worker
    assert run.finished() == {0}


@pytest.mark.parametrize("flag", ["--probe-port", "--metrics-port"])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_a_taken_port_stops_the_start_with_one_line_naming_flag_and_port(
    request: pytest.FixtureRequest, redis_url: str, unique_queue: str, kind: str, flag: str
) -> None:
    # It used to look like a broker outage: "Connection to broker lost ... Address
    # already in use", retried forever, the worker never ready.
    broker = redis_url if kind == "redis" else str(request.getfixturevalue("amqp_url"))
    run = Run(broker, redis_url, unique_queue)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.apps.drain_app", "worker",
            "-P", "threads", "-Q", unique_queue, flag, str(port), "-l", "WARNING",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=60
            )
        finally:
            run.cleanup()
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert f"{flag} {port}: cannot listen on 127.0.0.1:{port}" in errors[0]
    assert "Traceback" not in done.stderr and "Connection to broker lost" not in done.stderr


def test_probes_and_metrics_bound_beyond_loopback_answer_on_another_address(run: Run) -> None:
    # A kubelet probes, and Prometheus scrapes, the pod's IP: bound to 0.0.0.0 the
    # servers answer on every address of the host. Reached here as 127.0.0.2 (an
    # address the default 127.0.0.1 bind does not answer on), never an external one.
    probes, metrics = free_port(), free_port()
    run.start(
        "--probe-port", str(probes), "--probe-address", "0.0.0.0",
        "--metrics-port", str(metrics), "--metrics-address", "0.0.0.0",
    )  # fmt: skip
    wait_for(lambda: probe(probes, "/ready", host="127.0.0.2") == 200)
    assert probe(probes, "/live", host="127.0.0.2") == 200
    with urllib.request.urlopen(f"http://127.0.0.2:{metrics}/metrics", timeout=5) as response:
        assert "celery_ext_held" in response.read().decode()
    assert probe(metrics, "/nope", host="127.0.0.2") == 404  # a typo does not look healthy
    assert probe(metrics, "/", host="127.0.0.2") == 404


def test_by_default_probes_and_metrics_answer_on_loopback_only(run: Run) -> None:
    probes, metrics = free_port(), free_port()
    run.start("--probe-port", str(probes), "--metrics-port", str(metrics))
    wait_for(lambda: probe(probes, "/ready") == 200)
    assert probe(metrics, "/metrics") == 200 and probe(metrics, "/other") == 404
    assert probe(probes, "/ready", host="127.0.0.2") == 0  # nothing listens there
    assert probe(metrics, "/metrics", host="127.0.0.2") == 0


@pytest.mark.parametrize(
    ("address", "status", "expected"),
    [
        ("nope", 2, "Invalid value for '--probe-address': 'nope' is not an IP address"),
        # TEST-NET-1 (RFC 5737): no host has it, so nothing can bind it; no traffic is sent.
        ("192.0.2.1", 1, "--probe-address 192.0.2.1: cannot listen on 192.0.2.1:"),
    ],
)
def test_a_bad_probe_address_stops_the_start_with_one_line(
    run: Run, address: str, status: int, expected: str
) -> None:
    cmd = [
        sys.executable, "-m", "celery", "-A", "tests.apps.drain_app", "worker",
        "-P", "threads", "-Q", run.queue, "--probe-port", str(free_port()),
        "--probe-address", address, "-l", "WARNING", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "Traceback" not in done.stderr
