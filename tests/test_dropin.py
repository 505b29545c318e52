"""Drop-in compatibility: stock Celery behaves the same after ``celery_ext.install(app)``.

Each test runs one scenario twice on the same broker (Redis, RabbitMQ) with a real
embedded worker: on a plain app, then on an app with ``install(app)`` and no
celery_ext options. The observable outcomes (values, states, runs, signals) must be
equal, and right. Results go to Redis db 14 under a per-test key prefix, deleted after.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
import redis
from celery import Celery, chain, chord, group, signals, states
from celery.app.task import Task
from celery.concurrency.thread import TaskPool as ThreadsPool
from celery.contrib.testing.worker import start_worker
from celery.exceptions import MaxRetriesExceededError, TaskRevokedError
from celery.utils.imports import symbol_by_name as symbol
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request

import celery_ext
from celery_ext.timeouts import TimeoutPool, Timeouts
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.helpers import broker_url, embedded_worker, get_or_dump, new_app, wait_for

RESULTS_DB = 14  # the result backend's db: no other test or benchmark uses it
T = TypeVar("T")
MakeApp = Callable[[bool], Celery]


class DropinError(Exception):
    """A user-defined exception: its type must survive the result backend."""


@pytest.fixture(params=["redis", "amqp"])
def make_app(request: pytest.FixtureRequest, unique_queue: str) -> Iterator[MakeApp]:
    """``make_app(installed)``: a fresh app on this broker, with install(app) or without."""
    url = broker_url(request, request.param)
    request.getfixturevalue("redis_url")  # the result backend is Redis on both brokers
    made: list[tuple[Celery, str]] = []

    def make(installed: bool) -> Celery:
        queue = f"{unique_queue}.{'ext' if installed else 'plain'}"
        app = new_app(url, queue)
        app.conf.result_backend = f"redis://{REDIS_HOST}:{REDIS_PORT}/{RESULTS_DB}"
        app.conf.result_backend_transport_options = {"global_keyprefix": f"{unique_queue}."}
        if installed:
            celery_ext.install(app)
        made.append((app, queue))
        return app

    yield make
    for app, queue in made:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
            if request.param == "amqp":  # Celery declared an exchange named after the queue
                conn.default_channel.exchange_delete(queue)
        app.close()
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=RESULTS_DB)
    for key in client.scan_iter(match=f"{unique_queue}.*"):
        client.delete(key)
    client.close()


def compare(make_app: MakeApp, scenario: Callable[[Celery], T]) -> T:
    """Run ``scenario`` on a plain app, then on an installed one; both outcomes must match."""
    plain = scenario(make_app(False))
    installed = scenario(make_app(True))
    assert installed == plain, f"install(app) changed stock behaviour:\n{plain=}\n{installed=}"
    return plain


@contextmanager
def worker(app: Celery, concurrency: int = 2) -> Iterator[Any]:
    """An embedded threads worker; on an installed app it really runs celery_ext's pool."""
    with embedded_worker(
        app, concurrency=concurrency, hostname=f"dropin-{uuid.uuid4().hex[:8]}@localhost"
    ) as w:
        installed = Timeouts in app.steps["worker"]
        assert (type(w.pool) is TimeoutPool) is installed, type(w.pool)
        # On Redis the worker subscribes to broadcasts (revoke, ping) at its event loop's
        # first poll, after it reports ready: one sent before that is lost, on both sides.
        wait_for(lambda: app.control.ping(destination=[w.hostname], timeout=0.5), timeout=20)
        yield w


def fresh(app: Celery, task_id: str) -> Any:
    """A new AsyncResult (one that saw a state keeps it cached)."""
    return app.AsyncResult(task_id)


def held_ids(requests: Any) -> set[str]:
    """Task ids in one of the worker's request sets (a WeakSet another thread changes)."""
    while True:
        try:
            return {request.id for request in list(requests)}
        except RuntimeError:  # changed size during iteration
            continue


def outcome(result: Any) -> tuple[str, Any]:
    """(state, value) of a finished result; an exception as (module, type, args)."""
    value = result.get(timeout=20, propagate=False)
    if isinstance(value, BaseException):  # task ids differ from run to run
        args = tuple(a.replace(result.id, "<id>") if isinstance(a, str) else a for a in value.args)
        value = (type(value).__module__, type(value).__qualname__, args)
    return result.state, value


@contextmanager
def recorded_signals(app: Celery) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    """Task signals of ``app``'s tasks, normalised, per task id in the order they fired.

    No ``sender=`` filter: ``@app.task`` returns a lazy proxy, not the task the worker sends.
    """
    events: dict[str, list[tuple[Any, ...]]] = {}
    lock = threading.Lock()

    def add(task: Any, task_id: str, event: tuple[Any, ...]) -> None:
        if getattr(task, "app", None) is app:
            with lock:
                events.setdefault(task_id, []).append(event)

    def prerun(sender: Any = None, task_id: str = "", task: Any = None, **kw: Any) -> None:
        add(sender, task_id, ("prerun", task.name, tuple(kw["args"]), dict(kw["kwargs"])))

    def postrun(sender: Any = None, task_id: str = "", task: Any = None, **kw: Any) -> None:
        retval = kw["retval"]
        if isinstance(retval, BaseException):
            retval = type(retval).__name__
        add(sender, task_id, ("postrun", task.name, kw["state"], retval))

    def success(sender: Any = None, result: Any = None, **kw: Any) -> None:
        add(sender, sender.request.id, ("success", sender.name, result))

    def failure(sender: Any = None, task_id: str = "", exception: Any = None, **kw: Any) -> None:
        event = ("failure", sender.name, type(exception).__name__, exception.args)
        add(sender, task_id, (*event, tuple(kw["args"]), kw["einfo"] is not None))

    def retry(sender: Any = None, request: Any = None, reason: Any = None, **kw: Any) -> None:
        event = ("retry", sender.name, type(reason).__name__, str(reason))
        add(sender, request.id, (*event, kw["einfo"] is not None))

    def revoked(sender: Any = None, request: Any = None, **kw: Any) -> None:
        add(sender, request.id, ("revoked", sender.name, kw["terminated"], kw["expired"]))

    handlers = [
        (signals.task_revoked, revoked),
        (signals.task_prerun, prerun),
        (signals.task_postrun, postrun),
        (signals.task_success, success),
        (signals.task_failure, failure),
        (signals.task_retry, retry),
    ]
    for signal, handler in handlers:
        signal.connect(handler, weak=False)
    try:
        yield events
    finally:
        for signal, handler in handlers:
            signal.disconnect(handler)


def test_chain_passes_each_result_to_the_next_task(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> Any:
        @app.task(shared=False, name="dropin.add")
        def add(x: int, y: int) -> int:
            return x + y

        @app.task(shared=False, name="dropin.mul")
        def mul(x: int, y: int) -> int:
            return x * y

        with worker(app):
            result = chain(add.s(2, 3), mul.s(4), add.s(1)).apply_async()
            final = get_or_dump(result, 20)
            # Stock Celery publishes the next step before it stores a step's result
            # (celery/app/trace.py): a step's state is read only after its own get().
            steps = [result.parent.parent, result.parent, result]
            return final, [(r.get(timeout=5), r.state) for r in steps]

    assert compare(make_app, scenario) == (21, [(5, "SUCCESS"), (20, "SUCCESS"), (21, "SUCCESS")])


def test_group_returns_every_result_in_submission_order(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> Any:
        @app.task(shared=False, name="dropin.slow_double")
        def slow_double(x: int) -> int:
            time.sleep((5 - x) * 0.03)  # later members finish first
            return 2 * x

        with worker(app):
            result = group(slow_double.s(i) for i in range(6)).apply_async()
            values = get_or_dump(result, 20)
            return values, [r.state for r in result.results], result.successful()

    assert compare(make_app, scenario) == ([0, 2, 4, 6, 8, 10], ["SUCCESS"] * 6, True)


def test_chord_calls_its_body_once_with_every_header_result(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> Any:
        bodies: list[list[int]] = []

        @app.task(shared=False, name="dropin.square")
        def square(x: int) -> int:
            return x * x

        @app.task(shared=False, name="dropin.total")
        def total(values: list[int]) -> int:
            bodies.append(sorted(values))
            return sum(values)

        with worker(app):
            result = chord(square.s(i) for i in range(5))(total.s())
            value = get_or_dump(result, 20)
            header = [fresh(app, r.id).state for r in result.parent.results]
        return value, result.state, header, bodies

    assert compare(make_app, scenario) == (30, "SUCCESS", ["SUCCESS"] * 5, [[0, 1, 4, 9, 16]])


def test_a_task_revoked_before_it_arrives_does_not_run(make_app: MakeApp) -> None:
    # Stock workers check for a revoke when a message arrives and before they hand a
    # request to the pool; a threads pool already holding it runs it anyway. So the
    # revoke goes first (reply=True: the worker has it), then the message.
    def scenario(app: Celery) -> Any:
        ran: list[int] = []

        @app.task(shared=False, name="dropin.target")
        def target(x: int) -> int:
            ran.append(x)
            return x

        with recorded_signals(app) as events, worker(app) as w:
            task_id = str(uuid.uuid4())
            replies = app.control.revoke(task_id, destination=[w.hostname], reply=True, timeout=5)
            revoked = target.apply_async((1,), task_id=task_id)
            assert get_or_dump(target.delay(2), 20) == 2  # the worker is consuming
            wait_for(lambda: task_id in events)
            with pytest.raises(TaskRevokedError):
                revoked.get(timeout=5)
            state = fresh(app, task_id).state
        reply = [next(iter(r.values()))["ok"].replace(task_id, "<id>") for r in replies]
        return ran, state, events[task_id], reply

    assert compare(make_app, scenario) == (
        [2],
        states.REVOKED,
        [("revoked", "dropin.target", False, False)],
        ["tasks {'<id>'} flagged as revoked"],
    )


def test_revoke_without_terminate_cancels_a_countdown_task_waiting_in_the_worker(
    make_app: MakeApp,
) -> None:
    def scenario(app: Celery) -> Any:
        ran: list[int] = []

        @app.task(shared=False, name="dropin.later")
        def later(x: int) -> int:
            ran.append(x)
            return x

        with recorded_signals(app) as events, worker(app) as w:
            waiting = later.apply_async((1,), countdown=1)
            wait_for(lambda: waiting.id in held_ids(worker_state.scheduled_requests))
            app.control.revoke(
                waiting.id, terminate=False, destination=[w.hostname], reply=True, timeout=5
            )
            state_at_revoke = fresh(app, waiting.id).state
            # Due after the revoked one: once it ran, the revoked one's ETA has passed.
            sentinel = later.apply_async((2,), countdown=1.2)
            assert get_or_dump(sentinel, 20) == 2
            wait_for(lambda: waiting.id in events)
            state = fresh(app, waiting.id).state
        return state_at_revoke, state, ran, events[waiting.id]

    assert compare(make_app, scenario) == (
        states.REVOKED,
        states.REVOKED,
        [2],
        [("revoked", "dropin.later", False, False)],
    )


def test_a_rate_limit_spaces_the_runs(make_app: MakeApp) -> None:
    count, per_second = 6, 5

    def scenario(app: Celery) -> Any:
        starts: list[float] = []

        @app.task(shared=False, name="dropin.limited", rate_limit=f"{per_second}/s")
        def limited(x: int) -> int:
            starts.append(time.monotonic())
            return x

        with worker(app):
            result = group(limited.s(i) for i in range(count)).apply_async()
            values = get_or_dump(result, 30)
        span = max(starts) - min(starts)
        # Lenient lower bound only: 5 gaps of 0.2 s, minus 20 % for clock and scheduling noise.
        return values, len(starts), span >= 0.8 * (count - 1) / per_second or span

    assert compare(make_app, scenario) == (list(range(count)), count, True)


def test_autoretry_for_with_backoff_retries_then_fails_or_succeeds(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> Any:
        runs: dict[str, list[tuple[int, float]]] = {"down": [], "flaky": []}
        options: dict[str, Any] = {
            "autoretry_for": (ConnectionError,),
            "retry_backoff": 1,  # 1 s, 2 s, ... capped at 1 s
            "retry_backoff_max": 1,
            "retry_jitter": False,
            "max_retries": 2,
        }

        @app.task(shared=False, bind=True, name="dropin.down", **options)
        def down(self: Any) -> None:
            runs["down"].append((self.request.retries, time.monotonic()))
            raise ConnectionError("still down")

        @app.task(shared=False, bind=True, name="dropin.flaky", **options)
        def flaky(self: Any) -> int:
            runs["flaky"].append((self.request.retries, time.monotonic()))
            if self.request.retries < 1:
                raise ConnectionError("blip")
            return int(self.request.retries)

        with worker(app):
            failing, recovering = down.delay(), flaky.delay()
            with pytest.raises(ConnectionError, match="still down"):
                get_or_dump(failing, 30)
            ok = get_or_dump(recovering, 30)
            failed = outcome(fresh(app, failing.id))
        gaps = [b[1] - a[1] >= 0.9 for name in runs for a, b in itertools.pairwise(runs[name])]
        retries = {name: [r for r, _ in seen] for name, seen in runs.items()}
        return failed, ok, retries, gaps

    failed, ok, retries, gaps = compare(make_app, scenario)
    assert failed == (states.FAILURE, ("builtins", "ConnectionError", ("still down",)))
    assert ok == 1
    assert retries == {"down": [0, 1, 2], "flaky": [0, 1]}
    assert gaps == [True] * 3  # every retry waited its backoff of 1 s


def test_manual_retry_with_countdown_keeps_stock_semantics(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> Any:
        runs: dict[str, list[float]] = {"with_exc": [], "without_exc": [], "eventually": []}

        @app.task(shared=False, bind=True, name="dropin.with_exc", max_retries=1)
        def with_exc(self: Any) -> None:
            runs["with_exc"].append(time.monotonic())
            raise self.retry(exc=KeyError("missing"), countdown=0.5)

        @app.task(shared=False, bind=True, name="dropin.without_exc", max_retries=1)
        def without_exc(self: Any) -> None:
            runs["without_exc"].append(time.monotonic())
            raise self.retry(countdown=0.5)

        @app.task(shared=False, bind=True, name="dropin.eventually", max_retries=0)
        def eventually(self: Any) -> int:
            runs["eventually"].append(time.monotonic())
            if self.request.retries < 2:  # the per-call max_retries overrides the task's 0
                raise self.retry(exc=ValueError("again"), countdown=0.3, max_retries=2)
            return int(self.request.retries)

        with worker(app):
            results = [with_exc.delay(), without_exc.delay(), eventually.delay()]
            outcomes = [outcome(r) for r in results]
        counts = {name: len(times) for name, times in runs.items()}
        waited = all(
            b - a >= countdown - 0.05
            for name, countdown in (("with_exc", 0.5), ("without_exc", 0.5), ("eventually", 0.3))
            for a, b in itertools.pairwise(runs[name])
        )
        return outcomes, counts, waited

    outcomes, counts, waited = compare(make_app, scenario)
    assert outcomes == [
        (states.FAILURE, ("builtins", "KeyError", ("missing",))),
        (
            states.FAILURE,
            (
                "celery.exceptions",
                MaxRetriesExceededError.__qualname__,
                ("Can't retry dropin.without_exc[<id>] args:() kwargs:{}",),
            ),
        ),
        (states.SUCCESS, 2),
    ]
    assert counts == {"with_exc": 2, "without_exc": 2, "eventually": 3}
    assert waited


def test_countdown_and_eta_tasks_run_once_and_not_before_they_are_due(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> Any:
        runs: list[tuple[str, float]] = []

        @app.task(shared=False, name="dropin.due")
        def due(label: str) -> str:
            runs.append((label, time.time()))
            return label

        with worker(app):
            countdown_due = time.time() + 1
            by_countdown = due.apply_async(("countdown",), countdown=1)
            eta = datetime.now(timezone.utc) + timedelta(seconds=1)
            by_eta = due.apply_async(("eta",), eta=eta)
            ids = {by_countdown.id, by_eta.id}
            wait_for(lambda: ids <= held_ids(worker_state.scheduled_requests) or runs)
            held = not runs  # both waited in the worker, neither had run
            values = [get_or_dump(r, 20) for r in (by_countdown, by_eta)]
        dues = {"countdown": countdown_due, "eta": eta.timestamp()}
        on_time = {label: at >= dues[label] - 0.05 for label, at in runs}
        return held, values, sorted(label for label, _ in runs), on_time

    assert compare(make_app, scenario) == (
        True,
        ["countdown", "eta"],
        ["countdown", "eta"],
        {"countdown": True, "eta": True},
    )


def test_task_signals_fire_in_order_with_the_usual_arguments(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> Any:
        @app.task(shared=False, name="dropin.ok")
        def ok(x: int, scale: int = 1) -> int:
            return x * scale

        @app.task(shared=False, name="dropin.bad")
        def bad(x: int) -> None:
            raise ValueError(f"bad {x}")

        @app.task(shared=False, bind=True, name="dropin.again")
        def again(self: Any) -> str:
            if self.request.retries == 0:
                raise self.retry(exc=KeyError("first"), countdown=0.2)
            return "second"

        with recorded_signals(app) as events, worker(app, concurrency=1):
            sent = [ok.delay(3, scale=2), bad.delay(4), again.delay()]
            for result in sent:
                result.get(timeout=20, propagate=False)
            # task_postrun fires after the result is stored: wait for the last one.
            wait_for(
                lambda: (
                    [e[-1][0] for e in map(events.get, [r.id for r in sent]) if e]
                    == ["postrun"] * 3
                )
            )
        return [events[r.id] for r in sent]

    ok, bad, again = compare(make_app, scenario)
    assert ok == [
        ("prerun", "dropin.ok", (3,), {"scale": 2}),
        ("success", "dropin.ok", 6),
        ("postrun", "dropin.ok", "SUCCESS", 6),
    ]
    assert bad == [
        ("prerun", "dropin.bad", (4,), {}),
        ("failure", "dropin.bad", "ValueError", ("bad 4",), (4,), True),
        ("postrun", "dropin.bad", "FAILURE", "ValueError"),
    ]
    assert again[0] == ("prerun", "dropin.again", (), {})
    assert again[1][:3] == ("retry", "dropin.again", "Retry") and again[1][-1] is True
    assert again[2:] == [
        ("postrun", "dropin.again", "RETRY", "Retry"),
        ("prerun", "dropin.again", (), {}),
        ("success", "dropin.again", "second"),
        ("postrun", "dropin.again", "SUCCESS", "second"),
    ]


def test_results_keep_states_and_exception_types_and_ignore_result_stores_nothing(
    make_app: MakeApp,
) -> None:
    def scenario(app: Celery) -> Any:
        ran: list[str] = []

        @app.task(shared=False, name="dropin.value")
        def value(x: int) -> dict[str, Any]:
            return {"x": x, "items": [x, str(x)]}

        @app.task(shared=False, name="dropin.fails")
        def fails(kind: str) -> None:
            if kind == "builtin":
                raise ValueError("a builtin", 7)
            raise DropinError("a custom one")

        @app.task(shared=False, name="dropin.quiet", ignore_result=True)
        def quiet(label: str) -> str:
            ran.append(label)
            return label

        @app.task(shared=False, name="dropin.loud")
        def loud(label: str) -> str:
            ran.append(label)
            return label

        with worker(app, concurrency=1):
            results = [value.delay(5), fails.delay("builtin"), fails.delay("custom")]
            outcomes = [outcome(r) for r in results]
            with pytest.raises(DropinError, match="a custom one"):
                results[2].get(timeout=5)
            traceback_names = "DropinError" in (results[2].traceback or "")
            ignored = [quiet.delay("by task"), loud.apply_async(("by call",), ignore_result=True)]
            get_or_dump(loud.delay("sentinel"), 20)  # one thread: the two before are done
        stored = [app.backend.get(app.backend.get_key_for_task(r.id)) for r in ignored]
        return (
            outcomes,
            traceback_names,
            sorted(ran),
            [fresh(app, r.id).state for r in ignored],
            stored,
        )

    outcomes, traceback_names, ran, ignored_states, stored = compare(make_app, scenario)
    assert outcomes == [
        (states.SUCCESS, {"x": 5, "items": [5, "5"]}),
        (states.FAILURE, ("builtins", "ValueError", ("a builtin", 7))),
        (states.FAILURE, (__name__, "DropinError", ("a custom one",))),
    ]
    assert traceback_names
    assert ran == ["by call", "by task", "sentinel"]
    assert ignored_states == [states.PENDING, states.PENDING]
    assert stored == [None, None]


def test_celerys_own_time_limits_keep_their_meaning_errors_and_moment(make_app: MakeApp) -> None:
    """``soft_time_limit`` above ``time_limit`` is not an error at finalize (the app starts,
    its other tasks send); applying that task raises Celery's ValueError; equal limits run."""

    def scenario(app: Celery) -> tuple[Any, ...]:
        @app.task(shared=False, name="dropin.inverted", soft_time_limit=2, time_limit=1)
        def inverted() -> str:
            return "never sent"

        @app.task(shared=False, name="dropin.equal", soft_time_limit=5, time_limit=5)
        def equal() -> str:
            return "equal"

        @app.task(shared=False, name="dropin.other")
        def other() -> str:
            return "other"

        app.finalize()
        with pytest.raises(ValueError) as raised:
            inverted.delay()
        with worker(app):
            return (
                str(raised.value),
                other.delay().get(timeout=20),
                equal.delay().get(timeout=20),
                (app.tasks["dropin.equal"].soft_time_limit, app.tasks["dropin.equal"].time_limit),
            )

    assert compare(make_app, scenario) == (
        "soft_time_limit must be less than or equal to time_limit",
        "other",
        "equal",
        (5, 5),
    )


class NotingRequest(Request):  # type: ignore[misc]
    """A user's own worker Request class: it notes each task it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        NOTED.append(("request", self.task_name))


class HookedTask(Task):  # type: ignore[misc]
    """A user's own Task base (``task_cls``): hooks and a Request class of its own."""

    Request = NotingRequest

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        NOTED.append(("on_success", retval))


NOTED: list[tuple[str, Any]] = []


def test_custom_task_class_request_annotations_and_delivery_options_stay_as_declared(
    make_app: MakeApp,
) -> None:
    """``task_cls`` with its own hooks and Request class, the user's ``task_annotations``,
    ``acks_late``/``reject_on_worker_lost``, priorities and ``broker_transport_options``."""

    def scenario(app: Celery) -> tuple[Any, ...]:
        NOTED.clear()
        app.conf.task_annotations = {"dropin.annotated": {"rate_limit": "100/s", "acks_late": True}}
        app.conf.broker_transport_options = {
            **(app.conf.broker_transport_options or {}),
            "visibility_timeout": 4321,
        }
        app.Task = app.subclass_with_self(HookedTask)  # what task_cls="module:Class" sets

        @app.task(shared=False, name="dropin.annotated", reject_on_worker_lost=True)
        def annotated() -> Any:
            return annotated.request.delivery_info.get("priority")

        app.finalize()
        task = app.tasks["dropin.annotated"]
        declared = (
            task.rate_limit,
            task.acks_late,
            task.reject_on_worker_lost,
            isinstance(task, HookedTask),
            issubclass(symbol(task.Request), NotingRequest),
            app.conf.broker_transport_options["visibility_timeout"],
        )
        with app.connection_for_write() as conn:
            visibility = getattr(conn.default_channel, "visibility_timeout", None)
        with worker(app):
            value = annotated.apply_async(priority=3).get(timeout=20)
            # The task's on_success runs just after its result is stored.
            wait_for(lambda: len(NOTED) == 2, timeout=10)
        return declared, visibility, value, sorted(NOTED)

    declared, visibility, value, noted = compare(make_app, scenario)
    assert declared == ("100/s", True, True, True, True, 4321)
    assert visibility in (4321, None)  # Redis reads it; RabbitMQ has no such thing
    assert value == 3, value  # the priority reached the task on both brokers
    assert noted == [("on_success", value), ("request", "dropin.annotated")], noted


class NotingPool(ThreadsPool):  # type: ignore[misc]
    """A user's own pool class (``-P tests.test_dropin:NotingPool``)."""


class NotingConsumer(Consumer):  # type: ignore[misc]
    """A user's own ``worker_consumer`` class."""


def test_a_custom_pool_class_and_worker_consumer_stay_the_users(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> tuple[Any, ...]:
        app.conf.worker_consumer = f"{__name__}:NotingConsumer"

        @app.task(shared=False, name="dropin.plain")
        def plain(x: int) -> int:
            return x * 2

        name = f"dropin-{uuid.uuid4().hex[:8]}@localhost"
        with embedded_worker(app, pool=NotingPool, hostname=name) as w:
            wait_for(lambda: app.control.ping(destination=[name], timeout=0.5), timeout=20)
            return type(w.pool).__name__, type(w.consumer).__name__, plain.delay(21).get(20)

    assert compare(make_app, scenario) == ("NotingPool", "NotingConsumer", 42)


def test_task_routes_send_a_task_to_its_routed_queue(make_app: MakeApp) -> None:
    def scenario(app: Celery) -> tuple[Any, ...]:
        default = app.conf.task_default_queue
        routed = f"{default}.routed"
        app.conf.task_routes = {"dropin.routed": {"queue": routed}}

        @app.task(shared=False, name="dropin.routed")
        def routed_task() -> Any:
            return routed_task.request.delivery_info.get("routing_key")

        name = f"dropin-{uuid.uuid4().hex[:8]}@localhost"
        try:
            with start_worker(
                app,
                pool="threads",
                perform_ping_check=False,
                queues=[default, routed],
                hostname=name,
            ):
                wait_for(lambda: app.control.ping(destination=[name], timeout=0.5), timeout=20)
                key = routed_task.delay().get(timeout=20)
                active = app.control.inspect(destination=[name], timeout=5).active_queues()
                queues = sorted(q["name"] for q in active[name])
        finally:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(routed)
                conn.default_channel.exchange_delete(routed)  # Celery declared one per queue
        return key == routed, queues == sorted([default, routed])

    assert compare(make_app, scenario) == (True, True)
