"""The local lane with a real embedded worker: order, bounds, push, drain, isolation."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import ImproperlyConfigured
from kombu.asynchronous import set_event_loop

import celery_ext
from celery_ext import LocalWorker, QueueFull
from celery_ext.lane import lane_of


def new_app(**settings: Any) -> Celery:
    app = Celery(f"lane_{uuid.uuid4().hex[:8]}", broker="local://", set_as_current=False)
    app.conf.worker_hijack_root_logger = False
    celery_ext.install(app, **settings)
    return app


def test_tasks_run_in_publish_order() -> None:
    app = new_app()
    seen: list[int] = []

    @app.task(shared=False)
    def record(i: int) -> None:
        seen.append(i)

    for i in range(50):
        record.delay(i)
    with LocalWorker(app, pool="solo", concurrency=1) as worker:
        worker.join(timeout=10)
    assert seen == list(range(50))


def test_raise_policy_refuses_at_the_bound_with_queue_limit_and_depth() -> None:
    app = new_app(lane_max_queued=3, lane_full_policy="raise")

    @app.task(shared=False)
    def noop() -> None: ...

    for _ in range(3):
        noop.delay()
    with pytest.raises(QueueFull) as info:
        noop.delay()
    assert (info.value.queue, info.value.limit, info.value.depth) == ("celery", 3, 3)
    assert lane_of(app).depth("celery") == 3  # the refused message was not half-added


def test_block_policy_times_out_then_raises() -> None:
    app = new_app(lane_max_queued=2, lane_full_policy="block", lane_block_timeout=0.2)

    @app.task(shared=False)
    def noop() -> None: ...

    noop.delay()
    noop.delay()
    with pytest.raises(QueueFull) as info:
        noop.delay()
    assert info.value.waited_s >= 0.19
    assert lane_of(app).depth("celery") == 2


def test_block_policy_goes_on_when_a_consumer_makes_room() -> None:
    app = new_app(lane_max_queued=2, lane_full_policy="block", lane_block_timeout=30)
    ran: list[int] = []

    @app.task(shared=False)
    def record(i: int) -> None:
        ran.append(i)

    record.delay(0)
    record.delay(1)
    blocked = threading.Thread(target=record.delay, args=(2,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a publish to a full queue must wait"
    assert lane_of(app).depth("celery") == 2
    with LocalWorker(app, concurrency=1) as worker:
        blocked.join(10)
        assert not blocked.is_alive()
        worker.join(timeout=10)
    assert sorted(ran) == [0, 1, 2]


def test_auto_delete_queues_drop_oldest_instead_of_blocking() -> None:
    app = new_app(lane_max_queued=3, lane_full_policy="raise")
    lane = lane_of(app)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        channel.queue_declare("events.q", auto_delete=True)
        for i in range(5):
            channel.basic_publish(channel.prepare_message(str(i)), "", "events.q")
        bodies = [channel.basic_get("events.q", no_ack=True).body for _ in range(3)]
    assert bodies == [b"2", b"3", b"4"] or bodies == ["2", "3", "4"]
    assert lane.dropped_transient == 2


def test_unacked_messages_go_back_to_the_front_when_a_channel_closes() -> None:
    app = new_app()
    lane = lane_of(app)
    with app.connection_for_write() as conn:
        channel = conn.channel()
        channel.queue_declare("q")
        for body in ("a", "b"):
            channel.basic_publish(channel.prepare_message(body), "", "q")
        message = channel.basic_get("q")
        assert message is not None and lane.unacked() == 1
        channel.close()
    assert lane.depth("q") == 2 and lane.unacked() == 0
    with app.connection_for_write() as conn:
        first = conn.default_channel.basic_get("q", no_ack=True)
    assert first.body in (b"a", "a")


def test_an_idle_worker_is_woken_by_publish_not_by_polling() -> None:
    # kombu's memory transport polls once a second; a push lane starts at once.
    app = new_app()
    started = threading.Event()
    delays: list[float] = []

    @app.task(shared=False)
    def stamp(sent: float) -> None:
        delays.append(time.perf_counter() - sent)
        started.set()

    with LocalWorker(app, concurrency=2):
        for _ in range(20):
            started.clear()
            time.sleep(0.01)  # let the worker go idle; not synchronisation
            stamp.delay(time.perf_counter())
            assert started.wait(5)
    delays.sort()
    assert delays[10] < 0.1, delays  # median far below a 1 s poll
    assert delays[-1] < 0.5, delays


def test_stop_drains_queued_work_within_the_deadline() -> None:
    app = new_app()
    done: list[int] = []

    @app.task(shared=False)
    def work(i: int) -> None:
        done.append(i)

    worker = LocalWorker(app, concurrency=2).start()
    for i in range(200):
        work.delay(i)
    report = worker.stop(timeout=30)
    assert report.drained and report.dropped == 0 and not report.still_running
    assert sorted(done) == list(range(200))


def test_stop_reports_what_it_had_to_drop() -> None:
    app = new_app()
    done: list[int] = []
    release = threading.Event()

    @app.task(shared=False)
    def slow(i: int) -> None:
        release.wait(10)
        done.append(i)

    worker = LocalWorker(app, concurrency=1, pool="threads").start()
    ids = [slow.delay(i).id for i in range(10)]
    threading.Timer(0.5, release.set).start()
    report = worker.stop(timeout=0.3)
    assert not report.drained
    assert report.dropped > 0
    assert report.dropped + len(done) == 10, (report, done)
    assert set(report.dropped_ids) <= set(ids)
    assert lane_of(app).depth("celery") == 0 and lane_of(app).unacked() == 0


def test_prefork_is_refused_with_the_pools_that_work() -> None:
    app = new_app()
    with pytest.raises(ImproperlyConfigured, match="-P threads, -P solo or -P gevent"):
        app.WorkController(pool="prefork", concurrency=1)
    with pytest.raises(ImproperlyConfigured, match="prefork"):
        LocalWorker(app, pool="prefork").start()


def test_prefork_is_still_allowed_on_other_brokers() -> None:
    app = Celery("pf", broker="redis://127.0.0.1:1/0", set_as_current=False)
    celery_ext.install(app)
    try:
        worker = app.WorkController(pool="prefork", concurrency=1)
        assert worker.pool_cls.__module__ == "celery.concurrency.prefork"
    finally:
        # Building a worker sets kombu's process-wide event loop; a later worker in
        # this process would reuse it (and its never-started timer).
        set_event_loop(None)


def test_join_reraises_the_first_failure_at_once() -> None:
    app = new_app()
    gate = threading.Event()

    @app.task(shared=False)
    def bad() -> None:
        raise ZeroDivisionError("boom")

    @app.task(shared=False)
    def slow() -> None:
        gate.wait(20)

    with LocalWorker(app, concurrency=2) as worker:
        slow.delay()
        bad.delay()
        t0 = time.monotonic()
        with pytest.raises(ZeroDivisionError, match="boom"):
            worker.join(timeout=15)
        assert time.monotonic() - t0 < 10  # did not wait for the slow task
        gate.set()
        worker.join(timeout=10)  # the failure was reported once


def test_join_without_fail_fast_waits_and_does_not_raise() -> None:
    app = new_app()

    @app.task(shared=False)
    def bad() -> None:
        raise ValueError("x")

    with LocalWorker(app) as worker:
        bad.delay()
        worker.join(timeout=10, fail_fast=False)
        assert lane_of(app).depth("celery") == 0


def test_join_times_out_with_what_is_left() -> None:
    app = new_app()
    gate = threading.Event()

    @app.task(shared=False)
    def hold() -> None:
        gate.wait(20)

    with LocalWorker(app, concurrency=1) as worker:
        hold.delay()
        hold.delay()
        with pytest.raises(TimeoutError, match="still busy"):
            worker.join(timeout=0.3)
        gate.set()
        worker.join(timeout=10)


def test_results_signals_and_events_work_as_in_a_normal_worker() -> None:
    app = new_app()
    app.conf.update(result_backend="cache+memory://", worker_send_task_events=True)
    seen: list[str] = []

    def on_success(sender: Any = None, **_: Any) -> None:
        seen.append(sender.name)

    @app.task(shared=False, name="lane.add")
    def add(x: int, y: int) -> int:
        return x + y

    celery_ext_signal = __import__("celery").signals.task_success
    celery_ext_signal.connect(on_success, weak=False)
    try:
        with LocalWorker(app) as worker:
            assert add.delay(2, 3).get(timeout=10) == 5
            assert (add.s(1, 1) | add.s(10))().get(timeout=10) == 12
            worker.join(timeout=5)
    finally:
        celery_ext_signal.disconnect(on_success)
    assert seen.count("lane.add") == 3


def test_remote_control_and_inspect_stats_work_over_the_lane() -> None:
    app = new_app()
    with LocalWorker(app) as worker:
        inspect = app.control.inspect(destination=[worker.hostname], timeout=5)
        assert inspect.ping() == {worker.hostname: {"ok": "pong"}}
        stats = inspect.stats()
        assert stats is not None and worker.hostname in stats
        options = stats[worker.hostname]["broker"]["transport_options"]
        assert options["celery_ext_lanes"] == "celery_ext local lanes: local://"  # readable


def test_publishing_from_many_threads_loses_nothing() -> None:
    app = new_app()
    seen: list[int] = []

    @app.task(shared=False)
    def record(i: int) -> None:
        seen.append(i)

    def publish(start: int) -> None:
        for i in range(start, start + 200):
            record.delay(i)

    with LocalWorker(app, concurrency=4) as worker:
        threads = [threading.Thread(target=publish, args=(n * 200,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        worker.join(timeout=30)
    assert sorted(seen) == list(range(800))
    assert type(app.amqp).__name__ == "LaneAMQP"


def test_parked_messages_run_when_due_in_due_order() -> None:
    app = new_app()
    lane = lane_of(app)
    ran: list[str] = []
    started: dict[str, float] = {}
    due: dict[str, float] = {}

    @app.task(shared=False, name="park.local")
    def record(tag: str) -> None:
        started[tag] = time.monotonic()
        ran.append(tag)

    with LocalWorker(app) as worker:
        for tag, delay in (("late", 0.4), ("soon", 0.1), ("never", 60.0)):
            with app.connection_for_write() as conn:
                channel = conn.default_channel
                channel.queue_declare("parking-lot")
                record.apply_async((tag,), queue="parking-lot")
                message = channel.basic_get("parking-lot", no_ack=True)
            due[tag] = lane.park("celery", message.serializable(), delay_s=delay)
        assert lane.parked("celery") == 3
        with pytest.raises(TimeoutError):
            worker.join(timeout=1.5)  # "never" is still parked: the lane is not idle
        assert ran == ["soon", "late"], ran
        assert all(started[tag] >= due[tag] for tag in ran), (started, due)
        report = worker.stop(timeout=0.1)
    assert report.dropped == 1 and lane.parked("celery") == 0


def test_parking_is_bounded_like_the_queues() -> None:
    app = new_app(lane_max_queued=2)
    lane = lane_of(app)
    raw = {"body": "x", "properties": {"delivery_tag": 1}, "headers": {}}
    lane.park("q", raw, 10)
    lane.park("q", raw, 10)
    with pytest.raises(QueueFull) as info:
        lane.park("q", raw, 10)
    assert (info.value.queue, info.value.limit) == ("q", 2)
