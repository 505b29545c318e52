"""Bad input at the worker: a message it cannot run is dead-lettered, never silently dropped.

What stock Celery 5.7 does with a message it cannot run
(``celery/worker/consumer/consumer.py``):

- a body it cannot decode (bad JSON; pickle or YAML when ``accept_content`` is
  json-only, the default) goes to ``on_decode_error`` or ``on_invalid_task``:
  logged, then acked or rejected, and gone;
- an unknown task name goes to ``on_unknown_task``, a message without a
  ``task`` header to ``on_unknown_message``, a bad ETA or expiry to
  ``on_invalid_task``: logged, rejected, gone;
- a message without an ``id`` header, with an unhashable ``task`` header, or
  whose body is not ``[args, kwargs, embed]`` raises out of the consumer's task
  handler: the worker stops ("Unrecoverable error") or its consumer restarts
  over and over on the redelivered message.

What the :class:`Intake` consumer step (added by ``install(app)``) does instead:
each such message is kept in the app's dead-letter queue (see
:mod:`celery_ext.deadletter`) with a ``reason`` (``undecodable``, ``unknown
task``, ``invalid message`` or ``oversize``), the error, the raw body (UTF-8
text, else base64; the first 64 KiB), content type and encoding, headers,
delivery info, time and worker; then it is acked or rejected as stock Celery
does, counted (``bad_input`` in the ``celery_ext`` section of ``inspect
stats``, ``celery_ext_bad_input_total``), announced as a
``worker-celery_ext-bad-input`` event and logged in one line. The worker goes on
with the next message. With ``celery_ext_max_message_bytes`` set, a message
with a larger body is dead-lettered as ``oversize`` and not run (see
:mod:`celery_ext.sizes`).

An entry whose JSON body still decodes keeps ``args`` and ``kwargs``:
:meth:`DeadLetters.replay <celery_ext.deadletter.DeadLetters.replay>` publishes
it again (an unknown task, once it is deployed). Other entries are for reading
and purging.

Safety: when an entry cannot be kept (the broker refuses it, the local lane's
queue is full) the message is handled exactly as stock Celery handles it and
counted as ``not_dead_lettered``. A message from the dead-letter queue itself
is never dead-lettered again (a worker consuming that queue would loop).

Below Celery: an item in a Redis list that is not a kombu message at all (not
JSON, or JSON without kombu's envelope, e.g. ``redis-cli LPUSH celery 'x'``)
kills a stock worker or vanishes in a reconnect. celery_ext's Redis channel
(:mod:`celery_ext.transports.redis`) moves such an item, in the script that pops
it, to a holding list, and :func:`dead_letter_raw` keeps it in the dead-letter
queue (reason ``undecodable`` or ``invalid message``, its raw bytes) before
the holding list lets it go. On RabbitMQ every message is a kombu message;
one from another producer (no headers, any content type) reaches the hooks
above.

Example::

    celery_ext.install(app)          # adds the step
    # celery -A shop ext dlq list    # ... REASON 'undecodable', 'unknown task', ...
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps, signals
from celery.exceptions import InvalidTaskError, NotRegistered
from celery.utils.objects import Bunch
from kombu import Message
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils.uuid import uuid

from . import _compat
from ._settings import settings_of
from .consumer_state import state_of
from .deadletter import DeadLetters, new_entry
from .errors import MessageTooLarge
from .metrics import counters_of, send_worker_event
from .sizes import body_size

__all__ = ["Intake", "dead_letter_raw"]

logger = logging.getLogger(__name__)

#: The consumer methods Celery calls for a message it cannot run (and the handler factory).
_HOOKS = (
    "on_decode_error",
    "on_unknown_message",
    "on_unknown_task",
    "on_invalid_task",
    "create_task_handler",
)
_KEEP_BODY_BYTES = 64 * 1024
_KEEP_JSON_CHARS = 16 * 1024  # headers, delivery info, properties


class Intake(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: keep what the worker cannot run in the dead-letter queue.

    ``celery_ext.install(app)`` adds it; see the module docstring.

    Example::

        DeadLetters(app).list()   # [{"reason": "unknown task", "task": "shop.old", ...}]
        app.control.inspect().stats()[worker]["celery_ext.bad_input"]["undecodable"]
    """

    name = "celery_ext.intake.Intake"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        settings = settings_of(c.app)
        self.limit = settings.max_message_bytes
        self.dead_letter_queue = settings.dead_letter_queue
        self.dead_letters = DeadLetters(c.app)
        self.counters = counters_of(c.app, "bad_input")
        self.stock: dict[str, Any] = {}
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        # Celery has no extension point for the messages it refuses: its consumer calls
        # these methods of its own. Wrapping them on this consumer instance (the class
        # and every other consumer stay stock) is the smallest way in. The event loop
        # asks create_task_handler for its handler after every step started; Tasks.start
        # already handed on_decode_error to the task consumer, so it gets ours here.
        # stop() puts Celery's back, so on a reconnect the Control step's pidbox
        # consumer binds Celery's own on_decode_error, never ours.
        for hook in _HOOKS:
            self.stock[hook] = stock = _unwrapped(getattr(c, hook))
            wrapped = functools.wraps(stock)(getattr(self, f"_{hook}")(c, stock))
            wrapped.celery_ext_intake = True  # type: ignore[attr-defined]
            _compat.replace_consumer_method(c, hook, wrapped)
        _compat.replace_consumer_method(c.task_consumer, "on_decode_error", c.on_decode_error)
        state_of(c).intake = self

    def stop(self, c: Any) -> None:
        for hook in _HOOKS:
            current = _compat.replaced_method(c, hook)
            if current is not None and getattr(current, "celery_ext_intake", False):
                _compat.replace_consumer_method(c, hook, current.__wrapped__)  # type: ignore[attr-defined]

    # -- the wrapped hooks ------------------------------------------------------
    def _on_decode_error(self, c: Any, stock: Any) -> Callable[..., Any]:
        def on_decode_error(message: Any, exc: BaseException) -> Any:
            return self._refuse(
                c,
                message,
                "undecodable",
                exc,
                str(exc),
                lambda: stock(message, exc),
                lambda: message.ack(),  # as stock: acked, so it cannot loop
            )

        return on_decode_error

    def _on_unknown_message(self, c: Any, stock: Any) -> Callable[..., Any]:
        def on_unknown_message(body: Any, message: Any) -> Any:
            def settle() -> None:
                message.reject_log_error(logger, c.connection_errors)
                signals.task_rejected.send(sender=c, message=message, exc=None)

            detail = "no 'task' header: not a Celery task message"
            return self._refuse(
                c, message, "invalid message", None, detail, lambda: stock(body, message), settle
            )

        return on_unknown_message

    def _on_unknown_task(self, c: Any, stock: Any) -> Callable[..., Any]:
        def on_unknown_task(body: Any, message: Any, exc: BaseException) -> Any:
            name = _header(message, "task")
            detail = f"task {name!r} is not registered on this worker"
            return self._refuse(
                c,
                message,
                "unknown task",
                exc,
                detail,
                lambda: stock(body, message, exc),
                lambda: _settle_unknown_task(c, message, exc, name),
            )

        return on_unknown_task

    def _on_invalid_task(self, c: Any, stock: Any) -> Callable[..., Any]:
        def on_invalid_task(body: Any, message: Any, exc: BaseException) -> Any:
            return self._refuse(
                c,
                message,
                _reason(exc, "invalid message"),
                exc,
                str(exc),
                lambda: stock(body, message, exc),
                lambda: _settle_invalid(c, message, exc),
            )

        return on_invalid_task

    def _create_task_handler(self, c: Any, stock: Any) -> Callable[..., Any]:
        def create_task_handler(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
            handler = stock(*args, **kwargs)
            limit = self.limit
            recoverable = tuple(c.connection_errors) + tuple(c.channel_errors)
            invalid = self.stock["on_invalid_task"]

            def on_task_received(message: Any) -> Any:
                if limit is not None and (size := body_size(message.body)) > limit:
                    task, task_id = _header(message, "task"), _message_id(message)
                    exc = MessageTooLarge(size, limit, _str_or_none(task), task_id)
                    return self._refuse(
                        c,
                        message,
                        "oversize",
                        exc,
                        str(exc),
                        lambda: invalid(None, message, InvalidTaskError(str(exc))),
                        lambda: _settle_invalid(c, message, exc),
                    )
                try:
                    return handler(message)
                except Exception as exc:
                    # Redis counts KeyError as a connection error: a message without an
                    # 'id' header would make the consumer reconnect and get it again forever.
                    lost = isinstance(exc, recoverable) and _well_formed(message)
                    if lost or message.acknowledged:
                        raise  # a connection problem, or already settled: stock's outcome
                    # Stock lets these escape and the worker dies: refuse the message instead.
                    return self._refuse(
                        c,
                        message,
                        _reason(exc, "invalid message"),
                        exc,
                        f"{type(exc).__name__}: {exc}",
                        lambda: invalid(None, message, exc),
                        lambda: _settle_invalid(c, message, exc),
                    )

            return on_task_received

        return create_task_handler

    # -- keeping a refused message ----------------------------------------------
    def _refuse(
        self,
        c: Any,
        message: Any,
        reason: str,
        exc: BaseException | None,
        detail: str,
        stock: Callable[[], Any],
        settle: Callable[[], Any],
    ) -> Any:
        """Dead-letter ``message``, then ``settle`` it; when it cannot be kept, run ``stock``.

        Example::

            step._refuse(c, message, "undecodable", exc, str(exc), stock, message.ack)
        """
        if not hasattr(message, "delivery_info"):  # not a kombu Message: nothing to keep
            return stock()
        self.counters.add(reason.replace(" ", "_"))
        task_id, queue = _message_id(message), _queue(message)
        entry_id = task_id or uuid()  # what `celery ext dlq show` takes
        kept = self._keep(c, message, reason, exc, detail, entry_id, queue)
        send_worker_event(
            c, "bad-input", reason=reason, id=entry_id, queue=queue, dead_lettered=kept
        )
        if not kept:
            return stock()
        logger.warning(
            "celery_ext: dead-lettered message %s from queue %r (%s): %s",
            entry_id if task_id else f"without id as {entry_id}",
            queue,
            reason,
            _one_line(detail),
        )
        return settle()

    def _keep(
        self,
        c: Any,
        message: Any,
        reason: str,
        exc: BaseException | None,
        detail: str,
        entry_id: str,
        queue: str,
    ) -> bool:
        if queue == self.dead_letter_queue:
            return False  # a worker consuming the dead-letter queue: never loop
        try:
            self.dead_letters.push(_entry(c, message, reason, exc, detail, entry_id, queue))
        except Exception as push_error:
            self.counters.add("not_dead_lettered")
            logger.error(
                "celery_ext: could not dead-letter message %s from queue %r (%s): %r; "
                "handled as stock Celery does",
                entry_id,
                queue,
                reason,
                push_error,
            )
            return False
        return True


def dead_letter_raw(app: Any, raw: bytes, queue: str, reason: str, detail: str) -> bool:
    """Keep ``raw`` (not a kombu message: its transport could not parse it) as a dead letter.

    Counted under ``bad_input`` like the messages Celery refuses; returns False
    (counted as ``not_dead_lettered``, logged with the bytes) when the
    dead-letter queue refused it.

    Example::

        dead_letter_raw(app, b"not json", "celery", "undecodable", "JSONDecodeError: ...")
    """
    counters = counters_of(app, "bad_input")
    counters.add(reason.replace(" ", "_"))
    message = Message(
        body=raw,
        content_type=None,
        content_encoding=None,
        delivery_info={"exchange": "", "routing_key": queue},
        properties={},
        headers={},
    )
    entry_id = uuid()
    entry = _entry(Bunch(hostname=None), message, reason, None, detail, entry_id, queue)
    try:
        DeadLetters(app).push(entry)
    except Exception as push_error:
        counters.add("not_dead_lettered")
        logger.error(
            "celery_ext: could not dead-letter an unreadable item of queue %r (%s: %s): %r; "
            "its bytes: %r",
            queue,
            reason,
            _one_line(detail),
            push_error,
            raw[:1024],
        )
        return False
    logger.warning(
        "celery_ext: dead-lettered an unreadable item of queue %r as %s (%s): %s",
        queue,
        entry_id,
        reason,
        _one_line(detail),
    )
    return True


def _unwrapped(hook: Any) -> Any:
    """Celery's method, also when ``start`` runs again without a ``stop`` in between."""
    while getattr(hook, "celery_ext_intake", False):
        hook = hook.__wrapped__
    return hook


def _well_formed(message: Any) -> bool:
    """The headers a protocol 2 task message needs are there (protocol 1: cannot tell)."""
    headers = message.headers
    if not isinstance(headers, dict):
        return False
    if "task" not in headers:
        return True
    return isinstance(headers.get("task"), str) and isinstance(headers.get("id"), str)


def _reason(exc: BaseException, default: str) -> str:
    return "undecodable" if isinstance(exc, (ContentDisallowed, DecodeError)) else default


def _settle_invalid(c: Any, message: Any, exc: BaseException) -> None:
    """What ``Consumer.on_invalid_task`` does after logging."""
    message.reject_log_error(logger, c.connection_errors)
    signals.task_rejected.send(sender=c, message=message, exc=exc)


def _settle_unknown_task(c: Any, message: Any, exc: BaseException, name: Any) -> None:
    """What ``Consumer.on_unknown_task`` does after logging: reject, fail the result, tell."""
    message.reject_log_error(logger, c.connection_errors)
    task_id = _message_id(message)
    if task_id is not None:
        properties = message.properties or {}
        request = Bunch(
            name=name,
            chord=None,
            root_id=_header(message, "root_id"),
            correlation_id=properties.get("correlation_id"),
            reply_to=properties.get("reply_to"),
            errbacks=None,
        )
        try:  # a caller waiting on the result learns at once, as with stock Celery
            c.app.backend.mark_as_failure(task_id, NotRegistered(name), request=request)
        except Exception as backend_error:
            logger.warning(
                "celery_ext: could not store the failure of %s: %r", task_id, backend_error
            )
        if c.event_dispatcher:
            c.event_dispatcher.send(
                "task-failed", uuid=task_id, exception=f"NotRegistered({name!r})"
            )
    signals.task_unknown.send(sender=c, message=message, exc=exc, name=name, id=task_id)


# -- the entry ---------------------------------------------------------------------
def _entry(
    c: Any,
    message: Any,
    reason: str,
    exc: BaseException | None,
    detail: str,
    entry_id: str,
    queue: str,
) -> dict[str, Any]:
    """A dead-letter entry for ``message``: JSON-safe and bounded in size."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task = headers.get("task")
    raw = _raw(message.body)
    text, encoding, truncated = _body_text(raw)
    properties = {k: v for k, v in (message.properties or {}).items() if k != "delivery_info"}
    entry = new_entry(
        entry_id,
        task if isinstance(task, str) else None,
        queue,
        _jsonable(headers),
        reason,
        exc,
        detail=detail,
        hostname=getattr(c, "hostname", None),
    )
    entry["message"] = {
        "body": text,
        "body_encoding": encoding,
        "body_bytes": len(raw),
        "body_truncated": truncated,
        "content_type": _str_or_none(message.content_type),
        "content_encoding": _str_or_none(message.content_encoding),
        "delivery_info": _jsonable(dict(message.delivery_info or {})),
        "properties": _jsonable(properties),
    }
    if reason != "oversize" and not truncated and isinstance(task, str):
        entry.update(_call(message))  # args and kwargs, when the body decodes: replayable
    return entry


def _call(message: Any) -> dict[str, Any]:
    """``args``/``kwargs`` of a body that decodes as a task call, else nothing."""
    try:
        payload = message.decode()
    except Exception:
        return {}
    if isinstance(payload, (list, tuple)) and len(payload) == 3:
        args, kwargs = payload[0], payload[1]
    elif isinstance(payload, dict):  # protocol 1
        args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
    else:
        return {}
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        return {}
    call = _jsonable({"args": list(args), "kwargs": kwargs})
    return call if isinstance(call, dict) and set(call) == {"args", "kwargs"} else {}


def _raw(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return bytes(body)


def _body_text(raw: bytes) -> tuple[str, str, bool]:
    """(text, "utf-8" or "base64", truncated) for the first ``_KEEP_BODY_BYTES`` of ``raw``."""
    kept = raw[:_KEEP_BODY_BYTES]
    truncated = len(raw) > len(kept)
    # A cut may split a UTF-8 sequence: drop up to 3 trailing bytes before giving up on text.
    for cut in range(4 if truncated else 1):
        try:
            return kept[: len(kept) - cut].decode("utf-8"), "utf-8", truncated
        except UnicodeDecodeError:
            continue
    return base64.b64encode(kept).decode("ascii"), "base64", truncated


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON (anything else as its str), or a cut repr when too big."""
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):  # e.g. keys that are not strings
        text = json.dumps(repr(value))
    if len(text) > _KEEP_JSON_CHARS:
        return {"truncated": text[:_KEEP_JSON_CHARS]}
    return json.loads(text)


def _header(message: Any, key: str) -> Any:
    headers = message.headers
    return headers.get(key) if isinstance(headers, dict) else None


def _message_id(message: Any) -> str | None:
    """The task id of ``message`` when it names one (header ``id``, else correlation id)."""
    properties = getattr(message, "properties", None) or {}
    for value in (_header(message, "id"), properties.get("correlation_id")):
        if isinstance(value, str) and value:
            return value
    return None


def _queue(message: Any) -> str:
    info = getattr(message, "delivery_info", None) or {}
    return str(info.get("routing_key") or "")


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _type_name(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
