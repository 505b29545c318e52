"""Exceptions raised by celery_ext.

Every error the plugin raises derives from :class:`CeleryExtError`, so one
``except celery_ext.errors.CeleryExtError`` catches them all::

    CeleryExtError
     ├── ConfigurationError (also ValueError)   a bad setting, named in the message
     ├── LaneNotInstalled                       ``local://`` used without install(app)
     ├── MessageTooLarge                        a task message over ``max_message_bytes``
     ├── QueueFull                              a bounded queue refused a message
     ├── RetryAfter                             raised by a task: retry in N seconds
     ├── RetryScheduled                         why and when a task will run again
     ├── TaskTimeout (also Celery's SoftTimeLimitExceeded)
     │    │                                     raised inside a task at its soft limit
     │    └── DrainInterrupted                  ... and at a warm shutdown's drain deadline
     ├── HandedBack (also Celery's Reject)      a drain gave an interrupted task back
     ├── PortInUse (also ConfigurationError, click.ClickException)
     │                                          a probe or metrics port is taken
     └── PoolNotAllowed (also Celery's ImproperlyConfigured, click.ClickException)
                                                prefork with the local lane

Example::

    from celery_ext.errors import QueueFull

    try:
        send_email.delay("a@example.com", "hi")
    except QueueFull as exc:
        print(exc.queue, exc.limit, exc.depth)
"""

from __future__ import annotations

import click
from celery.exceptions import ImproperlyConfigured, Reject, SoftTimeLimitExceeded

__all__ = [
    "CeleryExtError",
    "ConfigurationError",
    "DrainInterrupted",
    "HandedBack",
    "LaneNotInstalled",
    "MessageTooLarge",
    "NotReplicated",
    "PoolNotAllowed",
    "PortInUse",
    "QueueFull",
    "RetryAfter",
    "RetryScheduled",
    "TaskTimeout",
]


class CeleryExtError(Exception):
    """Root of every celery_ext error.

    Example::

        try:
            task.delay()
        except CeleryExtError:
            ...
    """


class ConfigurationError(CeleryExtError, ValueError):
    """A setting is unknown, of the wrong type or out of range.

    The message names the key, the value and what was expected.

    Example::

        >>> install(app, lane_max_queued=0)
        Traceback (most recent call last):
        ConfigurationError: celery_ext_lane_max_queued=0: expected an integer >= 1
    """


class LaneNotInstalled(CeleryExtError):
    """A ``local://`` connection was made for an app without ``celery_ext.install(app)``.

    Example::

        app = Celery(broker="local://")
        celery_ext.install(app)   # without this line, publishing raises LaneNotInstalled
    """


class MessageTooLarge(CeleryExtError):
    """A task message's serialized body is over ``celery_ext_max_message_bytes``.

    Raised by the publishing call before anything is sent (a worker that
    receives such a message dead-letters it with this error as the reason).
    Attributes: ``size`` and ``limit`` in bytes, the ``task`` name and
    ``task_id`` when known.

    Example::

        try:
            export.delay(huge_rows)
        except MessageTooLarge as exc:
            print(exc.size, exc.limit)   # store the rows elsewhere, pass a reference
    """

    def __init__(
        self, size: int, limit: int, task: str | None = None, task_id: str | None = None
    ) -> None:
        self.size = size
        self.limit = limit
        self.task = task
        self.task_id = task_id
        what = f"task message {task!r}" if task else "task message"
        super().__init__(f"{what} is {size} bytes, over celery_ext_max_message_bytes={limit}")

    def __reduce__(
        self,
    ) -> tuple[type[MessageTooLarge], tuple[int, int, str | None, str | None]]:
        return (type(self), (self.size, self.limit, self.task, self.task_id))


class QueueFull(CeleryExtError):
    """A bounded queue is at its limit and the message was not accepted.

    Attributes name the queue, its limit and the depth seen when refusing.

    Example::

        try:
            task.delay()
        except QueueFull as exc:
            return 503, {"queue": exc.queue, "limit": exc.limit, "depth": exc.depth}
    """

    def __init__(self, queue: str, limit: int, depth: int, waited_s: float = 0.0) -> None:
        self.queue = queue
        self.limit = limit
        self.depth = depth
        self.waited_s = waited_s
        waited = f" after waiting {waited_s:g}s" if waited_s else ""
        super().__init__(f"queue {queue!r} is full ({depth}/{limit} messages){waited}")

    def __reduce__(self) -> tuple[type[QueueFull], tuple[str, int, int, float]]:
        return (type(self), (self.queue, self.limit, self.depth, self.waited_s))


class NotReplicated(CeleryExtError):
    """A Redis publish reached the primary but not ``celery_ext_replica_acks`` replicas in time.

    The primary may still hold the message (and run it), or lose it in a
    failover: publish again to be sure (the task may then run twice).

    Example::

        try:
            task.delay()
        except NotReplicated as exc:
            print(exc.acked, exc.wanted)   # 0 1: the replica is down or behind
    """

    def __init__(self, queue: str, wanted: int, acked: int, timeout_s: float) -> None:
        self.queue = queue
        self.wanted = wanted
        self.acked = acked
        self.timeout_s = timeout_s
        super().__init__(
            f"publish to queue {queue!r} reached {acked} of the {wanted} replicas "
            f"celery_ext_replica_acks asks for within {timeout_s:g}s: it may be lost in a failover"
        )

    def __reduce__(self) -> tuple[type[NotReplicated], tuple[str, int, int, float]]:
        return (type(self), (self.queue, self.wanted, self.acked, self.timeout_s))


class TaskTimeout(SoftTimeLimitExceeded, CeleryExtError):  # type: ignore[misc]
    """A task ran past its soft time limit; raised inside the task.

    It subclasses Celery's ``SoftTimeLimitExceeded``, so existing handlers keep
    working. A task that swallows it is still stopped at its hard limit.

    Example::

        @app.task(soft_timeout=10, timeout=15)
        def export(report_id):
            try:
                build(report_id)
            except TaskTimeout:
                cleanup(report_id)
                raise
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("soft time limit exceeded",)))


class DrainInterrupted(TaskTimeout):
    """Raised inside a task still running when a warm shutdown's drain deadline passes.

    A :class:`TaskTimeout`, so cleanup written for the soft limit runs too. When
    the task ends by it (it, or an error raised while handling it, escapes the
    task), the run is not a failure: the task goes back to the broker as it was
    (:class:`HandedBack`) and runs again on another worker. A task that catches
    it and returns has completed.

    Example::

        @app.task(acks_late=True)
        def export(report_id):
            try:
                build(report_id)
            except TaskTimeout:      # soft limit, or the drain deadline
                cleanup(report_id)
                raise                # DrainInterrupted: requeued, not failed
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("interrupted at the warm shutdown's drain deadline",)))


class HandedBack(Reject, CeleryExtError):  # type: ignore[misc]
    """How a task interrupted by the drain ends: its message goes back to the broker.

    A Celery ``Reject`` with ``requeue=True``: no result is stored and no
    ``task_failure`` fires; an ``acks_late`` message is requeued, and an
    early-acked task was published again (same id) before this was raised.
    Flower shows the run as REJECTED.

    Example::

        raise HandedBack("interrupted at the drain deadline")
    """

    def __init__(self, reason: object = None, requeue: bool = True) -> None:
        super().__init__(reason, requeue)


class PortInUse(ConfigurationError, click.ClickException):
    """A worker's probe or metrics server cannot listen; the worker does not start.

    The port is taken (``taken``, the flag is the port's), or the address is not
    one of this host's (the flag is the address's). ``celery worker`` prints it as
    one line (``Error: ...``) and exits with status 1; elsewhere it is a
    :class:`ConfigurationError`.

    Example::

        celery -A shop worker --metrics-port 9808   # a second time on this host:
        # Error: celery_ext: --metrics-port 9808: cannot listen on 127.0.0.1:9808 ...
    """

    def __init__(self, flag: str, host: str, port: int, reason: object, taken: bool = True) -> None:
        self.flag, self.host, self.port, self.reason = flag, host, port, str(reason)
        self.taken = taken
        setting = "celery_ext_" + flag.lstrip("-").replace("-", "_")
        if taken:
            message = (
                f"celery_ext: {flag} {port}: cannot listen on {host}:{port} ({reason}); "
                f"another process (a second worker?) has it: give each worker its own "
                f"{flag} ({setting})"
            )
        else:
            message = (
                f"celery_ext: {flag} {host}: cannot listen on {host}:{port} ({reason}); "
                f"give an address of this host, 0.0.0.0 or :: for all ({setting})"
            )
        ConfigurationError.__init__(self, message)
        click.ClickException.__init__(self, message)

    def __reduce__(self) -> tuple[type[PortInUse], tuple[str, str, int, str, bool]]:
        return (type(self), (self.flag, self.host, self.port, self.reason, self.taken))


class PoolNotAllowed(ImproperlyConfigured, click.ClickException, CeleryExtError):  # type: ignore[misc]
    """The worker's pool cannot reach the local lane (prefork); the worker does not start.

    ``celery worker`` prints it as one line (``Error: ...``) and exits with
    status 1; elsewhere it is Celery's ``ImproperlyConfigured``.

    Example::

        celery -A shop worker -P prefork   # shop.ping is durable=False:
        # Error: celery_ext: the task shop.ping is durable=False ... run this worker with -P threads
    """

    def __init__(self, message: str) -> None:
        ImproperlyConfigured.__init__(self, message)
        click.ClickException.__init__(self, message)

    def __reduce__(self) -> tuple[type[PoolNotAllowed], tuple[str]]:
        return (type(self), (self.message,))


class RetryAfter(CeleryExtError):
    """Raised by a task with a retry policy: run me again in ``seconds``.

    The wait replaces the policy's own; it still counts as an attempt and never
    goes past the policy's deadline (the task gives up instead).

    Example::

        @app.task
        @celery_ext.retry(attempts=10)
        def poll(job_id):
            if not ready(job_id):
                raise RetryAfter(30)
    """

    def __init__(self, seconds: float, reason: str = "") -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"RetryAfter({seconds!r}): expected seconds >= 0")
        self.seconds = float(seconds)
        self.reason = reason
        super().__init__(f"retry after {self.seconds:g}s" + (f": {reason}" if reason else ""))

    def __reduce__(self) -> tuple[type[RetryAfter], tuple[float, str]]:
        return (type(self), (self.seconds, self.reason))


class RetryScheduled(CeleryExtError):
    """The reason stored (and sent to Flower) while a task waits for its next attempt.

    Its message names the error, the next attempt and when it runs; the
    original exception is its ``__cause__`` in the worker.

    Example::

        AsyncResult(task_id).result   # RetryScheduled("ConnectionError: reset; attempt 2 in 0.5s")
    """
