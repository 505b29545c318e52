"""A cap on task message size, measured the same way where it is sent and where it arrives.

What: with ``celery_ext_max_message_bytes`` set, publishing a task message whose
serialized (and compressed) body is larger raises
:class:`~celery_ext.errors.MessageTooLarge` in the publishing call, before
anything is declared or sent; a worker dead-letters a larger message it
receives instead of running it (see :mod:`celery_ext.intake`). Unset (the
default) nothing is measured, as in stock Celery.

How: kombu serializes a body in ``Producer.publish`` and hands it to the
channel's ``prepare_message`` before it declares or sends anything; every
publish goes through there (``apply_async``, ``send_task``, retries, chains,
:func:`~celery_ext.enqueue_many`, a raw ``Producer.publish``). The
:class:`SizeLimited` channel mixin checks the body there, on the transports
``install(app)`` uses (the local lane, Redis and RabbitMQ; see
:mod:`celery_ext.bounds`), reading the cap from the app's own
``broker_transport_options``: per app, no signal, no patching. Only task
messages (those with a ``task`` header) are capped; events, control replies
and dead-letter entries are not.

Limits: with a ``broker_transport`` of your own or a multi-URL broker, kombu's
stock channels publish unchecked (install logs a warning); workers still
dead-letter what is too large. A body is measured in bytes as sent (a ``str``
as UTF-8), headers excluded.

Example::

    celery_ext.install(app, max_message_bytes=1_000_000)
    try:
        export.delay(rows)
    except celery_ext.MessageTooLarge as exc:
        print(exc.size, exc.limit)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import Celery

from ._settings import PREFIX, Settings
from .errors import MessageTooLarge
from .lane import is_local

__all__ = ["LIMIT_OPTION", "SizeLimited", "body_size", "limit_of", "setup"]

logger = logging.getLogger(__name__)

#: Key under ``broker_transport_options`` carrying the app's cap (absent: no cap).
LIMIT_OPTION = "celery_ext_max_message_bytes"


def body_size(body: object) -> int:
    """Bytes of a message body as sent: ``bytes`` as is, ``str`` as UTF-8.

    Example::

        body_size('{"a": "é"}')   # 11
    """
    if body is None:
        return 0
    if isinstance(body, str):
        return len(body) if body.isascii() else len(body.encode("utf-8", "surrogatepass"))
    return len(body) if isinstance(body, (bytes, bytearray)) else len(memoryview(body))  # type: ignore[arg-type]


def limit_of(transport_options: Mapping[str, Any] | None) -> int | None:
    """The cap carried by a connection's ``transport_options``, or None.

    Example::

        limit_of(app.conf.broker_transport_options)   # 1000000
    """
    limit = (transport_options or {}).get(LIMIT_OPTION)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


class SizeLimited:
    """Channel mixin: refuse a task message over the app's cap in ``prepare_message``.

    Mixed into the local lane's, Redis's and RabbitMQ's channels; a no-op
    without a cap.

    Example::

        class Channel(SizeLimited, virtual.Channel): ...
    """

    connection: Any

    def prepare_message(
        self,
        body: Any,
        priority: Any = None,
        content_type: Any = None,
        content_encoding: Any = None,
        headers: Any = None,
        properties: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if headers and "task" in headers:
            client = getattr(self.connection, "client", None)
            limit = limit_of(getattr(client, "transport_options", None))
            if limit is not None and (size := body_size(body)) > limit:
                task, task_id = headers.get("task"), headers.get("id")
                raise MessageTooLarge(
                    size,
                    limit,
                    task=task if isinstance(task, str) else None,
                    task_id=task_id if isinstance(task_id, str) else None,
                )
        return super().prepare_message(  # type: ignore[misc]
            body, priority, content_type, content_encoding, headers, properties, *args, **kwargs
        )


def setup(app: Celery, settings: Settings) -> None:
    """Hand the cap to ``app``'s transports (called by ``install`` after the transports are chosen).

    Example::

        setup(app, settings_of(app))
    """
    if settings.max_message_bytes is None:
        return
    options = dict(app.conf.broker_transport_options or {})
    options[LIMIT_OPTION] = settings.max_message_bytes
    app.conf.broker_transport_options = options
    transport = str(app.conf.broker_transport or "")
    local = is_local(app)
    if not local and not transport.startswith("celery_ext."):
        logger.warning(
            "celery_ext: %smax_message_bytes is not checked when publishing to broker %r "
            "(only redis://, rediss://, amqp://, amqps:// single-URL brokers with "
            "broker_transport unset, and the local lane); workers still dead-letter "
            "larger messages",
            PREFIX,
            app.conf.broker_url,
        )
