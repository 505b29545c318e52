"""An ASGI service (Starlette on uvicorn) that answers 202 at once and sends emails
in the background, or 503 at once when its queue is full: never a hanging client.

The local lane (``local://``) does the "accept, enqueue, answer fast" job with
no broker server: a :class:`celery_ext.LocalWorker` started and drained in the
app's lifespan runs the tasks in this process, the lane is bounded
(``--max-queued``) and a full lane makes ``.delay()`` raise
:class:`celery_ext.QueueFull`, answered here with ``503`` and ``Retry-After``.
Bodies over 16 KiB get ``413``, malformed ones ``400``. Ctrl-C or SIGTERM: uvicorn
stops taking requests, the lifespan drains the queued emails
(``--drain-timeout``) and prints what the drain did. Sending is simulated (0.2 s).

Copy the pattern: ``lifespan`` below is all a web app needs.

Run::

    .venv/bin/python examples/email_service.py --max-queued 50 --concurrency 4

    curl -X POST localhost:8000/emails -d '{"to": "a@example.com", "subject": "hi"}'
    curl -X POST 'localhost:8000/burst?n=200'     # 200 enqueues at once: see 503s
    curl localhost:8000/stats

``--flower 5555`` also runs Flower in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from celery import Celery, signals
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import celery_ext
from celery_ext.lane import lane_of

SEND_TIME_S = 0.2
MAX_BURST = 10_000
MAX_BODY_BYTES = 16 * 1024

celery_app = Celery("email_service", broker="local://")


@celery_app.task  # type: ignore[untyped-decorator]  # celery ships no type hints
def send_email(to: str, subject: str) -> None:
    """Pretend to send an email."""
    time.sleep(SEND_TIME_S)
    print(f"sent to={to!r} subject={subject!r}", flush=True)


class Service:
    """Enqueues emails and counts what happened to them."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.lane = lane_of(app)
        self.queue: str = app.conf.task_default_queue
        self.accepted = self.rejected = self.sent = 0
        self._lock = threading.Lock()  # tasks finish on the worker's threads
        signals.task_success.connect(self._on_success, weak=False)

    def _on_success(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app and sender.name == send_email.name:
            with self._lock:
                self.sent += 1

    def enqueue(self, to: str, subject: str) -> JSONResponse:
        """Enqueue one email: 202 with its id, or 503 at once when the lane is full."""
        try:
            result = send_email.delay(to, subject)  # in memory: never waits (policy "raise")
        except celery_ext.QueueFull as exc:
            with self._lock:
                self.rejected += 1
            body = {"error": "queue full", "queue": exc.queue, "limit": exc.limit}
            return JSONResponse({**body, "depth": exc.depth}, 503, {"Retry-After": "1"})
        with self._lock:
            self.accepted += 1
        return JSONResponse({"id": result.id, "queued": self.lane.depth(self.queue)}, 202)

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = {"accepted": self.accepted, "rejected": self.rejected, "sent": self.sent}
        return {**counts, "queued": self.lane.depth(self.queue), "limit": self.lane.max_queued}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


async def read_body(request: Request) -> bytes | JSONResponse:
    """The body, or 413 past MAX_BODY_BYTES (declared or streamed) without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        return error(400, f"Content-Length {declared!r} is not a number")
    if declared is not None and int(declared) > MAX_BODY_BYTES:
        return error(413, f"body over {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return error(413, f"body over {MAX_BODY_BYTES} bytes")
    return body


async def emails(request: Request) -> JSONResponse:
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    try:
        data = json.loads(body)
    except ValueError as exc:
        return error(400, f"body is not JSON: {exc}")
    fields = ("to", "subject")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in fields):
        return error(400, 'expected {"to": "<str>", "subject": "<str>"}')
    service: Service = request.app.state.service
    return service.enqueue(data["to"], data["subject"])


async def burst(request: Request) -> JSONResponse:
    n = request.query_params.get("n", "200")
    if not n.isdigit() or not 1 <= int(n) <= MAX_BURST:
        return error(400, f"n must be an integer in 1..{MAX_BURST}")
    service: Service = request.app.state.service
    codes = [
        service.enqueue(f"user{i}@example.com", f"burst {i}").status_code for i in range(int(n))
    ]
    return JSONResponse({"accepted": codes.count(202), "rejected": codes.count(503)})


async def stats(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    return JSONResponse(service.stats())


def create_app(args: argparse.Namespace, url: str) -> Starlette:
    """The web app; its lifespan starts the lane worker and drains it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(web: Starlette) -> AsyncIterator[None]:
        worker = celery_ext.LocalWorker(celery_app, concurrency=args.concurrency).start()
        flower = celery_ext.start_flower(celery_app, port=args.flower) if args.flower else None
        web.state.service = service = Service(celery_app)
        announce(url, flower.url if flower else None)
        yield
        # uvicorn has stopped taking requests: let the queued emails go out.
        if flower:
            flower.stop()
        pending = service.accepted - service.sent  # queued or running now
        sent_before = service.sent
        print(
            f"stopping: draining {pending} email(s), up to {args.drain_timeout:g}s ...", flush=True
        )
        report = await asyncio.to_thread(worker.stop, timeout=args.drain_timeout)
        sent, dropped = service.sent - sent_before, report.dropped
        print(
            f"drained: sent={sent} dropped={dropped} in {report.waited_s:.1f}s "
            f"(of {pending} queued or running; {service.sent} sent since start)",
            flush=True,
        )

    routes = [
        Route("/emails", emails, methods=["POST"]),
        Route("/burst", burst, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def announce(url: str, flower_url: str | None) -> None:
    print(f"listening on {url}", flush=True)
    print(
        f'  curl -X POST {url}/emails -d \'{{"to": "a@example.com", "subject": "hi"}}\'\n'
        f"  curl -X POST '{url}/burst?n=200'    # overflows the queue: 503s\n"
        f"  curl {url}/stats\n"
        + (f"  Flower: {flower_url}\n" if flower_url else "")
        + "  Ctrl-C to stop (queued emails are drained first)",
        flush=True,
    )


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
    celery_ext.install(celery_app, lane_max_queued=args.max_queued, lane_full_policy="raise")
    if args.flower is not None:
        celery_app.conf.worker_send_task_events = True
        celery_app.conf.task_send_sent_event = True
    # Bound here (a busy port fails at once, --port 0 is known before the lifespan runs),
    # with a backlog for thousands of clients arriving at once.
    sock = socket.create_server((args.host, args.port), backlog=4096)
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(create_app(args, url), log_level="warning", lifespan="on")
    # uvicorn handles Ctrl-C and SIGTERM (a graceful shutdown, then the lifespan's
    # drain) and raises the signal again once done, for the handlers it found: make
    # those no-ops, so a drained service exits with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
