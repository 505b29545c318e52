"""Readiness and liveness probes for orchestrators: HTTP on loopback, or a file.

Opt-in, per worker (``celery worker --probe-port 8001`` / ``--probe-file
/tmp/worker.ready``, or the ``celery_ext_probe_port`` / ``celery_ext_probe_file``
settings):

- **ready**: the worker consumes and is not shutting down (false while a drain
  runs, while reconnecting to the broker, before the first connection);
- **live**: the consumer's event loop ran within ``probe_stale_after`` seconds
  (a timer on the loop beats every second or so; a loop stuck in a blocking
  call stops it).

HTTP: ``GET /ready`` and ``GET /live`` answer 200 or 503 with a small JSON
body; the server binds ``--probe-address`` (127.0.0.1 by default; ``0.0.0.0`` for a
Kubernetes ``httpGet`` probe, which the kubelet sends to the pod's IP) as the worker
is built: a port another
process holds stops the worker's start with :class:`~celery_ext.errors.PortInUse`
(one ``Error:`` line naming the flag and the port). File: the file exists while the worker
is ready and its mtime is refreshed at every beat, so an exec probe can check
both (``test $(( $(date +%s) - $(stat -c %Y f) )) -lt 30``).

Example::

    celery -A shop worker --probe-port 8001
    curl -f http://127.0.0.1:8001/ready
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import bootsteps

from ._http import listen, url_of
from ._settings import settings_of
from .consumer_state import state_of

__all__ = ["Probes"]

logger = logging.getLogger(__name__)


class Probes(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step serving readiness/liveness; see the module docs.

    Example::

        app.conf.celery_ext_probe_port = 8001   # before celery_ext.install(app)
    """

    name = "celery_ext.probes.Probes"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(
        self,
        c: Any,
        probe_port: int | None = None,
        probe_file: str | None = None,
        probe_address: str | None = None,
        **kwargs: Any,
    ) -> None:
        settings = settings_of(c.app)
        self.port = settings.probe_port if probe_port is None else probe_port
        self.address = settings.probe_address if probe_address is None else probe_address
        self.path = settings.probe_file if probe_file is None else probe_file
        self.stale_after_s = settings.probe_stale_after
        self.enabled = self.port is not None or self.path is not None
        self.consumer: Any = None
        self.consuming = False
        self.last_beat = time.monotonic()
        self.server: ThreadingHTTPServer | None = None
        self._beat_entry: Any = None
        super().__init__(c, **kwargs)
        if self.port is not None:
            # Bound as the worker is built: a taken port stops the start with one
            # clear line, instead of a consumer restarting on an "OSError" forever.
            self._serve_http(self.port)

    # -- state ------------------------------------------------------------------------
    def ready(self) -> bool:
        """Consuming, and neither shutting down nor reconnecting."""
        c = self.consumer
        worker = getattr(c, "controller", None)
        state = getattr(getattr(worker, "blueprint", None), "state", bootsteps.RUN)
        shutting_down = state != bootsteps.RUN
        return self.consuming and not shutting_down

    def live(self) -> bool:
        """The consumer's event loop ran recently."""
        return time.monotonic() - self.last_beat < self.stale_after_s

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready(),
            "live": self.live(),
            "last_beat_s_ago": round(time.monotonic() - self.last_beat, 3),
            "hostname": getattr(self.consumer, "hostname", None),
        }

    # -- bootstep ---------------------------------------------------------------------
    def start(self, c: Any) -> None:
        if not self.enabled:
            return
        self.consumer = c
        state_of(c).probes = self  # the drain marks the worker not ready first thing
        self.consuming = True
        self.last_beat = time.monotonic()
        if self._beat_entry is None:
            every = max(0.05, min(1.0, self.stale_after_s / 3))
            self._beat_entry = c.timer.call_repeatedly(every, self._beat)
        self._beat()

    def stop(self, c: Any) -> None:
        if not self.enabled:
            return
        self.consuming = False  # reconnecting or shutting down: not ready
        if self._beat_entry is not None:
            self._beat_entry.cancel()
            self._beat_entry = None
        self._write_file()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def section(self) -> dict[str, Any]:
        """Its part of the ``celery_ext`` section of ``inspect stats`` (see :mod:`.metrics`)."""
        return {"port": self.port, "file": self.path, **self.status()}

    # -- beats, file and HTTP ----------------------------------------------------------------
    def _beat(self) -> None:
        self.last_beat = time.monotonic()
        self._write_file()

    def _write_file(self) -> None:
        if not self.path:
            return
        try:
            if self.ready():
                tmp = f"{self.path}.tmp"
                with open(tmp, "w") as f:
                    json.dump(self.status(), f)
                os.replace(tmp, self.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        except OSError:
            logger.warning(
                "celery_ext: could not write the probe file %s", self.path, exc_info=True
            )

    def _serve_http(self, port: int) -> None:
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                checks = {"/ready": probes.ready, "/live": probes.live}
                check = checks.get(self.path.split("?")[0])
                if check is None:
                    self.send_error(404, "try /ready or /live")
                    return
                body = json.dumps(probes.status()).encode()
                self.send_response(200 if check() else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # orchestrators poll often: keep the worker log quiet

        self.server = listen("--probe-port", "--probe-address", self.address, port, Handler)
        self.port = self.server.server_address[1]
        logger.info("celery_ext: probes on %s/ready and /live", url_of(self.server))
