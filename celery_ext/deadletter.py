"""The dead-letter queue: tasks whose retries ran out, and messages a worker could not run.

Each entry is one JSON message in the queue named by ``celery_ext_dead_letter_queue``
(default ``celery_ext.dead_letters``) on the same broker as the task: Redis,
RabbitMQ or the local lane. Nobody consumes that queue; an entry holds the
original task (name, id, args, kwargs, queue, headers), the final exception
(type, message, traceback), the reason (``attempts``, ``deadline``,
``giveup_on``) and every attempt's time and error. A message a worker could not
run (reason ``undecodable``, ``unknown task``, ``invalid message`` or
``oversize``; see :mod:`celery_ext.intake`) keeps its raw body under ``message``,
and ``args``/``kwargs`` only when its body still decodes: only entries with
``args`` can be replayed.

:class:`DeadLetters` lists, shows, replays and purges entries; ``celery -A app
ext dlq list|show|replay|purge`` does the same from a shell. A replayed task is
published again with its original id and a fresh attempt budget.

Example::

    dead = DeadLetters(app)
    for entry in dead.list():
        print(entry["id"], entry["task"], entry["reason"], entry["exception"]["type"])
    dead.replay([entry["id"]])
"""

from __future__ import annotations

import builtins
import logging
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from kombu import Queue

from ._settings import settings_of
from .retry_policy import now_iso

__all__ = ["DeadLetters", "new_entry"]

logger = logging.getLogger(__name__)


class DeadLetters:
    """The dead-letter queue of one app.

    Example::

        DeadLetters(app).list()   # [{"id": ..., "task": ..., "attempts": [...], ...}, ...]
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.queue = settings_of(app).dead_letter_queue

    def _declaration(self) -> Queue:
        # On quorum queues the dead letters are replicated like the app's own queues.
        from .transports.amqp import queue_type_of

        quorum = queue_type_of(self.app) == "quorum"
        arguments = {"x-queue-type": "quorum"} if quorum else None
        return Queue(
            self.queue,
            routing_key=self.queue,
            durable=True,
            auto_delete=False,
            queue_arguments=arguments,
        )

    def push(self, entry: dict[str, Any]) -> None:
        """Store ``entry`` (JSON-serialisable); raises if the broker refuses it.

        Example::

            DeadLetters(app).push({"id": task_id, "task": name, ...})
        """
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                entry,
                exchange="",
                routing_key=self.queue,
                serializer="json",
                declare=[self._declaration()],
                delivery_mode=2,
                retry=True,
                # Bounded: kombu's default retries a connection error forever, and the
                # worker thread dead-lettering would hang with the task unfinished.
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_max": 1.0},
            )

    @contextmanager
    def _taken(self) -> Iterator[builtins.list[Any]]:
        """Every entry, taken unacked; what the caller does not ack goes back on exit."""
        with self.app.connection_for_write() as conn:
            channel = conn.channel()
            try:
                self._declaration().bind(channel).declare()
                messages = []
                while (message := channel.basic_get(self.queue, no_ack=False)) is not None:
                    if not hasattr(message, "decode"):  # py-amqp: a raw message
                        message = channel.message_to_python(message)
                    messages.append(message)
                yield messages
            finally:
                channel.close()  # unacked messages return to the queue

    def list(self) -> list[dict[str, Any]]:
        """Every entry, oldest first; the queue is left as it was.

        Example::

            [e["id"] for e in DeadLetters(app).list()]
        """
        with self._taken() as messages:
            entries = [_decode(m) for m in messages]
        return sorted(entries, key=lambda e: str(e.get("dead_at", "")))

    def show(self, task_id: str) -> dict[str, Any] | None:
        """The entry of ``task_id``, or None.

        Example::

            DeadLetters(app).show(task_id)["attempts"]
        """
        return next((e for e in self.list() if e.get("id") == task_id), None)

    def replay(self, task_ids: Iterable[str] | None = None) -> builtins.list[str]:
        """Publish the given entries (all when None) again; returns the ids replayed.

        Each runs with its original id, args and queue and a fresh attempt
        budget; its entry is removed once the task is published. An entry
        without a task name and ``args`` (a message whose body could not be
        decoded) is left in place.

        Example::

            DeadLetters(app).replay([task_id])
        """
        wanted = None if task_ids is None else set(task_ids)
        replayed: builtins.list[str] = []
        with self._taken() as messages:
            for message in messages:
                entry = _decode(message)
                if wanted is not None and entry.get("id") not in wanted:
                    continue
                if not isinstance(entry.get("task"), str) or "args" not in entry:
                    logger.warning(
                        "celery_ext: dead letter %s (%s) holds no task call to replay; "
                        "read it with `celery ext dlq show`, then purge it",
                        entry.get("id"),
                        entry.get("reason"),
                    )
                    continue
                self.app.send_task(
                    entry["task"],
                    args=entry.get("args") or (),
                    kwargs=entry.get("kwargs") or {},
                    task_id=entry.get("id"),
                    queue=entry.get("queue") or None,
                )
                message.ack()
                replayed.append(str(entry.get("id")))
        return replayed

    def purge(self, task_ids: Iterable[str] | None = None) -> int:
        """Delete the given entries (all when None); returns how many.

        Example::

            DeadLetters(app).purge()
        """
        wanted = None if task_ids is None else set(task_ids)
        removed = 0
        with self._taken() as messages:
            for message in messages:
                if wanted is None or _decode(message).get("id") in wanted:
                    message.ack()
                    removed += 1
        return removed


def _decode(message: Any) -> dict[str, Any]:
    try:
        entry = message.decode()
    except Exception as exc:  # keep listing what can be read
        return {"id": None, "task": None, "reason": f"undecodable entry: {exc!r}"}
    return entry if isinstance(entry, dict) else {"id": None, "task": None, "raw": entry}


_KEEP_ERROR_CHARS = 2000
_KEEP_TRACEBACK_CHARS = 8000


def new_entry(
    entry_id: str,
    task: str | None,
    queue: str,
    headers: dict[str, Any],
    reason: str,
    exc: BaseException | None,
    *,
    detail: str | None = None,
    attempts: builtins.list[dict[str, Any]] | None = None,
    hostname: str | None = None,
) -> dict[str, Any]:
    """A dead-letter entry: what, where, why, bounded in size; the caller adds the call.

    ``detail`` is the error text (``str(exc)`` by default). A worker's retries add
    ``args``/``kwargs``; the intake adds the raw ``message`` (and the call when it decodes).

    Example::

        entry = new_entry(request.id, "shop.send", "emails", {}, "retries exhausted", exc)
        DeadLetters(app).push({**entry, "args": [1], "kwargs": {}})
    """
    text = str(exc) if detail is None else detail
    trace = ""
    if exc is not None and exc.__traceback__ is not None:
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "id": entry_id,
        "task": task,
        "queue": queue,
        "headers": headers,
        "reason": reason,
        "exception": {
            "type": None if exc is None else f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": text[:_KEEP_ERROR_CHARS],
            "traceback": trace[-_KEEP_TRACEBACK_CHARS:],
        },
        "attempts": attempts or [],
        "dead_at": now_iso(),
        "hostname": hostname,
    }
