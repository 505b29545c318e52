"""What celery_ext knows about a worker, in one place: ``inspect stats`` (so Flower) and Prometheus.

The :class:`Section` consumer step puts celery_ext's section in the worker's
``inspect stats`` reply as short flat rows (``celery_ext.held: 3``,
``celery_ext.tasks: {'succeeded': 10, ...}``: one figure or small group each),
which Flower lists on the worker page (tab "Other"); :func:`stats_section`
nests them again, as ``celery ext status`` reads them:

- limits: ``prefetch_limit``, ``eta_buffer``, ``prefetch_bytes``, queue bounds,
  drain timeout, worker default time limits;
- live counts: ``held``, ``reserved``, ``active``, ``eta_held``, ``qos``;
- counters: ``parked_total``, ``shed_total``, ``queue_full_total`` and ``tasks`` (succeeded,
  failed, retried, dead_lettered, soft_timeouts, hard_timeouts, handed_back by a drain),
  counted in the worker's main process from what every pool reports back, so prefork
  children count too;
  ``bad_input``: messages the worker could not run, by reason (undecodable,
  unknown_task, invalid_message, oversize; not_dead_lettered when keeping one failed);
- ``drain`` (state ``running``/``draining``/``drained`` and the last report),
  ``leases`` (Redis), ``probes``, ``pool`` (abandoned and stuck threads).

Events (with ``-E``), beside Celery's own: ``task-soft-timeout`` (``limit``),
``task-dead-lettered`` (``reason``, ``attempts``, ``queue``), ``task-parked`` and
``task-unparked`` (``eta``; Flower shows the states PARKED and UNPARKED),
``worker-celery_ext-bad-input`` (``reason``, ``id``, ``queue``, ``dead_lettered``),
``worker-celery_ext-drain-started`` (``drain_timeout_s``) and, on the threads
and solo pools, ``worker-celery_ext-drain-finished`` (the report's counts;
prefork and gevent report after the event connection closed).

With ``--metrics-port`` (or ``celery_ext_metrics_port``) the same numbers are
served as Prometheus text on ``127.0.0.1:PORT/metrics`` (prometheus_client; other
paths answer 404; ``--metrics-address 0.0.0.0`` for a scrape of the pod's IP),
names prefixed ``celery_ext_``, counters ending in ``_total``; a port another
process holds stops the worker's start (:class:`~celery_ext.errors.PortInUse`).

Example::

    celery -A shop worker --metrics-port 9808
    curl -s 127.0.0.1:9808/metrics | grep celery_ext_held
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

from celery import bootsteps
from celery.exceptions import Retry, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from . import _compat
from ._http import listen, url_of
from ._settings import settings_of
from .consumer_state import state_of
from .errors import HandedBack
from .transports import guarantees

__all__ = [
    "CountingRequest",
    "Section",
    "counters_of",
    "section",
    "send_task_event",
    "send_worker_event",
    "stats_rows",
    "stats_section",
]

logger = logging.getLogger(__name__)

_COUNTERS = "_celery_ext_counters"
#: Set on an exception whose task was dead-lettered (survives pickling to the parent).
DEAD_LETTERED = "celery_ext_dead_lettered"
TASK_COUNTERS = (
    "succeeded",
    "failed",
    "retried",
    "dead_lettered",
    "soft_timeouts",
    "hard_timeouts",
    "handed_back",
)
#: Messages a worker could not run, by reason (see :mod:`celery_ext.intake`).
BAD_INPUT_COUNTERS = (
    "undecodable",
    "unknown_task",
    "invalid_message",
    "oversize",
    "not_dead_lettered",
)
_GROUPS = {"tasks": TASK_COUNTERS, "bad_input": BAD_INPUT_COUNTERS}


class Counters:
    """Counters of one app in this process (task outcomes, or another group); thread-safe.

    Example::

        counters_of(app).add("succeeded")
        counters_of(app).snapshot()["succeeded"]   # 1
    """

    def __init__(self, names: tuple[str, ...] = TASK_COUNTERS) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


def counters_of(app: Any, group: str = "tasks") -> Counters:
    """The counters of ``app`` (made on first use): task outcomes, or ``"bad_input"``.

    Example::

        counters_of(app).snapshot()
        counters_of(app, "bad_input").snapshot()["undecodable"]
    """
    key = _COUNTERS if group == "tasks" else f"{_COUNTERS}_{group}"
    counters: Counters | None = app.__dict__.get(key)
    if counters is None:
        counters = app.__dict__.setdefault(key, Counters(_GROUPS[group]))
    return counters


def _unwrap(exc: Any) -> Any:
    return getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback


def _counting(on_success: Any) -> Any:
    @functools.wraps(on_success)
    def counted(self: Any, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not failed__retval__runtime[0]:
            counters_of(self.app).add("succeeded")
        return on_success(self, failed__retval__runtime, **kwargs)

    counted.celery_ext_counting = True  # type: ignore[attr-defined]
    return counted


class CountingRequest(Request):  # type: ignore[misc]
    """Celery's worker Request, counting outcomes in the worker's main process.

    Every pool hands results back through ``on_success``/``on_failure`` and
    time limits through ``on_timeout``, in the process that consumes, so the
    counts cover prefork children too. ``install(app)`` makes it the Request
    of tasks that keep Celery's default one.

    Example::

        app.tasks["shop.export"].Request   # 'celery_ext.metrics:CountingRequest'
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The worker subclasses the Request of each task (create_request_cls) with an
        # on_success of its own that does not call ours: count in it too.
        super().__init_subclass__(**kwargs)
        inner = cls.__dict__.get("on_success")
        if inner is not None and not getattr(inner, "celery_ext_counting", False):
            cls.on_success = _counting(inner)  # type: ignore[method-assign]

    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not failed__retval__runtime[0]:
            counters_of(self.app).add("succeeded")
        return super().on_success(failed__retval__runtime, **kwargs)

    on_success.celery_ext_counting = True  # type: ignore[attr-defined]

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = _unwrap(getattr(exc_info, "exception", None))
        counters = counters_of(self.app)
        if isinstance(exc, Retry):
            counters.add("retried")
        elif isinstance(exc, HandedBack):  # a drain gave it back to the broker
            counters.add("handed_back")
        elif not isinstance(exc, TimeLimitExceeded):  # counted by on_timeout
            counters.add("failed")
        if getattr(exc, DEAD_LETTERED, False):
            counters.add("dead_lettered")
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        counters_of(self.app).add("soft_timeouts" if soft else "hard_timeouts")
        if not soft:
            counters_of(self.app).add("failed")
        else:  # Flower shows the task as SOFT-TIMEOUT until it ends
            self.send_event("task-soft-timeout", limit=timeout)
        return super().on_timeout(soft, timeout)  # type: ignore[no-any-return]


def send_worker_event(c: Any, kind: str, **fields: Any) -> None:
    """Send ``worker-celery_ext-<kind>`` through the consumer's event dispatcher.

    Sent only when the worker sends events (``-E``); ``celery events`` and
    Flower's event state receive it. Never raises.

    Example::

        send_worker_event(c, "drain-started", drain_timeout_s=30.0)
    """
    _send(c, f"worker-celery_ext-{kind}", fields)


def send_task_event(c: Any, kind: str, **fields: Any) -> None:
    """Send ``task-<kind>`` through the consumer's event dispatcher (with ``-E``); never raises.

    Flower shows a task event it does not know as the task's state (``PARKED``).

    Example::

        send_task_event(c, "parked", uuid=task_id, eta=eta)
    """
    _send(c, f"task-{kind}", fields)


def _send(c: Any, event: str, fields: dict[str, Any]) -> None:
    dispatcher = getattr(c, "event_dispatcher", None)
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return
    try:
        dispatcher.send(event, **fields)
    except Exception:  # monitoring must not change what the worker does
        logger.debug("celery_ext: could not send the %s event", event, exc_info=True)


def section(c: Any) -> dict[str, Any]:
    """The ``celery_ext`` section of consumer ``c`` (what ``inspect stats`` shows).

    Example::

        section(worker.consumer)["held"]
    """
    out: dict[str, Any] = {}
    state = state_of(c)
    backpressure = state.backpressure
    if backpressure is not None:
        out.update(backpressure.section(c))
    out["reserved"] = len(worker_state.reserved_requests)
    out["active"] = len(worker_state.active_requests)
    out["tasks"] = counters_of(c.app).snapshot()
    out["bad_input"] = counters_of(c.app, "bad_input").snapshot()
    controller = getattr(c, "controller", None)
    drain = state.drain
    out["drain"] = drain.section(controller) if drain is not None else {"state": "running"}
    out["timeouts"] = {  # the worker's defaults (--time-limit, --soft-time-limit)
        "time_limit": getattr(controller, "time_limit", None),
        "soft_time_limit": getattr(controller, "soft_time_limit", None),
    }
    pool = getattr(c, "pool", None)
    info = _pool_info(pool)
    out["pool"] = {
        key: info[key] for key in ("abandoned_threads", "stuck_threads", "threads") if key in info
    }
    leases = state.leases
    if leases is not None and leases.enabled_here:
        out["leases"] = leases.section()
    probes = state.probes
    if probes is not None:
        out["probes"] = probes.section()
    out["broker"] = guarantees(c.app)
    return out


ROW_PREFIX = "celery_ext."


def stats_rows(section: dict[str, Any]) -> dict[str, Any]:
    """``section`` as ``inspect stats`` rows: one figure or one flat group each.

    Flower's "Other" tab shows each top-level key of ``inspect stats`` on a row of
    its own: one nested dict there is an unreadable line. A group's dicts (the
    last drain's report) get rows of their own.

    Example::

        stats_rows({"held": 3, "drain": {"state": "running", "last": {"seconds": 1.2}}})
        # {"celery_ext.held": 3, "celery_ext.drain": {"state": "running"},
        #  "celery_ext.drain.last": {"seconds": 1.2}}
    """
    rows: dict[str, Any] = {}
    for key, value in section.items():
        if not isinstance(value, dict):
            rows[ROW_PREFIX + key] = value
            continue
        rows[ROW_PREFIX + key] = {k: v for k, v in value.items() if not isinstance(v, dict)}
        for sub, group in value.items():
            if isinstance(group, dict):
                rows[f"{ROW_PREFIX}{key}.{sub}"] = group
    return rows


def stats_section(stats: dict[str, Any]) -> dict[str, Any] | None:
    """The ``celery_ext`` section of one worker's ``inspect stats`` reply, nested again.

    None when the worker runs without celery_ext.

    Example::

        stats = app.control.inspect().stats()["w1@host"]
        celery_ext.stats_section(stats)["tasks"]["succeeded"]
    """
    section: dict[str, Any] = {}
    for name, value in stats.items():
        if not name.startswith(ROW_PREFIX):
            continue
        key, _, sub = name[len(ROW_PREFIX) :].partition(".")
        if not sub:
            if isinstance(value, dict):
                section.setdefault(key, {}).update(value)
            else:
                section[key] = value
        else:
            section.setdefault(key, {})[sub] = value
    return section or None


def _pool_info(pool: Any) -> dict[str, Any]:
    try:
        return _compat.pool_info(pool)
    except Exception:  # a pool between stop and start
        return {}


class Section(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: celery_ext's rows in ``inspect stats``, and ``/metrics``.

    Example::

        stats_section(app.control.inspect().stats()["w1@host"])["tasks"]["succeeded"]
    """

    name = "celery_ext.metrics.Section"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(
        self,
        c: Any,
        metrics_port: int | None = None,
        metrics_address: str | None = None,
        **kwargs: Any,
    ) -> None:
        settings = settings_of(c.app)
        self.port = settings.metrics_port if metrics_port is None else metrics_port
        self.address = settings.metrics_address if metrics_address is None else metrics_address
        self.server: Any = None
        self.consumer: Any = None
        super().__init__(c, **kwargs)
        if self.port is not None:
            # Bound as the worker is built: a taken port stops the start with one
            # clear line, instead of a consumer restarting on an "OSError" forever.
            self._serve_http(self.port)

    def start(self, c: Any) -> None:
        self.consumer = c

    def _serve_http(self, port: int) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        serve_metrics = MetricsHandler.factory(registry)

        class Handler(serve_metrics):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:
                # prometheus_client answers every path; a typo should not look healthy.
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "try /metrics")
                    return
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scraped every few seconds: keep the worker log quiet

        self.server = listen("--metrics-port", "--metrics-address", self.address, port, Handler)
        self.port = self.server.server_address[1]
        logger.info("celery_ext: Prometheus metrics on %s/metrics", url_of(self.server))

    def shutdown(self, c: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def info(self, c: Any) -> dict[str, Any]:
        return stats_rows(section(c))


class _Collector:
    """prometheus_client collector reading the section at each scrape."""

    def __init__(self, step: Section) -> None:
        self.step = step

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.step.consumer
        if c is None:
            return
        data = section(c)
        host = str(getattr(c, "hostname", ""))
        gauges = {
            "prefetch_limit": "Most messages this worker holds at once.",
            "held": "Messages held: reserved, running and ETA-waiting.",
            "reserved": "Requests reserved (received, not finished).",
            "active": "Tasks running.",
            "eta_held": "ETA/countdown messages held in the worker.",
            "qos": "The broker prefetch count in effect.",
            "held_bytes": "Body bytes of held messages (with a byte cap).",
            "parked_now": "Messages parked for this worker's queues (RabbitMQ: under its prefix).",
        }
        for key, doc in gauges.items():
            value = data.get(key)
            if isinstance(value, (int, float)):
                family = GaugeMetricFamily(f"celery_ext_{key}", doc, labels=["worker"])
                family.add_metric([host], float(value))
                yield family
        counters = {
            "parked_total": ("celery_ext_parked", "ETA messages parked on the broker."),
            "shed_total": ("celery_ext_shed", "Messages shed at a full queue."),
            "queue_full_total": ("celery_ext_queue_full", "Publishes refused with QueueFull."),
            "bytes_requeued": (
                "celery_ext_bytes_requeued",
                "Messages handed back by the byte cap.",
            ),
        }
        for key, (name, doc) in counters.items():
            value = data.get(key)
            if isinstance(value, (int, float)):
                counter = CounterMetricFamily(name, doc, labels=["worker"])
                counter.add_metric([host], float(value))
                yield counter
        tasks = CounterMetricFamily(
            "celery_ext_tasks", "Task outcomes seen by this worker.", labels=["worker", "outcome"]
        )
        for outcome, value in data.get("tasks", {}).items():
            tasks.add_metric([host, outcome], float(value))
        yield tasks
        bad = CounterMetricFamily(
            "celery_ext_bad_input",
            "Messages this worker could not run, by reason (see celery_ext.intake).",
            labels=["worker", "reason"],
        )
        for reason, value in data.get("bad_input", {}).items():
            bad.add_metric([host, reason], float(value))
        yield bad
        draining = GaugeMetricFamily(
            "celery_ext_draining", "1 while a warm shutdown drains.", labels=["worker"]
        )
        draining.add_metric([host], float(data.get("drain", {}).get("state") == "draining"))
        yield draining
        leases = data.get("leases")
        if leases:
            recovered = CounterMetricFamily(
                "celery_ext_leases_recovered",
                "Messages restored from dead workers.",
                labels=["worker"],
            )
            recovered.add_metric([host], float(leases.get("recovered", 0)))
            yield recovered
