"""Seeing celery_ext at work: Flower in-process for the local lane.

Flower normally runs as ``celery -A app flower``, a separate process that
reads events from the broker. The local lane lives in one process, so
:func:`start_flower` runs Flower in a thread of that process instead, on
loopback by default. Everything Flower shows for a remote broker (workers,
task events, the task list) it shows for the lane.

Example::

    flower = start_flower(app, port=5555)
    print(flower.url)        # http://127.0.0.1:5555
    ...
    flower.stop()
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
import uuid
from typing import Any

from celery import Celery

__all__ = ["FlowerServer", "start_flower"]


class FlowerServer:
    """A Flower web app running in a background thread of this process.

    Example::

        with start_flower(app, port=0) as flower:
            urllib.request.urlopen(flower.url + "/healthcheck")
    """

    def __init__(self, app: Celery, port: int, address: str, **options: Any) -> None:
        self.app = app
        self.address = address
        self.port = port
        self._options = options
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: Any = None
        self._flower: Any = None
        self._thread = threading.Thread(target=self._run, name="celery_ext-flower", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def _run(self) -> None:
        from flower.app import Flower
        from flower.options import default_options
        from flower.urls import settings
        from tornado.ioloop import IOLoop

        try:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self._loop = IOLoop.current()
            opts = types.SimpleNamespace(**default_options.as_dict())
            opts.port, opts.address = self.port, self.address
            for key, value in self._options.items():
                setattr(opts, key, value)
            self._flower = Flower(capp=self.app, options=opts, io_loop=self._loop, **settings)
            self.port = self._flower.start_http_server()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._loop.add_callback(self._ready.set)
        self._flower.start()

    def start(self, timeout: float = 10.0) -> FlowerServer:
        """Serve pages and take events before returning: what runs after ``start()``
        is on Flower's pages."""
        deadline = time.monotonic() + timeout
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"Flower did not start within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"Flower failed to start: {self._error!r}") from self._error
        self._await_events(deadline)
        return self

    def _await_events(self, deadline: float) -> None:
        # Flower subscribes to events from a thread of its own, after the HTTP server is
        # up; an event sent before that is gone (a fanout exchange keeps nothing), so a
        # task started right after start() would be missing its first events.
        probe = f"celery_ext-flower-{uuid.uuid4().hex[:8]}"
        counter = self._flower.events.state.counter
        with self.app.events.default_dispatcher(hostname=probe) as dispatcher:
            while probe not in counter:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("Flower started but received no events")
                dispatcher.send("celery_ext-flower-probe")
                time.sleep(0.05)
        self._loop.add_callback(counter.pop, probe, None)

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._flower is not None:
            self._loop.add_callback(self._flower.stop)
            self._thread.join(timeout)

    def __enter__(self) -> FlowerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_flower(
    app: Celery, port: int = 5555, address: str = "127.0.0.1", **options: Any
) -> FlowerServer:
    """Start Flower for ``app`` in this process (``port=0`` picks a free port).

    ``options`` are Flower options (``inspect_timeout``, ``max_tasks``, ...).
    Loopback by default: pass ``address="0.0.0.0"`` deliberately to expose it.

    Example::

        flower = start_flower(app, port=5555)
        print("Flower at", flower.url)
    """
    return FlowerServer(app, port, address, **options).start()
