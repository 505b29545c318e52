"""The small HTTP servers of a worker (probes, metrics): bound as the worker is built.

Loopback by default; ``--probe-address`` / ``--metrics-address`` (or the
``celery_ext_probe_address`` / ``celery_ext_metrics_address`` settings) choose
another, IPv4 or IPv6 (``0.0.0.0`` or ``::`` for every interface, as a Kubernetes
``httpGet`` probe or a Prometheus scrape of the pod's IP needs).

Example::

    server = listen("--probe-port", "--probe-address", "0.0.0.0", 8001, Handler)
    print(url_of(server))   # http://0.0.0.0:8001
"""

from __future__ import annotations

import errno
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import PortInUse

__all__ = ["listen", "url_of"]


def listen(
    port_flag: str,
    address_flag: str,
    address: str,
    port: int,
    handler: type[BaseHTTPRequestHandler],
) -> ThreadingHTTPServer:
    """A threading HTTP server on ``address``:``port``, serving from a daemon thread.

    A port another process holds, or an address this host does not have, raises
    :class:`~celery_ext.errors.PortInUse` naming the flag: one line at worker start.

    Example::

        server = listen("--metrics-port", "--metrics-address", "127.0.0.1", 0, Handler)
    """

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        daemon_threads = True

    try:
        server = Server((address, port), handler)
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
        raise PortInUse(
            port_flag if in_use else address_flag,
            address,
            port,
            exc.strerror or exc,
            taken=in_use,
        ) from exc
    threading.Thread(
        target=server.serve_forever, name=f"celery_ext{port_flag[1:]}", daemon=True
    ).start()
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    """``http://host:port`` of a server from :func:`listen` (IPv6 hosts in brackets).

    Example::

        url_of(server)   # 'http://[::]:9808'
    """
    host, port = server.server_address[:2]
    host = host.decode() if isinstance(host, bytes) else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
