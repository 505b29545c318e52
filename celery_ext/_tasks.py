"""celery_ext's task options, applied as each task is bound (a ``task_annotations`` entry).

``timeout``/``soft_timeout`` (:mod:`celery_ext.timeouts`), ``async def`` bodies
(:mod:`celery_ext.aio`), retry policies (:mod:`celery_ext.retry_policy`) and the drain's
hand-back (:mod:`celery_ext.shutdown`) are set on
the task class when Celery binds it, so a bad value fails where the task is
created, naming it. The entry returns no annotation of its own, so the app's
own ``task_annotations`` still apply.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from . import _compat, _retrying, durability, shutdown, timeouts

__all__ = ["TaskOptions", "add_task_options", "apply_all", "apply_task_options"]

_STOCK_REQUEST = "celery.worker.request:Request"


def apply_task_options(task: Any) -> None:
    """Apply every celery_ext option of ``task`` (class or instance); idempotent.

    Example::

        apply_task_options(app.tasks["shop.export"])
    """
    timeouts.apply_timeouts(task)  # first: it may wrap an async body
    cls: Any = task if isinstance(task, type) else type(task)
    if cls.Request == _STOCK_REQUEST:  # a custom Request class stays (uncounted)
        cls.Request = "celery_ext.metrics:CountingRequest"
    _retrying.apply_retry_policy(task)
    durability.route_lossy(task)
    shutdown.wrap_hand_back(task)  # last: outside the retry policy's wrapper


def apply_all(app: Celery) -> None:
    """:func:`apply_task_options` for every task of a finalized ``app``.

    Example::

        apply_all(app)
    """
    for task in list(app.tasks.values()):
        apply_task_options(task)


class TaskOptions:
    """The ``task_annotations`` entry ``install(app)`` puts first.

    Example::

        app.conf.task_annotations   # [celery_ext task options (...), ...]
    """

    def annotate(self, task: Any) -> None:
        apply_task_options(task)

    def __repr__(self) -> str:
        # `inspect conf` (and so Flower's Config tab) shows task_annotations.
        return "celery_ext task options (timeouts, retries, async def, durable=False)"


def add_task_options(app: Celery) -> None:
    """Apply celery_ext options to the tasks ``app`` has and will create (``install``).

    Example::

        add_task_options(app)
    """
    annotations = app.conf.task_annotations
    if annotations is None:
        annotations = []
    elif not isinstance(annotations, (list, tuple)):
        annotations = [annotations]
    app.conf.task_annotations = [TaskOptions(), *annotations]
    _compat.reset_annotations(app)
    if app.finalized:
        apply_all(app)
