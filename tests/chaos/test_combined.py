"""Every feature on at once, under SIGTERM, SIGKILL and a broker cut: 0 durable tasks lost.

One app (:mod:`tests.apps.combined_app`) with lossy follow-ups published by durable
tasks, retries with parked waits, soft and hard time limits, far countdowns
parked, a queue bound producers block at, ``prefetch_bytes`` and a 1.5 s drain
deadline; two ``celery worker`` subprocesses per run are SIGTERMed and SIGKILLed
at random and replaced, and every broker connection is cut once (a test-owned
``redis-server`` restarted; a TCP proxy in front of RabbitMQ; see :mod:`.harness`),
on the threads, solo, prefork and gevent pools. Each run prints its ledger line.
Durable tasks are ``acks_late``: each completes at least once (``lost=0``);
lossy follow-ups are lost only where a process was SIGKILLed or a drained
worker's lane reported dropping them (``lossy_unexplained=0``). Prefork runs
without lossy tasks (a worker refuses them there).

The production setups (issue 17) run the same ledger on the threads pool:
RabbitMQ with quorum queues (parked waits in quorum delay queues), and Redis
through a test-owned Sentinel set whose primary is SIGKILLed mid-run (the
"cut" is a failover to the replica), with ``replica_acks=1``.

``CELERY_EXT_COMBINED_TASKS`` sets the size (default 120 per run, half that on
solo's single slot: bounded for CI); ``benchmarks/chaos_soak.py --combined`` runs
longer rounds beside stock Celery.
"""

from __future__ import annotations

import functools
import os

import pytest

from tests.chaos.harness import ChaosResult, publish_combined, run_chaos

# With pytest-xdist, the chaos runs (CPU-hungry) go to one worker, one after another.
pytestmark = pytest.mark.xdist_group("chaos")

TASKS = int(os.environ.get("CELERY_EXT_COMBINED_TASKS", "120"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", ["threads", "solo", "prefork", "gevent"])
@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_every_feature_at_once_loses_no_durable_task(
    kind: str, pool: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue(f"{kind}_url")  # skips, or fails in CI, when the broker is down
    result = _combined(kind, pool)
    with capsys.disabled():
        print(f"\n{result.line()}")
    _check(result, lossy=pool != "prefork")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["amqp-quorum", "sentinel"])
def test_production_setups_lose_no_durable_task(
    kind: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    request.getfixturevalue("amqp_url" if kind.startswith("amqp") else "redis_url")
    replica_acks = 1 if kind == "sentinel" else 0
    result = _combined(kind, "threads", replica_acks=replica_acks)
    with capsys.disabled():
        print(f"\n{result.line()} replica_acks={replica_acks}")
    _check(result, lossy=True)


def _combined(kind: str, pool: str, replica_acks: int = 0) -> ChaosResult:
    queue_type = "quorum" if kind == "amqp-quorum" else "classic"
    publish = functools.partial(publish_combined, queue_type=queue_type, replica_acks=replica_acks)
    return run_chaos(
        kind,
        tasks=TASKS // 2 if pool == "solo" else TASKS,
        pool=pool,
        concurrency=1 if pool == "solo" else 4,
        app="tests.apps.combined_app",
        publish=publish,
        lossy=pool != "prefork",
        replica_acks=replica_acks,
        faults=("term", "kill", "cut"),
        every_s=(0.5, 1.2),
        min_age_s=1.5,
        min_faults=3,
        chaos_until=0.6,
        chaos_s=8,
        deadline_s=240,
        log=False,
    )


def _check(result: ChaosResult, lossy: bool) -> None:
    assert result.cuts == 1 and result.terms + result.kills >= 3, result.line()
    assert result.lost == 0, result.line()
    assert result.crashed == [], result.crashed  # no worker died of an error
    if lossy:
        assert result.lossy_published > 0 and result.lossy_unexplained == 0, result.line()
