"""Chaos runs: real workers SIGTERMed and SIGKILLed at random, the broker cut once, a ledger.

:func:`run_chaos` publishes ``tasks`` acks_late jobs (``tests.apps.chaos_app``)
and runs ``workers`` ``celery worker`` subprocesses on them. While they work,
it repeatedly picks a live worker and sends it SIGTERM (a warm drain) or SIGKILL,
then starts a replacement; once, at about a third of the way, it cuts every
broker connection: on Redis by restarting a test-owned ``redis-server`` (own
port, append-only file, so queued messages survive), on RabbitMQ through a
test-owned TCP proxy that drops all its connections. The shared servers are
never touched. Then it lets the workers finish and compares the ledger (a set
and a hash on the shared Redis) with what was published:
``lost`` ids never completed, ``duplicates`` extra runs (at-least-once).

Used by ``tests/chaos`` (bounded sizes) and ``benchmarks/chaos_soak.py``.

Example::

    result = run_chaos("redis", tasks=2000)
    print(result.line())   # lost=0 duplicates=3 ...
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parents[2]
LEDGER_URL = os.environ.get("CELERY_EXT_TEST_REDIS", "redis://127.0.0.1:6379/11")
AMQP = ("127.0.0.1", 5672)
_RESET = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")  # SO_LINGER on, 0 s: close = RST


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ChaosResult:
    """What a chaos run did and what the ledger says."""

    broker: str
    tasks: int
    done: int = 0
    runs: int = 0
    terms: int = 0
    kills: int = 0
    cuts: int = 0
    seconds: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    longest_drain_s: float = 0.0  # SIGTERM to exit, over the workers drained during the run
    broker_state: dict[str, int] = field(default_factory=dict)
    pool: str = "threads"
    #: Lossy follow-ups (combined runs): published, done, lost where a process died
    #: (SIGKILL), dropped and reported by a drained worker's lane, and lost otherwise.
    lossy_published: int = 0
    lossy_done: int = 0
    lossy_killed: int = 0
    lossy_reported: int = 0
    lossy_unexplained: int = 0
    crashed: list[str] = field(default_factory=list)  # worker logs with "Unrecoverable error"
    lost_ids: list[int] = field(default_factory=list)  # the first few tasks never done
    longest_drain_log: str = ""

    @property
    def lost(self) -> int:
        return self.tasks - self.done

    @property
    def duplicates(self) -> int:
        return self.runs - self.done

    def line(self) -> str:
        lossy = (
            f" lossy={self.lossy_done}/{self.lossy_published} lossy_lost_killed="
            f"{self.lossy_killed} lossy_dropped_reported={self.lossy_reported} "
            f"lossy_unexplained={self.lossy_unexplained}"
            if self.lossy_published
            else ""
        )
        return (
            f"lost={self.lost} duplicates={self.duplicates} broker={self.broker} "
            f"pool={self.pool} tasks={self.tasks} sigterm={self.terms} sigkill={self.kills} "
            f"broker_cuts={self.cuts} seconds={self.seconds:.1f} "
            f"longest_drain_s={self.longest_drain_s:.1f}{lossy}"
            + (f" lost_ids={self.lost_ids}" if self.lost_ids else "")
            + "".join(f" {k}={v}" for k, v in self.broker_state.items())
        )


class TcpProxy:
    """A TCP forwarder to RabbitMQ that can drop every connection at once.

    Example::

        with TcpProxy(("127.0.0.1", 5672)) as proxy:
            url = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
            proxy.cut()   # every client sees its connection reset
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._refusing = threading.Event()
        self._closed = False

    def __enter__(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True, name="chaos-proxy").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._server.close()
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._sockets -= {src, dst}

    def cut(self, refuse_s: float = 0.0) -> None:
        """Reset every connection; refuse new ones for ``refuse_s`` seconds."""
        if refuse_s:
            self._refusing.set()
            threading.Timer(refuse_s, self._refusing.clear).start()
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for s in sockets:
            with suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _wait_answering(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Until the redis-server ``proc`` on ``port`` answers PING; raise if it exits or is late."""
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


class OwnRedis:
    """A test-owned ``redis-server`` on a free port with an fsynced append-only file.

    Example::

        with OwnRedis() as server:
            server.restart()   # clients lose their connections; the data stays
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="celery_ext_chaos_redis_")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_answering(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            # SIGTERM: Redis fsyncs the append-only file and exits.
            self.proc.terminate()
            self.proc.wait(timeout=20)
            self.proc = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)  # the outage itself: clients see refused connections meanwhile
        self.start()

    def __enter__(self) -> OwnRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class OwnSentinel:
    """A test-owned Redis Sentinel set: a primary, a replica and three sentinels.

    Every process listens on its own free port on 127.0.0.1 and keeps nothing on
    disk but the sentinels' config files (sentinels rewrite them). Sentinels
    take a primary for dead after ``down_ms`` and fail over to the replica.

    Example::

        with OwnSentinel() as s:
            app.conf.broker_url = s.url
            app.conf.broker_transport_options = {"master_name": s.name}
            s.failover()   # SIGKILL the primary; the replica takes over; the old one rejoins
    """

    name = "celery_ext_primary"

    def __init__(self, down_ms: int = 1000) -> None:
        self.down_ms = down_ms
        self.dir = tempfile.mkdtemp(prefix="celery_ext_sentinel_")
        self.data_ports = [free_port(), free_port()]  # primary first, then the replica
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.failovers = 0

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def _start(self, port: int, *args: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH")
        log = open(Path(self.dir) / f"{port}.log", "ab")  # noqa: SIM115 (kept by the process)
        self.procs[port] = subprocess.Popen(
            [exe, *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        _wait_answering(port, self.procs[port])

    def _start_data(self, port: int, replica_of: int | None = None) -> None:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._start(port, *args)

    def start(self) -> None:
        primary, replica = self.data_ports
        self._start_data(primary)
        self._start_data(replica, replica_of=primary)
        for port in self.sentinel_ports:
            conf = Path(self.dir) / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {self.name} {self.down_ms}\n"
                f"sentinel failover-timeout {self.name} 10000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            self._start(port, str(conf), "--sentinel")
        self.wait_replicated()
        # Every sentinel knows the replica and the other sentinels before anything fails.
        self._wait(lambda: all(self._sentinel_sees_all(p) for p in self.sentinel_ports), 30)

    def _sentinel_sees_all(self, port: int) -> bool:
        client = redis.Redis(port=port, decode_responses=True)
        try:
            replicas = client.execute_command("SENTINEL", "REPLICAS", self.name)
            others = client.execute_command("SENTINEL", "SENTINELS", self.name)
        except redis.RedisError:
            return False
        return len(replicas) >= 1 and len(others) >= 2

    @staticmethod
    def _wait(ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError("the Sentinel set did not get there in time")
            time.sleep(0.05)

    def primary_port(self) -> int:
        """The port the sentinels name as primary now."""
        client = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(port)

    def wait_primary(self, port: int, timeout_s: float = 60) -> None:
        """Until clients find ``port`` as the primary (redis-py asks the sentinels in turn
        and skips one that still takes the new primary for down)."""
        from redis.sentinel import MasterNotFoundError, Sentinel

        finder = Sentinel([("127.0.0.1", p) for p in self.sentinel_ports], socket_timeout=1)

        def found() -> bool:
            try:
                return finder.discover_master(self.name)[1] == port
            except MasterNotFoundError:
                return False

        self._wait(found, timeout_s)

    def replica_port(self) -> int:
        primary = self.primary_port()
        return next(p for p in self.data_ports if p != primary)

    def client(self, port: int | None = None) -> redis.Redis:
        """A client of the primary (or of ``port``), db 0."""
        return redis.Redis(port=port or self.primary_port())

    def wait_replicated(self, timeout_s: float = 30) -> None:
        """Until the replica is connected to the primary and in sync."""

        def synced() -> bool:
            try:
                info = redis.Redis(port=self.replica_port()).info("replication")
            except redis.RedisError:
                return False
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        self._wait(synced, timeout_s)

    def failover(self, rejoin: bool = True) -> None:
        """SIGKILL the primary; wait until the sentinels promoted the replica; with
        ``rejoin``, restart the old primary as a replica of the new one (as an
        operator would; the sentinels would convert it too, about 10 s later)."""
        old = self.primary_port()
        self.procs[old].kill()
        self.procs[old].wait()
        self._wait(lambda: self.primary_port() != old, 60)
        self.wait_primary(self.primary_port())
        self.failovers += 1
        if rejoin:
            self.rejoin(old)

    def rejoin(self, port: int) -> None:
        """Restart the dead server on ``port`` as a replica of the primary; wait for sync."""
        self._start_data(port, replica_of=self.primary_port())
        self.wait_replicated(60)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def __enter__(self) -> OwnSentinel:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Workers:
    """``celery worker`` subprocesses of ``tests.apps.chaos_app``, replaced as they die."""

    def __init__(
        self,
        env: dict[str, str],
        queue: str,
        logdir: Path,
        pool: str,
        concurrency: int,
        app: str = "tests.apps.chaos_app",
    ):
        self.env, self.queue, self.logdir = env, queue, logdir
        self.pool, self.concurrency, self.app = pool, concurrency, app
        self.killed: set[int] = set()  # pids sent SIGKILL
        self.logs: dict[int, Path] = {}  # pid -> its log file
        self.procs: list[subprocess.Popen[bytes]] = []
        self.born: dict[int, float] = {}
        # A second SIGTERM is Celery's cold shutdown (exit status 1), so a worker
        # gets at most one; a draining worker is replaced at once, not at its exit.
        self.termed: dict[int, float] = {}  # pid -> when SIGTERM was sent
        self.drains: dict[int, float] = {}  # pid -> seconds from SIGTERM to exit
        self._started = 0

    def start(self) -> subprocess.Popen[bytes]:
        self._started += 1
        n = self._started
        path = self.logdir / f"worker{n}.log"
        log = open(path, "wb")  # noqa: SIM115 (kept by the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", self.app, "worker",
             "-P", self.pool, "-c", str(self.concurrency), "-Q", self.queue,
             "-n", f"chaos{n}.{self.queue}@%h", "-l", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(proc)
        self.logs[proc.pid] = path
        self.born[proc.pid] = time.monotonic()
        return proc

    def live(self, min_age_s: float = 0.0) -> list[subprocess.Popen[bytes]]:
        """Running workers at least ``min_age_s`` old that have not been sent SIGTERM."""
        now = time.monotonic()
        return [
            p for p in self.procs
            if p.poll() is None and p.pid not in self.termed and now - self.born[p.pid] >= min_age_s
        ]  # fmt: skip

    def term(self, proc: subprocess.Popen[bytes]) -> None:
        self.termed[proc.pid] = time.monotonic()
        proc.send_signal(signal.SIGTERM)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        self.killed.add(proc.pid)
        proc.kill()

    def failed_on_their_own(self) -> list[str]:
        """Workers that exited with an error without being sent a signal."""
        return [
            f"pid {p.pid} exited {p.returncode}"
            for p in self.procs
            if p.poll() not in (None, 0) and p.pid not in self.termed and p.pid not in self.killed
        ]

    def crashed(self) -> list[str]:
        """Logs of workers that died of an error ("Unrecoverable error")."""
        return [
            log.name
            for log in sorted(self.logdir.glob("worker*.log"))
            if b"Unrecoverable error" in log.read_bytes()
        ]

    def note_exits(self) -> None:
        """Record how long each drained worker took to exit (to within one poll)."""
        for proc in self.procs:
            if proc.pid in self.termed and proc.pid not in self.drains and proc.poll() is not None:
                self.drains[proc.pid] = time.monotonic() - self.termed[proc.pid]

    def stop_all(self, timeout: float = 30) -> list[int]:
        """SIGTERM the live workers; SIGKILL whatever still runs ``timeout`` s later."""
        for proc in self.live():
            self.term(proc)
        deadline = time.monotonic() + timeout  # one for all: stuck workers wait together
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes


@contextmanager
def _broker(kind: str) -> Iterator[tuple[str, OwnRedis | TcpProxy | OwnSentinel]]:
    if kind == "redis":
        with OwnRedis() as server:
            yield server.url, server
    elif kind == "sentinel":
        with OwnSentinel() as sentinel:
            yield sentinel.url, sentinel
    elif kind in ("amqp", "amqp-quorum"):
        with TcpProxy(AMQP) as proxy:
            yield f"amqp://guest:guest@127.0.0.1:{proxy.port}//", proxy
    else:
        raise ValueError(kind)


#: Sentinel sets started by :class:`OwnSentinel` monitor their primary under this name.
SENTINEL_MASTER = OwnSentinel.name


def broker_conf(url: str, queue_type: str = "classic") -> dict[str, Any]:
    """The app settings a chaos broker URL needs (Sentinel's master name, the queue type)."""
    conf: dict[str, Any] = {}
    if url.startswith("sentinel://"):
        conf["broker_transport_options"] = {"master_name": SENTINEL_MASTER}
    if queue_type == "quorum":
        conf["task_default_queue_type"] = "quorum"
    return conf


def _publish(url: str, queue: str, tasks: int, first: int = 0) -> None:
    app = Celery("chaos_producer", broker=url, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True, **broker_conf(url))
    for n in range(first, first + tasks):
        _send(app, "chaos.work", [n], {})
    app.close()


def _send(app: Celery, name: str, args: list[Any], options: dict[str, Any]) -> None:
    """Publish one task like a producer that rides out a broker cut."""
    for attempt in range(60):
        try:
            app.send_task(name, args=args, **options)
            return
        except Exception:
            if attempt == 59:
                raise
            time.sleep(0.5)


#: The kinds of combined tasks, by ``n % 20`` (see tests.apps.combined_app).
_KINDS = ["plain"] * 10 + ["flaky"] * 2 + ["slow"] * 2 + ["soft"] * 2 + ["hard"]
_KINDS += ["countdown"] * 2 + ["padded"]


def publish_combined(
    url: str,
    queue: str,
    tasks: int,
    first: int = 0,
    seed: int | None = None,
    stock: bool = False,
    queue_type: str = "classic",
    replica_acks: int = 0,
) -> None:
    """Publish the combined run's tasks through celery_ext with the app's queue bound
    and ``block``: the producer waits while the queue is full (the workers, under
    chaos, drain it), far countdowns are parked by the producer. ``stock``: a plain
    Celery producer (no bound, countdowns queued for the worker to hold).
    ``queue_type="quorum"``: RabbitMQ quorum queues; ``replica_acks``: on Redis,
    each publish waits for that many replicas (a refused one is published again)."""
    import celery_ext

    rng = random.Random(seed)
    app = Celery("combined_producer", broker=url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue, task_ignore_result=True, **broker_conf(url, queue_type)
    )
    if not stock:
        celery_ext.install(
            app,
            queue_limits={queue: 300},
            queue_full_policy="block",
            queue_block_timeout=120.0,
            eta_horizon=2.0,
            replica_acks=replica_acks,
        )
    for n in range(first, first + tasks):
        kind = _KINDS[n % len(_KINDS)]
        options: dict[str, Any] = {}
        if kind == "soft":
            options.update(soft_time_limit=0.2, time_limit=10)
        elif kind == "hard":
            options.update(time_limit=1.0)
        elif kind == "countdown":
            options.update(countdown=rng.uniform(3.0, 5.0))  # parked: beyond the horizon
        pad = "x" * 6000 if kind == "padded" else ""
        _send(app, "combo.work", [n, kind, pad], options)
    app.close()


def _cleanup_amqp(queue: str) -> None:
    from kombu import Connection

    with Connection(f"amqp://guest:guest@{AMQP[0]}:{AMQP[1]}//") as conn:
        channel = conn.default_channel
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


def run_chaos(
    kind: str,
    tasks: int = 2000,
    workers: int = 2,
    concurrency: int = 4,
    pool: str = "threads",
    chaos_until: float = 0.8,
    chaos_s: float = 60.0,
    every_s: tuple[float, float] = (1.0, 3.0),
    min_age_s: float = 3.0,
    seed: int | None = None,
    deadline_s: float = 240.0,
    faults: tuple[str, ...] = ("term", "kill", "cut"),
    min_faults: int = 3,
    stock: bool = False,
    log: bool = True,
    app: str = "tests.apps.chaos_app",
    publish: Callable[[str, str, int, int], None] | None = None,
    lossy: bool = False,
    replica_acks: int = 0,
) -> ChaosResult:
    """Run one chaos round on ``kind``; see the module docstring.

    Kinds: ``"redis"`` (a test-owned server, restarted for the cut), ``"sentinel"``
    (a test-owned Sentinel set; the cut is a failover: the primary is SIGKILLed
    and the replica promoted, the workers' apps with ``replica_acks``),
    ``"amqp"`` and ``"amqp-quorum"`` (the app on quorum queues), both through a
    test-owned proxy to the shared RabbitMQ.

    A fault every ``every_s`` seconds (random in the range) hits a worker at
    least ``min_age_s`` old; faults stop once ``chaos_until`` of the tasks are
    done and at least ``min_faults`` workers were hit, or after ``chaos_s``;
    the run then waits up to ``deadline_s`` (from the start) for the rest.

    ``app`` is the worker app module; ``publish(url, queue, count, first)`` (tasks
    ``first`` to ``first + count - 1``) runs in a thread beside the workers when
    given (a bounded producer that blocks), else the tasks are queued before the
    workers start. Either way a fifth of them is held back until the faults are in.
    ``lossy``: also account for the app's lossy follow-ups (see
    :mod:`tests.apps.combined_app`).
    """
    rng = random.Random(seed)
    queue = f"celery_ext.chaos.{uuid.uuid4().hex[:8]}"
    ledger = redis.Redis.from_url(LEDGER_URL)
    result = ChaosResult(kind, tasks, pool=pool)
    logdir = Path(tempfile.mkdtemp(prefix="celery_ext_chaos_"))
    say = print if log else (lambda *a, **k: None)
    started = time.monotonic()
    try:
        with _broker(kind) as (url, fault):
            started = time.monotonic()  # the clock starts once the broker is up
            env = {
                **os.environ,
                "CELERY_EXT_CHAOS_BROKER": url,
                "CELERY_EXT_CHAOS_QUEUE": queue,
                "CELERY_EXT_CHAOS_LEDGER": LEDGER_URL,
                "PYTHONPATH": str(ROOT),
                "CELERY_EXT_CHAOS_STOCK": "1" if stock else "0",
                "CELERY_EXT_CHAOS_LOSSY": "1" if lossy else "0",
                "CELERY_EXT_CHAOS_QUEUE_TYPE": "quorum" if kind == "amqp-quorum" else "classic",
                "CELERY_EXT_CHAOS_REPLICA_ACKS": str(replica_acks),
            }
            # Most tasks go out first, the rest once the faults are in: a run that goes
            # fast cannot end before the faults. Without a publisher the first part is
            # all queued before the workers start (the faults hit a busy run).
            reserve = tasks // 5
            publishers: list[threading.Thread] = []

            def publishing(count: int, first: int) -> None:
                target = publish or _publish
                thread = threading.Thread(
                    target=target, args=(url, queue, count, first), daemon=True
                )
                thread.start()
                publishers.append(thread)

            if publish is None:
                _publish(url, queue, tasks - reserve)
            else:
                publishing(tasks - reserve, 0)
            pool_ = Workers(env, queue, logdir, pool, concurrency, app)
            for _ in range(workers):
                pool_.start()

            def done() -> int:
                return int(ledger.scard(f"{queue}.done"))

            cut_at = tasks // 3
            next_fault = time.monotonic() + rng.uniform(*every_s)
            while (n := done()) < tasks and time.monotonic() - started < deadline_s:
                now = time.monotonic()
                hits = result.terms + result.kills
                pending = hits < min_faults or ("cut" in faults and not result.cuts)
                chaos = (n < tasks * chaos_until or pending) and now - started < chaos_s
                if reserve and (not pending or now - started >= chaos_s):
                    publishing(reserve, tasks - reserve)
                    reserve = 0
                if chaos and now >= next_fault:
                    cut_due = n >= cut_at or now - started >= chaos_s / 2
                    if "cut" in faults and not result.cuts and cut_due:
                        say(f"chaos: cutting the broker at {n}/{tasks}")
                        if isinstance(fault, OwnRedis):
                            fault.restart()
                        elif isinstance(fault, OwnSentinel):
                            fault.failover()
                        else:
                            fault.cut(refuse_s=1.0)
                        result.cuts += 1
                    else:
                        live = pool_.live(min_age_s)  # a worker gets to start first
                        kinds = [f for f in faults if f != "cut"]
                        victim = rng.choice(live) if live and kinds else None
                        if victim is not None:
                            if rng.choice(kinds) == "term":
                                pool_.term(victim)
                                result.terms += 1
                                say(f"chaos: SIGTERM pid {victim.pid} at {n}/{tasks}")
                            else:
                                pool_.kill(victim)
                                result.kills += 1
                                say(f"chaos: SIGKILL pid {victim.pid} at {n}/{tasks}")
                    next_fault = now + rng.uniform(*every_s)
                # A worker that exits on its own with an error (say, refused to start)
                # would be replaced forever: stop the run and report it.
                failed = pool_.failed_on_their_own()
                if failed:
                    result.crashed.extend(failed)
                    break
                # Keep `workers` alive: a drained or killed worker is replaced at once.
                while len(pool_.live()) < workers:
                    pool_.start()
                pool_.note_exits()
                time.sleep(0.05)
            result.seconds = time.monotonic() - started
            result.longest_drain_s = max(pool_.drains.values(), default=0.0)
            if pool_.drains:
                slowest = max(pool_.drains, key=pool_.drains.__getitem__)
                result.longest_drain_log = pool_.logs[slowest].name
            result.exit_codes = pool_.stop_all()
            result.crashed = pool_.crashed()
            for thread in publishers:
                thread.join(timeout=5)
            result.done = done()
            if lossy:
                completions = ledger.hvals(f"{queue}.completions")
                result.runs = sum(int(v) for v in completions)
                _account_lossy(ledger, queue, pool_.killed, result)
            else:
                result.runs = sum(int(v) for v in ledger.hvals(f"{queue}.runs"))
            if result.lost:
                done_ids = {int(n) for n in ledger.smembers(f"{queue}.done")}
                result.lost_ids = sorted(set(range(tasks)) - done_ids)[:10]
            if result.lost and isinstance(fault, (OwnRedis, OwnSentinel)):
                client = (
                    fault.client()
                    if isinstance(fault, OwnSentinel)
                    else redis.Redis(port=fault.port)
                )
                parked = client.hkeys("celery_ext.parked")  # RedisParking's registry
                result.broker_state = {
                    "queued": int(client.llen(queue)),
                    "unacked": int(client.hlen("unacked")),
                    "parked": sum(int(client.zcard(key)) for key in parked),
                }
                for tag, raw in client.hscan_iter("unacked"):
                    owners = [
                        key.decode()
                        for key in client.scan_iter(match="*.lease.owned:*")
                        if client.sismember(key, tag)
                    ]
                    print(f"chaos: unacked {tag.decode()} owned by {owners}: {raw[:300]!r}")
    finally:
        for key in ledger.scan_iter(f"{queue}.*"):
            ledger.delete(key)
        if kind.startswith("amqp"):
            with suppress(Exception):
                _cleanup_amqp(queue)
        if result.lost or result.crashed or result.lossy_unexplained or log:
            print(f"chaos: worker logs in {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    return result


def _account_lossy(ledger: redis.Redis, queue: str, killed: set[int], result: ChaosResult) -> None:
    """Explain every lossy follow-up that never ran: its process was SIGKILLed, or its
    worker's lane dropped it at a drain and reported it; anything else is unexplained."""
    ids = {k.decode(): int(v) for k, v in ledger.hgetall(f"{queue}.lossy_ids").items()}
    pids = {k.decode(): int(v) for k, v in ledger.hgetall(f"{queue}.lossy_pids").items()}
    done = {int(n) for n in ledger.smembers(f"{queue}.lossy_done")}
    reported = {x.decode() for x in ledger.smembers(f"{queue}.lossy_dropped_ids")}
    published = set(ids.values())
    result.lossy_published, result.lossy_done = len(published), len(published & done)
    for n in published - done:
        mine = [i for i, m in ids.items() if m == n]
        if all(i in reported for i in mine):
            result.lossy_reported += 1
        elif all(i in reported or pids.get(i) in killed for i in mine):
            result.lossy_killed += 1
        else:
            result.lossy_unexplained += 1
