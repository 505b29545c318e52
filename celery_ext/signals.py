"""celery_ext's own signals, Celery style (``celery.utils.dispatch.Signal``).

Example::

    from celery_ext.signals import retries_exhausted

    @retries_exhausted.connect
    def page_someone(sender=None, task_id=None, exception=None, attempts=None, **kw):
        alert(f"{sender.name}[{task_id}] gave up after {len(attempts)} attempts: {exception!r}")
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["drain_finished", "drain_started", "retries_exhausted"]

#: A task with a retry policy gave up; sent in the worker after its dead-letter entry
#: was written. Arguments: ``sender`` (the task), ``task_id``, ``exception``,
#: ``attempts`` (list of ``{"at": iso time, "error": str}``), ``reason``
#: (``"attempts"``, ``"deadline"`` or ``"giveup_on"``).
retries_exhausted = Signal(
    name="retries_exhausted",
    providing_args={"task_id", "exception", "attempts", "reason"},
)

#: A warm shutdown began (sent in the worker's thread, not in the OS signal
#: handler), before intake stops. ``sender`` is the WorkController.
drain_started = Signal(name="drain_started", providing_args=set())

#: The drain ended, in ``seconds``: ``completed`` tasks ended on their own;
#: ``requeued`` went back to the broker (held messages handed back at once, and
#: tasks that ended by the deadline's interrupt); ``interrupted`` tasks got
#: :class:`~celery_ext.errors.DrainInterrupted` at ``drain_timeout``;
#: ``abandoned`` still ran after the grace (requeued, or published again).
#: ``sender`` is the WorkController.
drain_finished = Signal(
    name="drain_finished",
    providing_args={"completed", "requeued", "abandoned", "interrupted", "seconds"},
)
