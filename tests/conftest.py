"""Shared fixtures: real brokers (Redis, RabbitMQ) with unique names per run.

Broker tests skip with a reason when a server is unreachable, and fail instead
when CELERY_EXT_REQUIRE_BROKERS=1 (set by .ci/run).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

# pytest-celery replaces the classic celery_worker fixture with a Docker one
# (pytest-celery #442); there is no Docker engine here, so take the classic one back.
from celery.contrib.pytest import celery_worker  # noqa: F401

import celery_ext

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
# Our db on the shared server; never flushed wholesale. Under pytest-xdist (-n 2 at
# most) each test process has one of its own, 11 and 15 (12-14 are the benchmarks'
# and test_dropin's results): kombu keeps every queue's unacked messages in db-wide
# keys, and a worker of one test with a short visibility_timeout would restore
# another test's running tasks. Test apps and subprocesses read CELERY_EXT_TEST_REDIS.
REDIS_DB = (11, 15)[int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])]
os.environ["CELERY_EXT_TEST_REDIS"] = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
RUN_ID = uuid.uuid4().hex[:8]


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(host: str, port: int, what: str) -> None:
    if _reachable(host, port):
        return
    reason = f"{what} is not reachable at {host}:{port}"
    if os.environ.get("CELERY_EXT_REQUIRE_BROKERS") == "1":
        pytest.fail(f"{reason} and CELERY_EXT_REQUIRE_BROKERS=1", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of our Redis db on the shared server (skips/fails when unreachable)."""
    _need(REDIS_HOST, REDIS_PORT, "Redis")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """URL of the shared RabbitMQ (skips/fails when unreachable)."""
    _need(AMQP_HOST, AMQP_PORT, "RabbitMQ")
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}//"


@pytest.fixture(scope="session", autouse=True)
def _clean_our_redis_keys() -> Iterator[None]:
    """At the end of the run, delete what this run left in our Redis db (lists,
    dead letters, kombu bindings named after its queues, and the unacked entries of
    workers it killed, which a later run's worker would otherwise restore into a
    queue nobody reads)."""
    yield
    if not _reachable(REDIS_HOST, REDIS_PORT):
        return
    import redis

    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_DB)
    for key in client.scan_iter(match=f"*celery_ext.test.{RUN_ID}.*"):
        client.delete(key)
    ours = f"celery_ext.test.{RUN_ID}."
    for tag, raw in client.hscan_iter("unacked"):
        try:
            routing_key = json.loads(raw)[2]  # kombu stores [message, exchange, routing key]
        except (ValueError, IndexError, TypeError):
            continue
        if str(routing_key).startswith(ours):
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)


@pytest.fixture
def unique_queue() -> str:
    """A queue name no other test or run uses."""
    return f"celery_ext.test.{RUN_ID}.{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "redis", "amqp"])
def broker_app(request: pytest.FixtureRequest, unique_queue: str) -> Iterator[Celery]:
    """An installed app on each real broker, with its own default queue."""
    from tests.helpers import broker_url, new_app

    app = new_app(broker_url(request, request.param), unique_queue)
    celery_ext.install(app)
    yield app
    if request.param != "local":
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(unique_queue)
            if request.param == "amqp":  # Celery declared an exchange named after the queue
                conn.default_channel.exchange_delete(unique_queue)
    app.close()
