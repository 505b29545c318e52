"""Redis leases on real `celery worker` processes: no redelivery while a worker
lives, a SIGKILLed worker's messages back within 30 s, nothing taken from live ones."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
from kombu import Connection

from tests.helpers import ext_section, wait_for
from tests.test_shutdown import Run

VISIBILITY_S = 2.0


@pytest.fixture
def runs(redis_url: str, unique_queue: str) -> Iterator[list[Run]]:
    made: list[Run] = []
    yield made
    for run in made:
        run.cleanup()


def restore_stale(broker: str) -> None:
    """What any worker's kombu does every 10 s: restore deliveries older than the visibility."""
    options = {"visibility_timeout": VISIBILITY_S}
    with Connection(broker, transport_options=options) as conn:
        conn.default_channel.qos.restore_visible(interval=1)


@pytest.mark.parametrize("leases", [True, False], ids=["leases", "stock"])
def test_a_task_outliving_the_visibility_timeout_runs_once(
    runs: list[Run], redis_url: str, unique_queue: str, leases: bool
) -> None:
    run = Run(redis_url, redis_url, unique_queue)
    runs.append(run)
    run.env.update(
        CELERY_EXT_TEST_VISIBILITY=str(VISIBILITY_S), CELERY_EXT_TEST_LEASES=str(int(leases))
    )
    run.start()
    run.send(0, 2 * VISIBILITY_S + 2)
    wait_for(lambda: run.started() == {0} and run.depth() == 0)
    time.sleep(VISIBILITY_S + 1)  # the delivery is now older than the visibility timeout
    restore_stale(redis_url)
    wait_for(lambda: run.finished() == {0}, timeout=20)
    if leases:
        assert run.depth() == 0 and run.runs() == {0: 1}  # renewed: never taken for lost
    else:  # the control: stock Celery on Redis hands the running task out again
        wait_for(lambda: run.runs() == {0: 2}, timeout=20)


def test_a_killed_workers_messages_are_recovered_within_30s_and_live_ones_untouched(
    runs: list[Run], redis_url: str, unique_queue: str
) -> None:
    doomed, survivor = (
        Run(redis_url, redis_url, unique_queue),
        Run(redis_url, redis_url, unique_queue),
    )
    runs.extend([doomed, survivor])
    doomed.start()
    run = doomed
    run.send(0, 30.0)
    run.send(1, 30.0)
    for n in range(2, 5):
        run.send(n, 0.01)  # prefetched behind the two running ones
    wait_for(lambda: run.started() == {0, 1} and run.depth() == 0)
    client = run.ledger
    wait_for(
        lambda: any(client.scard(k) == 5 for k in client.scan_iter("celery_ext.lease.owned:*"))
    )
    survivor.start("-c", "5")  # the killed pair's long reruns must not hold up the rest
    # The survivor has scanned for dead workers twice while the first one lives.
    wait_for(lambda: ext_section(survivor.app, survivor.hostname)["leases"]["renewals"] >= 2)
    assert run.runs() == {0: 1, 1: 1} and run.depth() == 0  # nothing taken from a live worker
    assert doomed.proc is not None
    killed_at = time.monotonic()
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(10)
    wait_for(lambda: run.runs().get(0) == 2 and run.runs().get(1) == 2, timeout=40)
    recovered_s = time.monotonic() - killed_at
    wait_for(lambda: {2, 3, 4} <= run.finished(), timeout=30)
    assert recovered_s <= 30.0, recovered_s
    assert run.runs() == {0: 2, 1: 2, 2: 1, 3: 1, 4: 1}  # the killed pair ran again, once
    print(f"recovered {recovered_s:.1f} s after SIGKILL")
