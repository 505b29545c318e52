"""Bulk enqueue: many messages of one task, built once, published in chunks.

:func:`enqueue_many` builds each message as ``apply_async`` does (same headers,
routing, signals) and publishes a chunk per round trip where the transport can:
one Lua call on Redis, pipelined confirms on RabbitMQ, one lock on the local lane.
Queue bounds (:mod:`celery_ext.bounds`) apply per message.

Example::

    ids = celery_ext.enqueue_many(send_email, [(to, "hi") for to in recipients])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from celery import Celery
from celery.app.task import Task
from celery.utils.functional import maybe_list
from celery.utils.saferepr import saferepr
from kombu.utils.uuid import uuid

from . import _compat
from .bounds import BatchQueueFull, Bounds, Collecting
from .errors import QueueFull
from .transports.amqp import AmqpChannel

__all__ = ["enqueue_many"]


T = TypeVar("T")


# apply_async options that only shape the message (create_task_message), not the publish.
_MESSAGE_ONLY = (
    "countdown",
    "eta",
    "group_id",
    "group_index",
    "retries",
    "chord",
    "chain",
    "root_id",
    "parent_id",
    "shadow",
    "reply_to",
    "replaced_task_nesting",
    "argsrepr",
    "kwargsrepr",
    "time_limit",
    "soft_time_limit",
    "expires",
    "ignore_result",
)


Pair = tuple[Sequence[Any], Mapping[str, Any]]


class _Plan:
    """What every message of one enqueue_many call shares, worked out once."""

    def __init__(
        self, app: Celery, task: Task, queue: str | None, options: dict[str, Any], first: Pair
    ) -> None:
        args, kwargs = first
        opts: dict[str, Any] = {**_compat.task_exec_options(task), **options}
        if queue is not None:
            opts["queue"] = queue
        opts.setdefault("ignore_result", task.ignore_result)
        if task.priority:
            opts.setdefault("priority", task.priority)
        message = {k: opts.pop(k) for k in _MESSAGE_ONLY if k in opts}
        message["callbacks"] = maybe_list(opts.pop("link", None))
        message["errbacks"] = maybe_list(opts.pop("link_error", None))
        opts = app.amqp.router.route(opts, task.name, args, kwargs, task)
        expires = message.get("expires")
        if isinstance(expires, datetime):
            expires = (expires - app.now()).total_seconds()
        if isinstance(expires, (int, float)):
            opts["expiration"] = max(0.0, float(expires))
        parent = app.current_worker_task
        if parent is not None:
            message.setdefault("root_id", parent.request.root_id or parent.request.id)
            message.setdefault("parent_id", parent.request.id)
            if app.conf.task_inherit_parent_priority:
                opts.setdefault("priority", parent.request.delivery_info.get("priority"))
        message.setdefault("reply_to", app.thread_oid)
        message["create_sent_event"] = app.conf.task_send_sent_event
        self.ignore_result = bool(message["ignore_result"])
        self.shadow = message.pop("shadow", None)
        self.message = message
        self.options = opts
        self.queue = opts.get("queue")
        self.name = task.name
        self.task = task
        self.check = getattr(task, "__header__", None) if task.typing else None
        # as_task_v2 would look task_repr_maxlevels up in app.conf twice per message.
        self.reprs = (app.amqp.argsrepr_maxsize, app.amqp.kwargsrepr_maxsize)
        self.repr_levels = app.conf.task_repr_maxlevels
        self.create = app.amqp.create_task_message
        self.send = app.amqp.send_task_message
        self.backend = app.backend

    def publish(self, producer: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """Build one protocol message the way ``send_task`` does and publish it."""
        task_id: str = uuid()
        if self.check is not None:
            self.check(*args, **kwargs)
        shadow = self.shadow or self.task.shadow_name(args, kwargs, self.options)
        fields = {
            "argsrepr": saferepr(args, self.reprs[0], maxlevels=self.repr_levels),
            "kwargsrepr": saferepr(kwargs, self.reprs[1], maxlevels=self.repr_levels),
            **self.message,  # the caller's argsrepr/kwargsrepr win, as in apply_async
        }
        message = self.create(
            task_id, self.name, args, kwargs, shadow=shadow, **fields, **self.options
        )
        if not self.ignore_result:
            self.backend.on_task_call(producer, task_id)
        self.send(producer, self.name, message, retry=False, declare=[], **self.options)
        return task_id


def _chunks(pairs: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(pairs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def enqueue_many(
    task: Task,
    args_iter: Iterable[Sequence[Any]],
    kwargs_iter: Iterable[Mapping[str, Any]] | None = None,
    *,
    queue: str | None = None,
    chunk: int = 500,
    **options: Any,
) -> list[str]:
    """Publish one ``task`` message per item of ``args_iter``; return the accepted task ids.

    The messages are ordinary Celery protocol-2 task messages, built with
    ``app.amqp.create_task_message`` and sent with ``app.amqp.send_task_message``
    (publish signals and ``task-sent`` events fire as for ``apply_async``), so a
    stock worker runs them. ``options`` are ``apply_async`` options (including
    ``max_queued``); routing, execution options and parent ids are worked out
    once per call, from the first message. ``kwargs_iter``, when given, must be
    as long as ``args_iter``.

    Publishing is pipelined per ``chunk`` messages, the bound staying exact:
    on Redis one Lua call per chunk pushes as many as fit; on RabbitMQ a chunk
    is published on a dedicated channel and confirmed at once; on the local
    lane each message meets the lane's own bound. For the messages that do not
    fit, the policy decides: ``shed`` drops and counts them (their ids are not
    returned); ``block`` waits for room up to ``queue_block_timeout`` without
    progress; ``raise`` (and a ``block`` that timed out) raises
    :class:`BatchQueueFull`, whose ``accepted_ids`` were queued and will run.
    Connection errors are not retried (a chunk's fate is then unknown); no
    ``AsyncResult`` objects are created.

    Example::

        ids = celery_ext.enqueue_many(send_email, [(to, "hi") for to in recipients])
        ids = celery_ext.enqueue_many(resize, ([p] for p in paths), queue="images", chunk=1000)
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: expected an integer >= 1")
    app: Celery = _compat.task_app(task)
    Bounds.of(app)  # installed?
    if kwargs_iter is None:
        pairs: Iterator[Pair] = ((a, {}) for a in args_iter)
    else:
        pairs = zip(args_iter, kwargs_iter, strict=True)
    if app.conf.task_always_eager:
        return [str(task.apply_async(a, k, queue=queue, **options).id) for a, k in pairs]
    first = next(pairs, None)
    if first is None:
        return []
    plan = _Plan(app, task, queue, options, first)
    ids: list[str] = []
    with app.producer_or_acquire() as pooled, _own_channel(pooled) as channel:
        producer = pooled if channel is None else app.amqp.Producer(channel, auto_declare=False)
        if plan.queue is not None:
            producer.maybe_declare(plan.queue, retry=True)
        for batch in _chunks(itertools.chain([first], pairs), chunk):
            accepted, refusal = _publish_chunk(plan, producer, batch)
            ids += accepted
            if refusal is not None:
                raise BatchQueueFull(
                    refusal.queue, refusal.limit, refusal.depth, refusal.waited_s, ids
                )
    return ids


@contextmanager
def _own_channel(producer: Any) -> Iterator[Any]:
    """RabbitMQ: a channel of enqueue_many's own (confirm tags counted from 1), else None."""
    if not isinstance(producer.channel, AmqpChannel):
        yield None
        return
    channel = producer.connection.channel()
    try:
        yield channel
    finally:
        if channel.is_open:
            channel.close()


def _publish_chunk(
    plan: _Plan, producer: Any, batch: list[Pair]
) -> tuple[list[str], QueueFull | None]:
    channel = producer.channel
    if isinstance(channel, Collecting):
        with channel.collecting() as held:
            for args, kwargs in batch:
                plan.publish(producer, args, kwargs)
        return channel.flush(held)
    ids: list[str] = []  # the local lane (its own bound) or a stock transport
    for args, kwargs in batch:
        try:
            task_id = plan.publish(producer, args, kwargs)
        except QueueFull as exc:
            return ids, exc
        if not getattr(channel, "last_put_shed", False):  # the local lane's "shed"
            ids.append(task_id)
    return ids, None
