"""Redis through Sentinel (``sentinel://``): the same guarantees as ``redis://``, and a
publish a failover cannot lose (``replica_acks``).

Each test starts its own Sentinel set (:class:`tests.chaos.harness.OwnSentinel`:
a primary, a replica and three sentinels on free ports) and fails it over by
SIGKILLing the primary. Redis replicates asynchronously: a write the primary
acknowledged but had not sent to the replica is gone after the failover. The
loss test makes that window certain (the replica is stopped and its link cut
while tasks are published) and counts what each setting loses.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

import celery_ext
from celery_ext.errors import ConfigurationError, NotReplicated
from celery_ext.transports import guarantees
from celery_ext.transports.redis import RedisParking, SentinelTransport
from tests.chaos.harness import OwnSentinel
from tests.helpers import embedded_worker, ext_section, new_app, wait_for


@pytest.fixture
def sentinel(redis_url: str) -> Iterator[OwnSentinel]:
    """A test-owned Sentinel set (``redis_url``: skips, or fails in CI, without Redis)."""
    with OwnSentinel() as own:
        yield own


def _app(sentinel: OwnSentinel, queue: str, **settings: Any) -> Celery:
    app = new_app(
        sentinel.url,
        queue,
        broker_transport_options={"master_name": sentinel.name},
        task_acks_late=True,
    )
    app.conf.broker_connection_retry_on_startup = True
    celery_ext.install(app, **settings)
    return app


def test_sentinel_urls_get_the_guarantees_of_redis_or_a_clear_refusal() -> None:
    app = Celery(
        "s", broker="sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380", set_as_current=False
    )
    with pytest.raises(ConfigurationError, match="master_name"):
        celery_ext.install(app)
    app.conf.broker_transport_options = {"master_name": "primary"}
    celery_ext.install(app, replica_acks=1)
    assert app.conf.broker_transport == "celery_ext.transports.redis:SentinelTransport"
    shown = guarantees(app)
    assert shown["transport"] == "sentinel" and shown["replica_acks"] == 1
    assert shown["publish"] == "primary + 1 replica(s)"
    # replica_acks waits for Redis replicas: refused on any other broker, naming why.
    for url in ("amqp://guest@127.0.0.1//", "local://"):
        other = Celery("o", broker=url, set_as_current=False)
        with pytest.raises(ConfigurationError, match="replica_acks"):
            celery_ext.install(other, replica_acks=1)
    with pytest.raises(ConfigurationError, match="replica_acks"):
        celery_ext.install(Celery("n", broker="redis://", set_as_current=False), replica_acks=-1)


def test_a_worker_through_sentinel_runs_parks_and_bounds_across_a_failover(
    sentinel: OwnSentinel, unique_queue: str
) -> None:
    app = _app(
        sentinel,
        unique_queue,
        eta_horizon=1.0,
        park_interval=0.2,
        queue_limits={unique_queue: 50},
        replica_acks=1,
        lease_interval=0.5,
        dead_worker_after=2.0,
    )
    runs: list[str] = []

    @app.task(shared=False, name="sentinel.record")
    def record(value: str) -> None:
        runs.append(value)

    try:
        with embedded_worker(app) as worker:
            assert isinstance(worker.consumer.connection.transport, SentinelTransport)
            record.delay("before")
            wait_for(lambda: "before" in runs)
            broker = ext_section(app, worker.hostname)["broker"]  # what inspect stats says
            assert (broker["transport"], broker["replica_acks"]) == ("sentinel", 1)
            record.apply_async(("parked",), countdown=4.0)  # beyond the horizon: parked
            with app.connection_for_write() as conn:
                assert RedisParking(conn.default_channel).parked(unique_queue) == 1
            sentinel.failover()  # the parked message is on the replica: replica_acks
            record.delay("after")
            wait_for(lambda: {"after", "parked"} <= set(runs), timeout=30)
            # Reconnected (through kombu's failover switch, if it tried a sentinel
            # that was down): still celery_ext's transport.
            assert isinstance(worker.consumer.connection.transport, SentinelTransport)
        assert sorted(runs) == ["after", "before", "parked"]
    finally:
        app.close()


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380;sentinel://127.0.0.1:26381",
        "redis://127.0.0.1:6379/3;redis://127.0.0.1:6380/4",
    ],
)
def test_failover_urls_keep_celery_exts_transport_after_a_switch(url: str) -> None:
    """kombu's ``Connection.switch`` sets the transport to the next URL's scheme: the
    worker went on without atomic delivery and leases after its first failover."""
    app = Celery("f", broker=url, set_as_current=False)
    app.conf.broker_transport_options = {"master_name": "primary"}
    celery_ext.install(app)
    ours = app.conf.broker_transport
    with app.pool.acquire() as pooled:  # the producers' connections too
        for conn in (app.connection_for_read(), pooled):
            for alternate in conn.alt[1:] + conn.alt[:1]:
                conn.switch(alternate)  # what ensure_connection does when a URL fails
                assert conn.transport_cls == ours
    assert conn.alt[0].endswith(f":{conn.port}" + ("/3" if url.startswith("redis") else ""))
    stock = Celery("s", broker=url, set_as_current=False)  # an app without celery_ext
    conn = stock.connection_for_read()
    conn.switch(conn.alt[1])
    assert conn.transport_cls == url.split("://")[0]


@pytest.mark.parametrize("replica_acks", [0, 1])
def test_a_failover_loses_unreplicated_publishes_unless_replica_acks_waits(
    sentinel: OwnSentinel, unique_queue: str, replica_acks: int
) -> None:
    """Five publishes while the replica lags: without ``replica_acks`` all five return
    and the failover loses all five; with it each raises :class:`NotReplicated`, and
    what a publish confirmed is never lost."""
    app = _app(sentinel, unique_queue, replica_acks=replica_acks, replica_ack_timeout=0.2)

    @app.task(shared=False, name="sentinel.noop")
    def noop(n: int) -> None:
        pass

    try:
        noop.delay(-1)  # the producer is connected...
        sentinel.wait_replicated()
        assert sentinel.client().wait(1, 5000) == 1  # ...and this one is on the replica
        replica = sentinel.replica_port()
        stopped = sentinel.procs[replica]
        os.kill(stopped.pid, signal.SIGSTOP)  # the replica lags...
        try:
            primary = sentinel.client()
            primary.client_kill_filter(_type="replica")  # ...and gets nothing more
            confirmed, refused = [], []
            for n in range(5):
                try:
                    noop.delay(n)
                    confirmed.append(n)
                except NotReplicated as exc:
                    assert (exc.wanted, exc.acked, exc.queue) == (1, 0, unique_queue)
                    refused.append(n)
            assert primary.llen(unique_queue) == 6  # the primary has them all
            sentinel.procs[sentinel.primary_port()].kill()
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        old = next(p for p in sentinel.data_ports if p != replica)
        wait_for(lambda: sentinel.primary_port() == replica, timeout=60)
        sentinel.wait_primary(replica)
        kept = _ids(sentinel.client(), unique_queue)
        lost = [n for n in confirmed if n not in kept]
        counts = f"confirmed={len(confirmed)} lost={len(lost)} refused={len(refused)}"
        print(f"\nreplica_acks={replica_acks}: {counts} (primary {old} killed, {replica} promoted)")
        if replica_acks:
            assert (confirmed, lost, refused) == ([], [], [0, 1, 2, 3, 4])
            with pytest.raises(NotReplicated):  # the new primary has no replica yet
                noop.delay(5)
            sentinel.rejoin(old)
            for n in refused:  # what the caller does with NotReplicated: publish again
                noop.delay(n)
            assert _ids(sentinel.client(), unique_queue) >= {-1, 0, 1, 2, 3, 4}
        else:
            assert (confirmed, lost, refused) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [])
        assert -1 in kept  # replicated before the lag: kept either way
    finally:
        app.close()


def _ids(client: redis.Redis, queue: str) -> set[int]:
    """The first argument of every task message in ``queue``."""
    import base64
    import json

    ids = set()
    for raw in client.lrange(queue, 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids.add(int(body[0][0]))
    return ids
