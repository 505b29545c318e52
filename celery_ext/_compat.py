"""Every private name of Celery, kombu and billiard that celery_ext uses, in one place.

The rest of celery_ext reaches Celery's internals only through this module: a base class
here maps a transport's private hooks to public-named methods (``_put`` ->
``storage_put``), a function here reads or replaces one internal. Each access says why
it is needed; all were checked on celery 5.7.0, kombu 5.7.0, billiard 4.3.2, py-amqp 5.4.2
(the pins, ``_versions.py``). ``tests/test_compat.py`` checks that every name in
:data:`REQUIRED` still exists with the parameters used here, so a release that changes
one fails there, by name, and that no other module touches a private name.

Example::

    from celery_ext import _compat

    _compat.request_message(request)   # the kombu message a worker Request came from
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import amqp.channel
import billiard.pool
import celery._state
import celery.app.amqp
import celery.app.base
import celery.app.task
import celery.concurrency.gevent
import celery.concurrency.prefork
import celery.worker.consumer.consumer
import celery.worker.request
import kombu.common
import kombu.transport.virtual
import kombu.transport.virtual.exchange
from celery.concurrency.base import BasePool
from kombu.transport import pyamqp

__all__ = [
    "REQUIRED",
    "AmqpChannel",
    "InfoPool",
    "Required",
    "VirtualChannel",
    "VirtualTransport",
    "amqp_created",
    "forget_exec_options",
    "forget_job_callbacks",
    "gevent_pool",
    "job_accepted",
    "job_scheduled",
    "job_written",
    "keep_job",
    "message_raw",
    "pool_info",
    "pool_jobs",
    "pool_process_index",
    "prefetch_restored",
    "prefork_pool",
    "producer_pool_created",
    "qos_lock",
    "redis_list_key",
    "redis_message_priority",
    "replace_consumer_method",
    "replace_prefetch_restore",
    "replaced_method",
    "request_app",
    "request_context",
    "request_message",
    "reset_annotations",
    "set_prefetch_restored",
    "set_task_join_will_block",
    "sync_client",
    "task_app",
    "task_exec_options",
]


class Required(NamedTuple):
    """A private name this module uses: where, and the parameters it is called with."""

    #: The class or module, or "module:Class" for one imported only on use.
    owner: Any
    name: str
    #: Parameter names after ``self``, in order; None when only the name must exist.
    params: tuple[str, ...] | None = None
    #: How ``owner`` has it: "defined" (an attribute of the class or module), "set"
    #: (``self.<name> =`` in its source: an instance attribute) or "called" (its source
    #: calls ``self.<name>(``: a hook the subclass defines).
    how: str = "defined"


Consumer = celery.worker.consumer.consumer.Consumer
Request = celery.worker.request.Request
ApplyResult = billiard.pool.ApplyResult

REQUIRED: list[Required] = []


def _uses(
    owner: Any, name: str, params: tuple[str, ...] | None = None, *, how: str = "defined"
) -> None:
    REQUIRED.append(Required(owner, name, params, how))


# -- kombu's virtual transport: the local lane ------------------------------------------
# kombu's virtual Channel calls these private hooks of a concrete transport (memory,
# redis); VirtualChannel below maps each to a public ``storage_*`` name.
_VIRTUAL_HOOKS = (
    "_next_delivery_tag",
    "_has_queue",
    "_new_queue",
    "_get",
    "_put",
    "_put_fanout",
    "_size",
    "_purge",
    "_delete",
    "_queue_bind",
    "_restore",
)
for _hook in _VIRTUAL_HOOKS:
    _uses(
        kombu.transport.virtual.exchange
        if _hook == "_put_fanout"
        else kombu.transport.virtual.Channel,
        _hook,
        how="called",
    )
_uses(kombu.transport.virtual.Channel, "_lookup", ("exchange", "routing_key"))
_uses(kombu.transport.virtual.Channel, "_consumers", how="set")
_uses(kombu.transport.virtual.Channel, "_tag_to_queue", how="set")
_uses(kombu.transport.virtual.Channel, "_active_queues", how="set")
_uses(kombu.transport.virtual.Transport, "_deliver", ("message", "queue"))
_uses(kombu.transport.virtual.Transport, "_callbacks")


class VirtualChannel(kombu.transport.virtual.Channel):  # type: ignore[misc]
    """kombu's virtual Channel with its storage hooks under public names.

    Example::

        class Channel(VirtualChannel):
            def storage_get(self, queue, timeout=None): ...
    """

    def _next_delivery_tag(self) -> Any:
        return self.storage_next_tag()

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return bool(self.storage_has(queue, **kwargs))

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self.storage_declare(queue, **kwargs)

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        return self.storage_get(queue, timeout)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        self.storage_put(queue, message, **kwargs)

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        self.storage_put_fanout(exchange, message, routing_key, **kwargs)

    def _size(self, queue: str) -> int:
        return int(self.storage_size(queue))

    def _purge(self, queue: str) -> int:
        return int(self.storage_purge(queue))

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.storage_delete(queue, *args, **kwargs)

    def _queue_bind(self, *args: Any) -> None:
        self.storage_bind(*args)

    def _restore(self, message: Any) -> None:
        self.storage_restore(message)

    # The storage, implemented by the subclass.
    def storage_next_tag(self) -> Any:
        raise NotImplementedError

    def storage_has(self, queue: str, **kwargs: Any) -> bool:
        raise NotImplementedError

    def storage_declare(self, queue: str, **kwargs: Any) -> None:
        raise NotImplementedError

    def storage_get(self, queue: str, timeout: float | None = None) -> Any:
        raise NotImplementedError

    def storage_put(self, queue: str, message: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def storage_put_fanout(
        self, exchange: str, message: Any, routing_key: str, **kwargs: Any
    ) -> None:
        raise NotImplementedError

    def storage_size(self, queue: str) -> int:
        raise NotImplementedError

    def storage_purge(self, queue: str) -> int:
        raise NotImplementedError

    def storage_delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def storage_bind(self, *args: Any) -> None:
        raise NotImplementedError

    def storage_restore(self, message: Any) -> None:
        raise NotImplementedError

    # What kombu keeps about this channel's consumers.
    def lookup(self, exchange: str, routing_key: str) -> list[str]:
        """The queues ``exchange`` routes ``routing_key`` to."""
        return list(self._lookup(exchange, routing_key))

    @property
    def consuming(self) -> bool:
        """Whether any consumer is on this channel."""
        return bool(self._consumers)

    @property
    def consumed_queues(self) -> list[str]:
        """The queues this channel consumes from (kombu's own list: do not change it)."""
        queues: list[str] = self._active_queues
        return queues

    def consumer_queue(self, consumer_tag: Any) -> str | None:
        """The queue of this channel's consumer ``consumer_tag``, or None."""
        if consumer_tag not in self._consumers:
            return None
        queue: str | None = self._tag_to_queue.get(consumer_tag)
        return queue


class VirtualTransport(kombu.transport.virtual.Transport):  # type: ignore[misc]
    """kombu's virtual Transport with its delivery to consumers under public names.

    Example::

        class Transport(VirtualTransport):
            Channel = Channel
    """

    @property
    def delivery_callbacks(self) -> dict[str, Callable[[Any], Any]]:
        """queue -> the callback kombu delivers its messages to."""
        callbacks: dict[str, Callable[[Any], Any]] = self._callbacks
        return callbacks

    def deliver(self, message: Any, queue: str) -> None:
        """Hand ``message`` of ``queue`` to its consumer, as kombu's poll loop does."""
        self._deliver(message, queue)


# -- kombu's Redis transport --------------------------------------------------------------
# Imported on first use: it needs the redis package, which apps on local:// or amqp:// may
# not have.
_REDIS = "kombu.transport.redis:Channel"
_uses(_REDIS, "_put", ("queue", "message"))
_uses(_REDIS, "_brpop_start", ("timeout",))
_uses(_REDIS, "_brpop_read", None)
_uses(_REDIS, "_connparams", ("asynchronous",))
_uses(_REDIS, "_q_for_pri", ("queue", "pri"))
_uses(_REDIS, "_get_message_priority", ("message", "reverse"))
_uses(
    _REDIS,
    "_do_restore_message",
    ("payload", "exchange", "routing_key", "pipe", "leftmost"),
)
_uses(_REDIS, "_create_client", ("asynchronous",))
_uses(_REDIS, "_flush_brpop_reauth", ())
_uses(_REDIS, "_queue_cycle", how="set")
_uses(_REDIS, "_in_poll", how="set")
_uses(_REDIS, "_expires", how="set")
_uses(kombu.transport.virtual.Message, "_raw", how="set")


@functools.cache
def _redis_channel() -> type:
    from kombu.transport import redis as kombu_redis

    class RedisChannel(kombu_redis.Channel):  # type: ignore[misc]
        """kombu's Redis Channel with its publish and poll hooks under public names.

        kombu polls in two halves: it sends a BRPOP (``poll_start``), its event loop waits
        for the socket, then it reads the reply and delivers (``poll_read``). The subclass
        overrides the public names and calls ``super()`` for kombu's own behaviour.

        Example::

            class Channel(RedisChannel):
                def storage_put(self, queue, message, **kwargs): ...
        """

        def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
            self.storage_put(queue, message, **kwargs)

        def storage_put(self, queue: str, message: Any, **kwargs: Any) -> None:
            """Push ``message`` onto ``queue`` (kombu: LPUSH onto the priority's list)."""
            kombu_redis.Channel._put(self, queue, message, **kwargs)

        def _brpop_start(self, timeout: float | None = None) -> None:
            self.poll_start(timeout)

        def poll_start(self, timeout: float | None = None) -> None:
            """Send the command that waits for a message (kombu: BRPOP)."""
            kombu_redis.Channel._brpop_start(self, timeout)

        def _brpop_read(self, **options: Any) -> Any:
            try:
                return self.poll_read(**options)
            finally:
                # kombu's own read does this too; an override of poll_read may not call it.
                self._in_poll = None
                self._flush_brpop_reauth()

        def poll_read(self, **options: Any) -> Any:
            """Read the reply of :meth:`poll_start` and deliver it; raise ``Empty`` if none."""
            return kombu_redis.Channel._brpop_read(self, **options)

        def _connparams(self, asynchronous: bool = False) -> Any:
            self.check_open()
            return super()._connparams(asynchronous)

        def check_open(self) -> None:
            """Called before kombu builds a connection pool; may raise a connection error."""

        def next_queues(self) -> list[str]:
            """The queues to poll next, in kombu's round-robin order."""
            queues: list[str] = self._queue_cycle.consume(len(self.active_queues))
            return queues

        def polled(self, queue: str) -> None:
            """Move ``queue`` to the back of the round-robin (it just gave a message)."""
            self._queue_cycle.rotate(queue)

        def mark_polling(self, connection: Any) -> None:
            """Note that ``connection`` waits for a reply, as kombu's own poll does."""
            self._in_poll = connection
            self._brpop_sent_at = time.monotonic()

        def deliver(self, payload: Any, queue: str) -> None:
            """Hand a popped payload of ``queue`` to its consumer."""
            self.connection._deliver(payload, queue)

        def queue_expires_ms(self, queue: str) -> int:
            """The ``x-expires`` kombu applies to ``queue``'s lists, or 0."""
            return int((self._expires or {}).get(queue, 0))

        def restore_payload(
            self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool
        ) -> None:
            """Queue ``payload`` again through ``pipe``, at the head when ``leftmost``."""
            self._do_restore_message(payload, exchange, routing_key, pipe, leftmost=leftmost)

    return RedisChannel


def __getattr__(name: str) -> Any:
    if name == "RedisChannel":
        return _redis_channel()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def redis_list_key(channel: Any, queue: str, priority: int) -> str:
    """The Redis list (without the global prefix) of ``queue`` at ``priority``.

    ``channel`` is any channel of kombu's Redis transport, celery_ext's or stock.
    """
    key: str = channel._q_for_pri(queue, priority)
    return key


def redis_message_priority(channel: Any, message: Any) -> int:
    """The priority step a kombu Redis payload goes to."""
    return int(channel._get_message_priority(message, reverse=False))


def sync_client(channel: Any) -> Any:
    """A client on a Redis channel's synchronous pool: usable from another thread."""
    return channel._create_client()


def message_raw(message: Any) -> Any:
    """The payload a kombu virtual message was built from."""
    return message._raw


# -- py-amqp / kombu's pyamqp transport ---------------------------------------------------
_uses(pyamqp.Channel, "_basic_publish", None)
_uses(amqp.channel.Channel, "_confirm_selected", how="set")


class AmqpChannel(pyamqp.Channel):  # type: ignore[misc]
    """py-amqp's Channel with the frame send every publish goes through, public.

    Example::

        class Channel(AmqpChannel):
            def send_publish(self, *args, **kwargs):
                return super().send_publish(*args, **kwargs)
    """

    def _basic_publish(self, *args: Any, **kwargs: Any) -> Any:
        return self.send_publish(*args, **kwargs)

    def send_publish(self, *args: Any, **kwargs: Any) -> Any:
        """Send one ``basic.publish`` (``basic_publish_confirm`` also calls this)."""
        return pyamqp.Channel._basic_publish(self, *args, **kwargs)

    @property
    def confirm_selected(self) -> bool:
        """Whether publisher confirms are on for this channel."""
        return bool(getattr(self, "_confirm_selected", False))

    def ensure_confirms(self) -> None:
        """Turn publisher confirms on for this channel, once."""
        if not self.confirm_selected:
            self._confirm_selected = True
            self.confirm_select()


# -- Celery's app and tasks -----------------------------------------------------------
_uses(celery.app.task.Task, "_get_exec_options", ())
_uses(celery.app.task.Task, "_get_app", ())
_uses(celery.app.task.Task, "_exec_options")
_uses(celery._state, "_set_task_join_will_block", ("blocks",))
_uses(celery.app.amqp.AMQP, "_producer_pool")


def task_exec_options(task: Any) -> dict[str, Any]:
    """The task's own publish options (queue, exchange, priority...), as apply_async uses."""
    options: dict[str, Any] = task._get_exec_options()
    return options


def forget_exec_options(task: Any) -> None:
    """Drop the options Celery cached on ``task``, after one of them changed."""
    task.__dict__.pop("_exec_options", None)


def task_app(task: Any) -> Any:
    """The app of a task or task class (``Task.app`` on a class binds it)."""
    return task._get_app()


def set_task_join_will_block(blocks: bool) -> None:
    """Tell Celery whether ``result.get()`` in this thread would block a worker."""
    celery._state._set_task_join_will_block(blocks)


def reset_annotations(app: Any) -> None:
    """Make Celery prepare ``task_annotations`` again (it caches them on first use)."""
    app.__dict__.pop("annotations", None)


def amqp_created(app: Any) -> bool:
    """Whether ``app.amqp`` (a cached property) was built already."""
    return "amqp" in app.__dict__


def producer_pool_created(amqp: Any) -> bool:
    """Whether ``app.amqp`` built its producer pool already."""
    return amqp.__dict__.get("_producer_pool") is not None


# -- Celery's worker: requests, consumer, pools --------------------------------------------
_uses(Request, "_message", how="set")
_uses(Request, "_context")
_uses(Request, "_app", how="set")
_uses(Consumer, "_restore_prefetch_count_after_connection_restart", ("p",))
_uses(Consumer, "_maximum_prefetch_restored", how="set")
_uses(kombu.common.QoS, "_mutex", how="set")
_uses(BasePool, "_get_info", ())


def request_message(request: Any) -> Any:
    """The kombu message a worker Request came from (None for a request built without)."""
    return getattr(request, "_message", None)


def request_context(request: Any) -> Any:
    """The task context (``self.request`` inside the task) of a worker Request."""
    return request._context


def request_app(request: Any) -> Any:
    """The app a worker Request belongs to, or None."""
    return getattr(request, "_app", None)


def replace_consumer_method(c: Any, name: str, method: Callable[..., Any]) -> None:
    """Replace a public method of one Consumer instance (or of its pool or blueprint).

    Celery looks these up on the instance at each use, so a step can wrap them for this
    consumer only: the intake hooks, ``apply_eta_task``, ``pool.flush``,
    ``blueprint.on_close``, ``task_consumer.on_decode_error``.
    """
    setattr(c, name, method)


def replaced_method(c: Any, name: str) -> Callable[..., Any] | None:
    """The instance-level replacement of ``name`` on ``c``, or None when there is none."""
    method: Callable[..., Any] | None = c.__dict__.get(name)
    return method


def replace_prefetch_restore(c: Any, restore: Callable[[], None]) -> None:
    """Replace the consumer's gradual prefetch restore after a reconnect.

    Celery calls it from the ack callback (on the threads pool, a pool thread).
    """
    c._restore_prefetch_count_after_connection_restart = lambda *_: restore()


def qos_lock(qos: Any) -> Any:
    """The lock kombu's QoS takes around prefetch changes."""
    return qos._mutex


def prefetch_restored(c: Any) -> bool:
    """Whether the consumer's prefetch is fully restored since the last reconnect."""
    return bool(c._maximum_prefetch_restored)


def set_prefetch_restored(c: Any, restored: bool) -> None:
    c._maximum_prefetch_restored = restored


class InfoPool:
    """Pool mixin adding rows to the pool's part of ``inspect stats``.

    Example::

        class Pool(InfoPool, ThreadPool):
            def extra_info(self): return {"threads": 4}
    """

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()  # type: ignore[misc]
        info.update(self.extra_info())
        return info

    def extra_info(self) -> dict[str, Any]:
        return {}


def pool_info(pool: Any) -> dict[str, Any]:
    """The pool's part of ``inspect stats`` (``{}`` when it has none)."""
    info = pool._get_info() if pool is not None else {}
    return info if isinstance(info, dict) else {}


def gevent_pool(pool: Any) -> Any:
    """The gevent ``Pool`` of Celery's gevent TaskPool (None before it started)."""
    return pool._pool


# Celery's pools by module (``-P`` names map to these; ``processes`` is prefork's alias).
_POOL_KINDS = {
    "celery.concurrency.prefork": "prefork",
    "celery.concurrency.thread": "threads",
    "celery.concurrency.solo": "solo",
    "celery.concurrency.gevent": "gevent",
    "celery.concurrency.eventlet": "eventlet",
    "prefork": "prefork",
    "processes": "prefork",
    "threads": "threads",
    "solo": "solo",
    "gevent": "gevent",
    "eventlet": "eventlet",
}


def pool_kind(pool: Any) -> str | None:
    """Which of Celery's pools ``pool`` is (a class, an instance, or a ``-P`` name).

    None for any other pool (celery_ext's own, or a custom ``-P module:Class``).

    Example::

        pool_kind("processes")   # 'prefork'
    """
    if isinstance(pool, str):
        name = pool.split(":", 1)[0]
    else:
        name = (pool if isinstance(pool, type) else type(pool)).__module__
    return _POOL_KINDS.get(name)


# -- billiard's prefork pool ----------------------------------------------------------------
_uses(celery.concurrency.prefork.TaskPool, "_pool", how="set")
_uses(celery.concurrency.gevent.TaskPool, "_pool", how="set")
_uses(billiard.pool.Pool, "_cache", how="set")
_uses(billiard.pool.Pool, "_pool", how="set")
_uses(ApplyResult, "_accepted", how="set")
_uses(ApplyResult, "_write_to")
_uses(ApplyResult, "_scheduled_for")
_uses(ApplyResult, "_job", how="set")
_uses(ApplyResult, "_callback", how="set")
_uses(ApplyResult, "_error_callback", how="set")


def prefork_pool(pool: Any) -> Any:
    """The billiard AsynPool inside Celery's prefork pool, or None on other pools."""
    inner = getattr(pool, "_pool", None)
    return inner if hasattr(inner, "outbound_buffer") else None


def pool_jobs(asyn: Any) -> list[Any]:
    """The jobs billiard tracks: applied, and not yet finished."""
    return list(asyn._cache.values())


def keep_job(asyn: Any, job: Any) -> None:
    """Track ``job`` again, so its acceptance and result are handled as usual."""
    asyn._cache[job._job] = job


def job_accepted(job: Any) -> bool:
    """A child started the job."""
    return bool(job._accepted)


def job_written(job: Any) -> bool:
    """The job is being, or was, written to a child."""
    return getattr(job, "_write_to", None) is not None


def job_scheduled(job: Any) -> bool:
    """The job was given to a child's queue."""
    return getattr(job, "_scheduled_for", None) is not None


def forget_job_callbacks(job: Any) -> None:
    """Let a job end without its success or failure callback (it runs elsewhere)."""
    job._error_callback = job._callback = None


def pool_process_index(asyn: Any) -> dict[int, int]:
    """pid -> index of the pool's child processes."""
    return {proc.pid: proc.index for proc in list(asyn._pool)}
