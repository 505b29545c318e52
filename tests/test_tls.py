"""TLS brokers with celery_ext installed: ``rediss://`` and ``amqps://``, certificates checked.

A CA and a server certificate for 127.0.0.1 / localhost are made at test time
(``openssl`` CLI), and every client verifies the server
against that CA (``CERT_REQUIRED``). Over TLS, with celery_ext's bounded
transports, an embedded worker runs a task, a countdown beyond ``eta_horizon`` is
parked then runs when due, and a publish past ``queue_limits`` raises QueueFull; a
client without the CA, or without TLS, is refused (so the traffic really is TLS).

Redis: a test-owned ``redis-server`` with a TLS port only; the shared Redis is
never touched. RabbitMQ: the shared server has no TLS listener and must not be
reconfigured, so a test-owned TLS-terminating proxy (asyncio, in a thread) stands
in front of it: clients speak TLS to the proxy, which forwards plain AMQP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError

import celery_ext
from celery_ext import QueueFull
from celery_ext.transports.amqp import AmqpParking, AmqpsTransport, AmqpTransport
from celery_ext.transports.redis import RedisParking, RedissTransport, RedisTransport
from tests.helpers import embedded_worker, new_app, wait_for

BOUND = 5  # queue_limits of the queue no worker consumes


def _unavailable(reason: str) -> None:
    """Skip, or fail when CELERY_EXT_REQUIRE_BROKERS=1 (as conftest does for brokers)."""
    if os.environ.get("CELERY_EXT_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{reason} and CELERY_EXT_REQUIRE_BROKERS=1", pytrace=False)
    pytest.skip(reason)


# -- certificates ----------------------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    ca: str  # the CA certificate clients trust
    cert: str  # the server's certificate (SAN IP:127.0.0.1, DNS:localhost), signed by the CA
    key: str  # the server's private key


_SERVER_EXT = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""


def _certs_with_openssl(openssl: str, d: Path) -> Certs:
    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=d, capture_output=True, timeout=30)
        assert done.returncode == 0, f"openssl {args[0]} failed: {done.stderr.decode()}"

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=celery_ext test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "server.ext").write_text(_SERVER_EXT)
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2",
        "-extfile", "server.ext", "-out", "server.pem")  # fmt: skip
    return Certs(str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA and a server certificate signed by it, made for this module."""
    d = tmp_path_factory.mktemp("tls")
    openssl = shutil.which("openssl")
    if openssl is None:
        _unavailable("cannot make test certificates: no openssl CLI")
    return _certs_with_openssl(str(openssl), d)


# -- a TLS-only redis-server -------------------------------------------------------------
def _start_tls_redis(exe: str, certs: Certs, d: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``redis-server`` with a TLS port only, on a free port; wait until it answers."""
    for _ in range(3):  # another process may take the free port before redis binds it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        log = d / f"redis-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                 "--tls-cert-file", certs.cert, "--tls-key-file", certs.key,
                 "--tls-ca-cert-file", certs.ca, "--tls-auth-clients", "no",
                 "--save", "", "--appendonly", "no", "--dir", str(d)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = redis.Redis(
            "127.0.0.1", port, ssl=True, ssl_ca_certs=certs.ca, ssl_cert_reqs="required"
        )
        deadline = time.monotonic() + 10
        try:
            while proc.poll() is None:
                try:
                    client.ping()
                    return proc, port
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, log.read_text(errors="replace")
                    time.sleep(0.05)
        except BaseException:
            proc.kill()
            proc.wait(timeout=10)
            raise
        finally:
            client.close()
        text = log.read_text(errors="replace")
        if "already in use" in text:
            continue
        if "tls" in text.lower():  # e.g. "Bad directive" on a build without TLS
            _unavailable(f"redis-server cannot serve TLS here: {text.strip()[-300:]}")
        raise AssertionError(f"redis-server exited with {proc.returncode}: {text}")
    raise AssertionError("redis-server found no free port in 3 tries")


@pytest.fixture
def tls_redis(certs: Certs, tmp_path: Path) -> Iterator[int]:
    """A test-owned ``redis-server`` listening on TLS only; yields its port."""
    exe = shutil.which("redis-server")
    if exe is None:
        _unavailable("redis-server is not on PATH")
    proc, port = _start_tls_redis(str(exe), certs, tmp_path)
    try:
        yield port
    finally:
        proc.terminate()  # ours alone, by its pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- a TLS-terminating proxy to the shared RabbitMQ --------------------------------------
class TlsProxy:
    """Accepts TLS on 127.0.0.1:<port> and forwards the plain bytes to ``target``.

    An asyncio loop in a thread: asyncio's TLS reads and writes one connection from
    one thread (an ``ssl.SSLSocket`` read and written by two threads is not safe).
    ``sessions`` lists the TLS version of every connection that completed a handshake.

    Example::

        with TlsProxy(("127.0.0.1", 5672), certs) as proxy:
            url = f"amqps://guest:guest@127.0.0.1:{proxy.port}//"
    """

    def __init__(self, target: tuple[str, int], certs: Certs) -> None:
        self.target = target
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs.cert, certs.key)
        self.sessions: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tls")
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        self.sessions.append(tls.version() if tls is not None else "none")
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def tls_proxy(amqp_url: str, certs: Certs) -> Iterator[TlsProxy]:
    """A TLS proxy in front of the shared RabbitMQ (skips/fails as ``amqp_url`` does)."""
    with TlsProxy(("127.0.0.1", 5672), certs) as proxy:
        yield proxy


# -- helpers ---------------------------------------------------------------------------
@dataclass
class Recorder:
    """What the embedded worker ran, in this process: (value, time.time() at start)."""

    runs: list[tuple[str, float]]

    def values(self) -> list[str]:
        return [value for value, _ in self.runs]


def add_record_task(app: Celery) -> tuple[Any, Recorder]:
    recorder = Recorder([])

    @app.task(shared=False, name="tls.record")
    def record(value: str) -> None:
        recorder.runs.append((value, time.time()))

    return record, recorder


def _run_park_and_bound(
    app: Celery, record: Any, recorder: Recorder, parked: Any, transport: type
) -> None:
    """On an embedded worker (consuming through ``transport``): a task runs, a far
    countdown is parked (``parked()`` counts it) and runs when due, and the bounded
    queue refuses the publish past its bound."""
    queue = app.conf.task_default_queue
    full = f"{queue}.full"
    with embedded_worker(app) as worker:
        assert type(worker.consumer.connection.transport) is transport
        record.delay("now")
        wait_for(lambda: recorder.values() == ["now"], timeout=10)

        due = time.time() + 2.5
        record.apply_async(("later",), countdown=2.5)  # beyond eta_horizon=1.0: parked
        wait_for(lambda: parked() == 1, timeout=2)
        wait_for(lambda: "later" in recorder.values(), timeout=10)
        assert recorder.values() == ["now", "later"]
        assert recorder.runs[1][1] >= due - 0.05, "a parked task ran before it was due"

        for i in range(BOUND):  # nobody consumes `full`
            record.apply_async((f"fill{i}",), queue=full)
        with pytest.raises(QueueFull) as refused:
            record.apply_async(("one too many",), queue=full)
        assert refused.value.queue == full
    assert recorder.values() == ["now", "later"]


# -- Redis -----------------------------------------------------------------------------
def test_rediss_runs_parks_and_bounds_tasks_with_verified_tls(
    tls_redis: int, certs: Certs, unique_queue: str
) -> None:
    app = new_app(
        f"rediss://127.0.0.1:{tls_redis}/0",
        unique_queue,
        broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": certs.ca},
    )
    full = f"{unique_queue}.full"
    celery_ext.install(app, queue_limits={full: BOUND}, eta_horizon=1.0, park_interval=0.2)
    record, recorder = add_record_task(app)
    try:
        with app.connection_for_write() as conn:
            assert type(conn.transport) is RedissTransport
            channel = conn.default_channel
            assert channel.pool.connection_class is redis.SSLConnection
            live = channel.pool.get_connection()
            try:
                live.connect()
                assert isinstance(live._sock, ssl.SSLSocket)
                peer = live._sock.getpeercert()  # only set when the chain was verified
                assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
            finally:
                channel.pool.release(live)
            parking = RedisParking(channel)
            parked = functools.partial(parking.parked, unique_queue)
            _run_park_and_bound(app, record, recorder, parked, RedissTransport)
            assert channel.client.llen(full) == BOUND
    finally:
        app.close()


def test_rediss_refuses_clients_without_the_ca_or_without_tls(
    tls_redis: int, unique_queue: str
) -> None:
    no_ca = {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # verifies, but against the system's CAs
    for url, options, transport, error in (
        (f"rediss://127.0.0.1:{tls_redis}/0", no_ca, RedissTransport, "CERTIFICATE_VERIFY_FAILED"),
        (f"redis://127.0.0.1:{tls_redis}/0", None, RedisTransport, "reset|closed"),  # no TLS
    ):
        app = new_app(url, unique_queue, broker_use_ssl=options)
        celery_ext.install(app, queue_limits={unique_queue: BOUND})
        try:
            with app.connection_for_write() as conn:
                assert type(conn.transport) is transport
                with pytest.raises(OperationalError, match=error):
                    conn.ensure_connection(max_retries=0)
        finally:
            app.close()


# -- RabbitMQ --------------------------------------------------------------------------
@pytest.fixture
def amqps_app(
    tls_proxy: TlsProxy, certs: Certs, amqp_url: str, unique_queue: str
) -> Iterator[Celery]:
    """An installed app on ``amqps://`` through the proxy, verifying the server; its
    queues, exchanges and parking topology are deleted afterwards (on plain AMQP)."""
    app = new_app(
        f"amqps://guest:guest@127.0.0.1:{tls_proxy.port}//",
        unique_queue,
        broker_use_ssl={
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": certs.ca,
            "server_hostname": "127.0.0.1",
        },
    )
    celery_ext.install(
        app,
        queue_limits={f"{unique_queue}.full": BOUND},
        eta_horizon=1.0,
        park_interval=0.2,
        park_prefix=unique_queue,
    )
    try:
        yield app
    finally:
        app.close()
        with Connection(amqp_url) as conn:
            channel = conn.default_channel
            AmqpParking(channel, prefix=unique_queue).delete()
            for name in (unique_queue, f"{unique_queue}.full"):
                channel.queue_delete(name)
                channel.exchange_delete(name)  # Celery declared one named after the queue


def test_amqps_runs_parks_and_bounds_tasks_with_verified_tls(
    amqps_app: Celery, tls_proxy: TlsProxy, unique_queue: str
) -> None:
    app = amqps_app
    record, recorder = add_record_task(app)
    with app.connection_for_write() as conn:
        assert type(conn.transport) is AmqpsTransport
        channel = conn.default_channel
        sock = conn.connection.transport.sock
        assert isinstance(sock, ssl.SSLSocket)
        peer = sock.getpeercert()  # only set when the chain was verified
        assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        parking = AmqpParking(channel, prefix=unique_queue)
        parked = functools.partial(parking.parked, unique_queue)
        _run_park_and_bound(app, record, recorder, parked, AmqpsTransport)
        full = f"{unique_queue}.full"
        assert channel.queue_declare(full, passive=True).message_count == BOUND
    assert len(tls_proxy.sessions) >= 2  # this connection and the worker's
    assert all(version.startswith("TLS") for version in tls_proxy.sessions), tls_proxy.sessions


def test_amqps_refuses_clients_without_the_ca_or_without_tls(
    tls_proxy: TlsProxy, unique_queue: str
) -> None:
    port = tls_proxy.port
    no_ca = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "127.0.0.1"}
    for url, options, transport, error in (
        (f"amqps://guest:guest@127.0.0.1:{port}//", no_ca, AmqpsTransport, "VERIFY_FAILED"),
        (f"amqp://guest:guest@127.0.0.1:{port}//", None, AmqpTransport, "closed|reset"),  # no TLS
    ):
        app = new_app(url, unique_queue, broker_use_ssl=options)
        celery_ext.install(app, queue_limits={unique_queue: BOUND})
        try:
            with app.connection_for_write() as conn:
                assert type(conn.transport) is transport
                with pytest.raises(OperationalError, match=error):
                    conn.ensure_connection(max_retries=0)
        finally:
            app.close()
    assert tls_proxy.sessions == []  # neither got through a handshake
