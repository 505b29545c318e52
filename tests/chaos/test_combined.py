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

``CELERY_EXT_COMBINED_TASKS`` sets the size (default 120 per run, half that on
solo's single slot: bounded for CI); ``benchmarks/chaos_soak.py --combined`` runs
longer rounds beside stock Celery.
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.harness import publish_combined, run_chaos

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
    lossy = pool != "prefork"
    result = run_chaos(
        kind,
        tasks=TASKS // 2 if pool == "solo" else TASKS,
        pool=pool,
        concurrency=1 if pool == "solo" else 4,
        app="tests.apps.combined_app",
        publish=publish_combined,
        lossy=lossy,
        faults=("term", "kill", "cut"),
        every_s=(0.5, 1.2),
        min_age_s=1.5,
        min_faults=3,
        chaos_until=0.6,
        chaos_s=8,
        deadline_s=240,
        log=False,
    )
    with capsys.disabled():
        print(f"\n{result.line()}")
    assert result.cuts == 1 and result.terms + result.kills >= 3, result.line()
    assert result.lost == 0, result.line()
    assert result.crashed == [], result.crashed  # no worker died of an error
    if lossy:
        assert result.lossy_published > 0 and result.lossy_unexplained == 0, result.line()
