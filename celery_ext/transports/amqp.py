"""The RabbitMQ transport ``install(app)`` selects for ``amqp://``, ``pyamqp://`` and ``amqps://``.

kombu's py-amqp transport with producer-side bounds (:mod:`celery_ext.bounds`:
``x-max-length`` + ``reject-publish`` with publisher confirms, or a passive-declare
check, pipelined confirms for bulk publishes), far-future ETAs parked at publish,
and the parking store for delayed messages, :class:`AmqpParking`: kombu's native
delayed delivery topology (28 delay queues with queue-level TTLs of 2^n s, chained
by dead-lettering through topic exchanges, the delay written in binary in the
routing key) declared as *classic* queues under our own name prefix. Due messages
land in one unbounded "due" queue, and workers move them to their queues with
publisher confirms: RabbitMQ drops a dead-lettered message that a full queue
(``x-max-length`` + ``reject-publish``) refuses, a mover retries it. No plugin.

Example::

    Celery(broker="amqp://", broker_transport="celery_ext.transports.amqp:AmqpTransport")
    AmqpParking(conn.default_channel).park("celery", message, 3600)
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import amqp
from amqp.exceptions import MessageNacked, NotFound, PreconditionFailed
from celery.utils.quorum_queues import detect_quorum_queues
from kombu.transport import native_delayed_delivery as _native
from kombu.transport import pyamqp

from .. import _compat
from .._settings import PREFIX
from ..bounds import (
    BOUNDS_OPTION,
    CONFIRM_TIMEOUT_S,
    OPTION,
    Bounds,
    Collecting,
    Pending,
    Publish,
    check_limit,
    offer,
)
from ..errors import ConfigurationError, QueueFull
from ..sizes import SizeLimited

__all__ = [
    "AMQP_MAX_DELAY_S",
    "AmqpChannel",
    "AmqpConnection",
    "AmqpParking",
    "AmqpTransport",
    "AmqpsTransport",
    "parked_queue",
    "queue_type_of",
]


_BITS: int = _native.MAX_NUMBER_OF_BITS_TO_USE  # 28 delay levels, 2^0 .. 2^27 s

#: Longest delay :class:`AmqpParking` supports: 2^28 - 1 s (about 8.5 years).
AMQP_MAX_DELAY_S: int = 2**_BITS - 1
_BIT_PREFIX = 2 * _BITS  # "0.1.0. ... ." before the queue name


def queue_type_of(app: Any) -> str:
    """``"quorum"`` when ``app`` declares quorum queues, else ``"classic"``.

    Quorum: Celery's ``task_default_queue_type="quorum"``, or any of the app's
    queues declared with ``x-queue-type: quorum`` (Celery's own test,
    ``celery.utils.quorum_queues.detect_quorum_queues``). Parked messages and
    dead letters then live in quorum queues too: replicated like the app's own.

    Example::

        queue_type_of(app)   # "quorum" after app.conf.task_default_queue_type = "quorum"
    """
    if app.conf.task_default_queue_type == "quorum":
        return "quorum"
    return "quorum" if detect_quorum_queues(app, "amqp")[0] else "classic"


def parked_queue(routing_key: object) -> str | None:
    """The queue a message coming back from RabbitMQ's delay levels was parked for.

    Such a message keeps the delay-level routing key (28 bits, then the queue);
    None for any other routing key.

    Example::

        parked_queue("0." * 27 + "1.emails")   # 'emails'
    """
    if not isinstance(routing_key, str) or len(routing_key) <= _BIT_PREFIX:
        return None
    if routing_key[1] != "." or routing_key[_BIT_PREFIX - 1] != ".":
        return None  # the common case, any queue name: out before the full check
    head = routing_key[:_BIT_PREFIX]
    if head[1::2] != "." * _BITS or not set(head[0::2]) <= {"0", "1"}:
        return None
    return routing_key[_BIT_PREFIX:]


# Publishable properties: all but `expiration`, a per-queue TTL that would cut a
# delay short in the first delay queue (RabbitMQ drops it at the first hop anyway).
_PROPERTIES = frozenset(name for name, _ in amqp.Message.PROPERTIES) - {"expiration"}


def _is_dead_letter_header(name: str) -> bool:
    """RabbitMQ's dead-letter bookkeeping, which it adds on every hop."""
    return name == "x-death" or name.startswith(("x-first-death-", "x-last-death-"))


def _keys(queue: str, delay_s: int) -> tuple[str, str]:
    """(routing key of a message parked for ``queue``, binding key of ``queue``).

    The routing key is what kombu's ``calculate_routing_key`` builds (the delay's
    28 binary digits, then the queue), which refuses a delay of 0; the binding
    matches exactly 28 digits, so a queue named ``b`` never receives ``a.b``'s.
    """
    if not queue or {"*", "#"} & set(queue.split(".")):
        raise ValueError(f"cannot park for queue {queue!r}: a word '*' or '#' is a wildcard")
    if len(queue.encode()) > 255 - 2 * _BITS:  # AMQP keys are at most 255 bytes
        raise ValueError(f"cannot park for queue {queue!r}: over {255 - 2 * _BITS} bytes")
    return ".".join(f"{delay_s:0{_BITS}b}") + "." + queue, "*." * _BITS + queue


def _unpack(message: Any) -> tuple[Any, dict[str, Any]]:
    """Body and publishable properties of a message object or ``{body, properties, headers}``."""
    if isinstance(message, Mapping):
        body, headers = message["body"], message.get("headers")
        props = message.get("properties") or {}
    else:  # kombu's Message (with .headers) or py-amqp's (headers in .properties)
        body, props, headers = message.body, message.properties, getattr(message, "headers", None)
    if headers is None:
        headers = props.get("application_headers") or {}
    properties = {name: value for name, value in props.items() if name in _PROPERTIES}
    properties["application_headers"] = {
        name: value for name, value in headers.items() if not _is_dead_letter_header(name)
    }
    return body, properties


class _OneChannel:
    """All kombu's declare function asks of a Connection: ``channel()``, here ours.

    (A real Connection would open a channel for it and never close that.)
    """

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def channel(self) -> Any:
        return self._channel


class AmqpParking:
    """Parks messages in RabbitMQ delay queues (TTL + dead-lettering) until due.

    ``channel`` is a channel of kombu's py-amqp transport (``conn.default_channel``
    of an ``amqp://`` connection). Needs kombu >= 5.7 (named delay levels) and no
    RabbitMQ plugin.

    How: kombu's native delayed delivery topology, declared on first use as
    durable queues of ``queue_type`` (``"classic"``, or ``"quorum"`` for an app
    on quorum queues, see :func:`queue_type_of`): queue
    ``{prefix}_celery_delayed_{n}`` (n = 0..27; quorum: ``{prefix}_quorum_...``)
    keeps messages for ``x-message-ttl`` = 2^n s, then dead-letters them to level
    n-1's topic exchange, the last to ``{prefix}_celery_delayed_delivery``. A
    message is published to level 27 with the routing key ``<delay in 28 binary
    digits>.<queue>``, so it waits only in the levels whose bit is set. The
    delivery exchange routes everything to the due queue ``{prefix}_celery_due``
    (durable, unbounded), and :meth:`move_due` (every worker runs it every
    ``park_interval``) publishes each due message to ``<queue>`` with a publisher
    confirm before it acks it. A queue at its ``x-max-length`` with
    ``reject-publish`` refuses it (RabbitMQ would have dropped a dead-lettered
    message there silently): it is parked again for a second, never lost.

    - **No head-of-line blocking**: every message in a level queue has the same
      TTL, so they expire in order; a long delay never holds up a shorter one.
    - **Bounded**: 28 queues and 29 exchanges per ``prefix`` whatever the number
      of messages or target queues (hence no ``x-expires``); :meth:`delete`
      removes them. Give each test run or app its own ``prefix``; never ``""``,
      which is Celery's own (quorum) topology.
    - **Message**: body, headers (task id, ...), content type and encoding,
      priority, delivery mode and the other properties come back unchanged, but
      RabbitMQ adds ``x-death`` / ``x-first-death-*`` headers on the way and
      ``park`` strips them (else RabbitMQ drops a message parked a second time as
      a dead-letter cycle). ``park`` also drops the ``expiration`` property (a
      per-queue TTL; RabbitMQ would drop it at the first hop, after it had cut
      the delay short); Celery's ``expires`` header still applies.
      A moved message arrives with ``delivery_info`` exchange ``""`` and routing
      key ``queue``, as if published there (queue bounds do not apply to it).
    - **Precision**: delays are rounded *up* to whole seconds (the message is
      never early), then wait up to one mover interval in the due queue: 0-1 s
      after the time requested, plus ``park_interval``.
    - **Needs a mover**: due messages wait in the due queue until a worker with
      celery_ext (any of them, of any app with this ``prefix``) moves them.
    - **Max delay**: :data:`AMQP_MAX_DELAY_S` = 2^28 - 1 s (~8.5 years);
      queue names up to 199 bytes (the routing key adds 56).
    - **Target queue deleted**: messages falling due for it are unroutable and
      RabbitMQ drops them silently.
    - **Durability**: the delay queues are durable and each message keeps its
      delivery mode, so persistent messages survive a broker restart. Classic
      queues dead-letter at most once: a broker crash mid-hop can lose one.
      Quorum queues (``queue_type="quorum"``) are replicated across the
      cluster's nodes and dead-letter *at least once* (``x-dead-letter-strategy``;
      RabbitMQ >= 3.10): a parked message survives the loss of a node and a
      crash mid-hop. The two kinds have separate names (``{prefix}_quorum_...``),
      so an app that moves to quorum queues declares new ones; messages parked
      before the move stay in the classic ones until a classic app's worker
      moves them.
      With ``confirm_publish`` on the connection, ``park`` returns only once the
      broker holds the message, so parking before the ack never loses it.
    - **Counts**: :meth:`parked` is approximate (see there).

    Example::

        parking = AmqpParking(conn.default_channel)
        parking.park("celery", message, delay_s=3600)   # then message.ack()
        parking.parked("celery")     # 1
        parking.move_due()           # an hour later (a worker does it)
    """

    def __init__(
        self, channel: Any, prefix: str = "celery_ext", queue_type: str = "classic"
    ) -> None:
        if "prefix" not in inspect.signature(_native.level_name).parameters:
            raise RuntimeError("AmqpParking needs kombu >= 5.7 (prefixed delayed-delivery levels)")
        if not prefix:
            raise ValueError("prefix must not be empty: that is Celery's own quorum topology")
        if queue_type not in ("classic", "quorum"):
            raise ValueError(f"queue_type={queue_type!r}: expected 'classic' or 'quorum'")
        self.channel = channel
        self.prefix = prefix
        self.queue_type = queue_type
        names = prefix if queue_type == "classic" else f"{prefix}_quorum"
        self._names = names
        #: The 28 delay queues, shortest TTL first (each has an exchange of the same name).
        self.delay_queues: list[str] = [_native.level_name(n, names) for n in range(_BITS)]
        self.delivery_exchange = f"{names}_{_native.CELERY_DELAYED_DELIVERY_EXCHANGE}"
        self.due_queue = f"{names}_celery_due"
        self._declared = False

    def _declare(self) -> None:
        if not self._declared:
            _native.declare_native_delayed_delivery_exchanges_and_queues(
                _OneChannel(self.channel), self.queue_type, self._names
            )
            channel = self.channel
            arguments = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None
            channel.queue_declare(
                self.due_queue, durable=True, auto_delete=False, arguments=arguments
            )
            channel.queue_bind(self.due_queue, self.delivery_exchange, "#")
            self._declared = True

    def park(self, queue: str, message: Any, delay_s: float, confirm: bool = False) -> float:
        """Park ``message`` for ``queue``; return its due time (epoch s, whole seconds away).

        ``message`` is a kombu or py-amqp message (or ``{"body", "properties",
        "headers"}``). ``queue`` must exist: RabbitMQ answers 404 (``amqp.NotFound``)
        otherwise, closing the channel. Raises ``ValueError`` for a delay over
        :data:`AMQP_MAX_DELAY_S` or a queue name that cannot be routed to.

        Example::

            parking.park("celery", message, delay_s=3600)
        """
        delay = max(0, math.ceil(delay_s - 0.001))  # forgive float noise: ceil(1.0000001) is 1
        if delay > AMQP_MAX_DELAY_S:
            raise ValueError(f"delay_s={delay_s} is over the maximum of {AMQP_MAX_DELAY_S} s")
        routing_key, _ = _keys(queue, delay)
        body, properties = _unpack(message)
        self._declare()
        due = time.time() + delay
        # Enter at the highest set bit, not at level 27 as kombu does: the levels
        # above it would only pass the message on, and every hop costs the broker.
        entry = self.delay_queues[max(0, delay.bit_length() - 1)]
        self._publish(amqp.Message(body, **properties), entry, routing_key, confirm)
        return due

    def _publish(self, message: Any, exchange: str, routing_key: str, confirm: bool) -> None:
        if confirm:  # py-amqp's own: raises MessageNacked, no queue bound applies
            amqp.Channel.basic_publish_confirm(self.channel, message, exchange, routing_key)
        else:
            self.channel.basic_publish(message, exchange, routing_key)

    def bind(self, queue: str, again: bool = False) -> None:
        """Declare the delay topology (the due queue included), once.

        A worker declares it up front, outside its message callbacks: a
        synchronous AMQP call from inside a callback can deliver the next
        message re-entrantly. (Queues need no binding of their own: the mover
        publishes to them by name.)

        Example::

            parking.bind("celery")
        """
        _keys(queue, 0)  # the same check as park's
        if again:
            self._declared = False
        self._declare()

    def move_due(self, limit: int = 1000) -> int:
        """Publish due messages to their queues (confirmed), then ack them; how many moved.

        A queue that refuses one (full, with ``reject-publish``) gets it back a
        second later: it is parked again, then acked. Run it on a channel of its
        own (it waits for confirms); any number of movers may run at once, each
        message is taken by one. A message is acked only once it is queued or
        parked again: a crash in between gives a duplicate, never a loss.

        Example::

            parking.move_due()   # 3
        """
        self._declare()
        channel = self.channel
        moved = 0
        while moved < limit:
            message = channel.basic_get(self.due_queue, no_ack=False)
            if message is None:
                break
            routing_key = message.delivery_info.get("routing_key")
            queue = parked_queue(routing_key)
            if queue is not None:
                body, properties = _unpack(message)
                try:
                    self._publish(amqp.Message(body, **properties), "", queue, confirm=True)
                except MessageNacked:  # the queue is full: try again in a second
                    self.park(queue, message, 1.0, confirm=True)
            channel.basic_ack(message.delivery_tag)
            moved += 1
        return moved

    def parked(self, queue: str) -> int:
        """Messages waiting in this prefix's delay queues (passive declares).

        Approximate: the delay queues are shared, so this counts messages parked
        for *every* queue under this ``prefix`` (exact when only ``queue`` uses
        it), and misses one for the few ms it spends between two levels.

        Example::

            parking.parked("celery")
        """
        _keys(queue, 0)  # the same check as park's
        return self.parked_all()

    def parked_all(self) -> int:
        """Messages waiting in this prefix's delay queues, for any queue.

        Example::

            parking.parked_all()
        """
        self._declare()
        return sum(
            int(self.channel.queue_declare(name, passive=True).message_count)
            for name in self.delay_queues
        )

    def delete(self) -> None:
        """Delete this prefix's delay queues and exchanges, and every message parked there.

        Example::

            AmqpParking(conn.default_channel, prefix="test_1234").delete()
        """
        for name in self.delay_queues:
            self.channel.queue_delete(name)
            self.channel.exchange_delete(name)
        self.channel.queue_delete(self.due_queue)
        self.channel.exchange_delete(self.delivery_exchange)
        self._declared = False


# -- the transport ---------------------------------------------------------------
class AmqpChannel(Collecting, SizeLimited, _compat.AmqpChannel):
    """kombu's py-amqp channel with queue bounds; see the module docstring."""

    _probe: Any = None
    _sent = 0  # publishes since confirm.select: the broker's delivery tags

    @property
    def bounds(self) -> Bounds | None:
        client = getattr(self.connection, "client", None)
        bounds = client.transport_options.get(BOUNDS_OPTION) if client is not None else None
        return bounds if isinstance(bounds, Bounds) else None

    def queue_declare(
        self,
        queue: str = "",
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = True,
        nowait: bool = False,
        arguments: dict[str, Any] | None = None,
        argsig: str = "BsbbbbbF",
    ) -> Any:
        bounds = self.bounds
        limit = bounds.limits.get(queue) if bounds and queue and not passive else None
        quorum = (arguments or {}).get("x-queue-type") == "quorum"
        if limit is not None:
            # A quorum queue accepts a publish while it holds no more than
            # x-max-length (a classic one while it holds fewer): one less keeps N.
            length = limit - 1 if quorum else limit
            bound = {"x-max-length": length, "x-overflow": "reject-publish"}
            arguments = {**(arguments or {}), **bound}
        try:
            result = super().queue_declare(
                queue, passive, durable, exclusive, auto_delete, nowait, arguments, argsig
            )
        except PreconditionFailed as exc:
            if limit is None:
                raise
            raise ConfigurationError(
                f"RabbitMQ refused to declare queue {queue!r} with x-max-length={limit} and "
                f"x-overflow=reject-publish ({PREFIX}queue_limits): it exists with other "
                f"arguments ({exc}). A queue's arguments cannot change: delete the drained "
                "queue, or drop it from queue_limits and bound it with a RabbitMQ policy"
            ) from exc
        args = arguments or {}
        rejects = str(args.get("x-overflow", "")).startswith("reject-publish")
        if bounds and queue and "x-max-length" in args and rejects:
            bounds.declared[queue] = int(args["x-max-length"]) + (1 if quorum else 0)
        return result

    def close(self, *args: Any, **kwargs: Any) -> Any:
        probe, self._probe = self._probe, None
        if probe is not None and probe.is_open:
            with contextlib.suppress(Exception):  # the connection may be gone already
                probe.close()
        return super().close(*args, **kwargs)

    def confirm_select(self, nowait: bool = False) -> Any:
        self._sent = 0
        return super().confirm_select(nowait)

    def send_publish(self, *args: Any, **kwargs: Any) -> Any:
        if self.confirm_selected:
            self._sent += 1
        return super().send_publish(*args, **kwargs)

    def basic_publish(
        self, msg: Any, exchange: str = "", routing_key: str = "", **kwargs: Any
    ) -> Any:
        return self._route_publish(False, msg, exchange, routing_key, kwargs)

    def basic_publish_confirm(
        self, msg: Any, exchange: str = "", routing_key: str = "", **kwargs: Any
    ) -> Any:
        return self._route_publish(True, msg, exchange, routing_key, kwargs)

    _parking_now = False

    @cached_property
    def _parking(self) -> AmqpParking | None:
        try:
            bounds = self.bounds
            if bounds is None:
                return AmqpParking(self)
            return AmqpParking(self, bounds.park_prefix, queue_type_of(bounds.app))
        except RuntimeError:  # kombu too old for prefixed delay levels: queue ETAs as usual
            return None

    def _park_at_publish(self, msg: Any, exchange: str, routing_key: str) -> bool:
        """Park a far-future ETA message instead of queueing it (see backpressure)."""
        bounds = self.bounds
        if bounds is None or self._parking_now:
            return False  # (AmqpParking publishes through this channel too)
        delay = bounds.park_delay(msg.properties.get("application_headers"), bounds.eta_horizon_s)
        queue = bounds.queue_for(exchange, routing_key) if delay is not None else None
        parking = self._parking if queue is not None else None
        if delay is None or queue is None or parking is None:
            return False
        bounds.parking(msg.properties.setdefault("application_headers", {}))
        self._parking_now = True
        try:
            parking.park(queue, msg, delay)
        finally:
            self._parking_now = False
        return True

    def _route_publish(
        self, confirm: bool, msg: Any, exchange: str, routing_key: str, kwargs: dict[str, Any]
    ) -> Any:
        if self._park_at_publish(msg, exchange, routing_key):
            return None
        props = msg.properties
        call = props.pop(OPTION, None)
        bounds = self.bounds
        if bounds is None:
            return self._send_now(confirm, msg, exchange, routing_key, kwargs)
        queue = bounds.queue_for(exchange, routing_key)
        checked = hard = None
        if queue is not None:
            checked = None if call is None else check_limit(call, f"apply_async({OPTION})")
            if checked is None:
                checked = bounds.task_limit((props.get("application_headers") or {}).get("task"))
            hard = bounds.declared.get(queue, bounds.limits.get(queue))
        collector = self._collector
        if collector is None and checked is None and (hard is None or not confirm):
            return self._send_now(confirm, msg, exchange, routing_key, kwargs)
        task_id = (props.get("application_headers") or {}).get("id")
        publish = Publish(msg, exchange, routing_key, kwargs)
        item = Pending(queue or routing_key, checked, task_id, publish, hard)
        if collector is not None:
            collector.append(item)
            return None
        _, refusal = self._flush_run([item])  # confirmed: the next check counts it
        if refusal is not None:
            raise refusal
        return None

    def _send_now(
        self, confirm: bool, msg: Any, exchange: str, routing_key: str, kwargs: dict[str, Any]
    ) -> Any:
        if confirm:
            return super().basic_publish_confirm(msg, exchange, routing_key, **kwargs)
        return self.send_publish(msg, exchange, routing_key, **kwargs)

    def _flush_run(self, run: list[Pending]) -> tuple[list[Pending], QueueFull | None]:
        queue, checked, hard = run[0].queue, run[0].limit, run[0].hard_limit
        bounds = self.bounds
        assert bounds is not None

        def attempt(items: list[Pending]) -> tuple[list[Pending], list[Pending], int]:
            depth = -1
            send, rest = items, []
            if checked is not None:
                depth = self.depth(queue)
                room = max(0, checked - depth)
                send, rest = items[:room], items[room:]
            acked, nacked = self._publish_confirmed(send)
            if nacked:
                depth = self.depth(queue)
            elif rest:
                depth += len(acked)
            return acked, nacked + rest, depth

        limits = [x for x in (checked, hard) if x is not None]
        if not limits:  # collected, unbounded: publish with confirms, no policy
            acked, nacked, _ = attempt(run)
            if nacked:
                raise MessageNacked(f"RabbitMQ refused {len(nacked)} message(s) for {queue!r}")
            return acked, None
        return offer(bounds, queue, min(limits), run, attempt)

    def _publish_confirmed(self, items: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        """Publish ``items`` at once, then wait for every confirm; return (acked, nacked)."""
        if not items:
            return [], []
        self.ensure_confirms()
        first = self._sent + 1  # the broker numbers confirms per channel from 1
        last = first + len(items) - 1
        outcome: dict[int, bool] = {}

        def settle(ok: bool) -> Callable[[int, bool], None]:
            def on_confirm(tag: int, multiple: bool) -> None:
                for t in range(max(first, 1 if multiple else tag), min(tag, last) + 1):
                    outcome.setdefault(t, ok)

            return on_confirm

        # Confirms can arrive while publishing (py-amqp reads pending frames before
        # each publish), so listen first.
        on_ack, on_nack = settle(True), settle(False)
        self.events["basic_ack"].add(on_ack)
        self.events["basic_nack"].add(on_nack)
        try:
            for item in items:
                p = item.payload
                self.send_publish(p.msg, p.exchange, p.routing_key, **p.kwargs)
            deadline = time.monotonic() + CONFIRM_TIMEOUT_S
            while len(outcome) < len(items):
                self.connection.drain_events(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self.events["basic_ack"].discard(on_ack)
            self.events["basic_nack"].discard(on_nack)
        acked = [item for tag, item in enumerate(items, first) if outcome[tag]]
        nacked = [item for tag, item in enumerate(items, first) if not outcome[tag]]
        return acked, nacked

    def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (0 when it does not exist), by a passive declare.

        Asked on a side channel: a passive declare of a missing queue closes its channel.

        Example::

            channel.depth("emails")
        """
        probe = self._probe
        if probe is None or not probe.is_open:
            probe = self._probe = self.connection.channel()
        try:
            return int(probe.queue_declare(queue, passive=True).message_count)
        except NotFound:
            self._probe = None
            return 0


class AmqpConnection(pyamqp.Connection):  # type: ignore[misc]
    """py-amqp connection whose channels are :class:`AmqpChannel`."""

    Channel = AmqpChannel


class AmqpTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport with queue bounds (``amqp://`` after ``install``).

    Example::

        Celery(broker="amqp://", broker_transport="celery_ext.transports.amqp:AmqpTransport")
    """

    Connection = AmqpConnection


class AmqpsTransport(AmqpTransport, pyamqp.SSLTransport):  # type: ignore[misc]
    """:class:`AmqpTransport` for ``amqps://`` URLs (TLS on, as kombu's ``SSLTransport``).

    Example::

        Celery(broker="amqps://host", broker_transport="celery_ext.transports.amqp:AmqpsTransport")
    """


# scheme -> (transport class path, the scheme kombu shows in URIs for it)
