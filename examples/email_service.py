"""An HTTP service that answers 202 at once and sends emails in the background.

Shows the local lane (``local://``) doing the "accept, enqueue, answer fast"
job of a web app with no broker server: an embedded :class:`celery_ext.LocalWorker`
runs the tasks in this process, the lane is bounded (``--max-queued``) and a
full lane makes ``.delay()`` raise :class:`celery_ext.QueueFull`, turned here
into ``503`` with ``Retry-After``. Ctrl-C or SIGTERM stops taking requests,
drains the queued emails (``--drain-timeout``) and prints what was dropped.
Standard library HTTP server only; sending is simulated (0.2 s sleep).

Run::

    .venv/bin/python examples/email_service.py --max-queued 50 --concurrency 4

    curl -X POST localhost:8000/emails -d '{"to": "a@example.com", "subject": "hi"}'
    curl -X POST 'localhost:8000/burst?n=200'     # 200 enqueues at once: see 503s
    curl localhost:8000/stats

``--flower 5555`` also runs Flower in this process.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery, signals

import celery_ext
from celery_ext.local import Lane, lane_of

SEND_TIME_S = 0.2
MAX_BURST = 10_000
NO_HEADERS: Mapping[str, str] = MappingProxyType({})

Reply = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, extra headers

app = Celery("email_service", broker="local://")


@app.task  # type: ignore[untyped-decorator]  # celery ships no type hints
def send_email(to: str, subject: str) -> None:
    """Pretend to send an email."""
    time.sleep(SEND_TIME_S)
    print(f"sent to={to!r} subject={subject!r}", flush=True)


class Service:
    """Enqueues emails and counts what happened to them."""

    def __init__(self, app: Celery, lane: Lane) -> None:
        self.app = app
        self.lane = lane
        self.queue: str = app.conf.task_default_queue
        self.accepted = self.rejected = self.sent = 0
        self._lock = threading.Lock()
        signals.task_success.connect(self._on_success, weak=False)

    def _on_success(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app and sender.name == send_email.name:
            with self._lock:
                self.sent += 1

    def enqueue(self, to: str, subject: str) -> Reply:
        """Try to enqueue one email: 202 with its id, or 503 when the lane is full."""
        try:
            result = send_email.delay(to, subject)
        except celery_ext.QueueFull as exc:
            with self._lock:
                self.rejected += 1
            body = {"error": "queue full", "queue": exc.queue, "limit": exc.limit}
            return 503, {**body, "depth": exc.depth}, {"Retry-After": "1"}
        with self._lock:
            self.accepted += 1
        return 202, {"id": result.id, "queued": self.lane.depth(self.queue)}, {}

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = {"accepted": self.accepted, "rejected": self.rejected, "sent": self.sent}
        return {**counts, "queued": self.lane.depth(self.queue), "limit": self.lane.max_queued}


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = 5  # seconds a slow client may hold a request thread

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path == "/emails":
            self._emails(body)
        elif url.path == "/burst":
            self._burst(parse_qs(url.query).get("n", ["200"])[0])
        else:
            self._reply(404, {"error": f"no route POST {url.path}"})

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/stats":
            self._reply(200, self.server.service.stats())
        else:
            self._reply(404, {"error": f"no route GET {self.path}"})

    def _emails(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return self._reply(400, {"error": f"body is not JSON: {exc}"})
        fields = ("to", "subject")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in fields):
            return self._reply(400, {"error": 'expected {"to": "<str>", "subject": "<str>"}'})
        self._reply(*self.server.service.enqueue(data["to"], data["subject"]))

    def _burst(self, n: str) -> None:
        if not n.isdigit() or not 1 <= int(n) <= MAX_BURST:
            return self._reply(400, {"error": f"n must be an integer in 1..{MAX_BURST}"})
        service = self.server.service
        codes = [service.enqueue(f"user{i}@example.com", f"burst {i}")[0] for i in range(int(n))]
        self._reply(200, {"accepted": codes.count(202), "rejected": codes.count(503)})

    def _reply(
        self, status: int, body: dict[str, Any], headers: Mapping[str, str] = NO_HEADERS
    ) -> None:
        payload = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the console for task output


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for requests in flight

    def __init__(self, address: tuple[str, int], service: Service) -> None:
        super().__init__(address, Handler)
        self.service = service


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-queued", type=int, default=50, help="lane bound (default 50)")
    parser.add_argument("--concurrency", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--flower", type=int, metavar="PORT", help="also run Flower on PORT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    celery_ext.install(app, lane_max_queued=args.max_queued, lane_full_policy="raise")
    if args.flower is not None:
        app.conf.worker_send_task_events = True
        app.conf.task_send_sent_event = True
    service = Service(app, lane_of(app))
    server = Server((args.host, args.port), service)  # bind first: a busy port fails fast

    def on_sigterm(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever(), which runs in this (the main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    worker = celery_ext.LocalWorker(app, concurrency=args.concurrency).start()
    flower = celery_ext.start_flower(app, port=args.flower) if args.flower is not None else None
    url = f"http://{args.host}:{server.server_address[1]}"
    print(f"listening on {url}", flush=True)
    print(
        f'  curl -X POST {url}/emails -d \'{{"to": "a@example.com", "subject": "hi"}}\'\n'
        f"  curl -X POST '{url}/burst?n=200'    # overflows the queue: 503s\n"
        f"  curl {url}/stats\n"
        + (f"  Flower: {flower.url}\n" if flower else "")
        + "  Ctrl-C to stop (queued emails are drained first)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    if flower:
        flower.stop()
    print(f"stopping: draining up to {args.drain_timeout:g}s ...", flush=True)
    report = worker.stop(timeout=args.drain_timeout)
    sent, dropped, waited = service.sent, report.dropped, report.waited_s
    print(f"drained: sent={sent} dropped={dropped} in {waited:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
