"""Exceptions raised by celery_ext.

Every error the plugin raises derives from :class:`CeleryExtError`, so one
``except celery_ext.errors.CeleryExtError`` catches them all::

    CeleryExtError
     ├── ConfigurationError (also ValueError)   a bad setting, named in the message
     ├── LaneNotInstalled                       ``local://`` used without install(app)
     └── QueueFull                              a bounded queue refused a message

Example::

    from celery_ext.errors import QueueFull

    try:
        send_email.delay("a@example.com", "hi")
    except QueueFull as exc:
        print(exc.queue, exc.limit, exc.depth)
"""

from __future__ import annotations

__all__ = ["CeleryExtError", "ConfigurationError", "LaneNotInstalled", "QueueFull"]


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
