"""Redis leases: in-flight messages are not redelivered while their worker lives,
and a dead worker's are recovered in seconds, not after ``visibility_timeout``.

kombu's Redis transport keeps every unacked message in ``unacked`` and its
delivery time in the ``unacked_index`` sorted set; any worker restores a
message whose delivery is older than ``visibility_timeout`` (1 h by default).
So a task running longer than that runs twice, and a SIGKILLed worker's
prefetched and running ``acks_late`` messages wait the whole hour.

The :class:`Leases` consumer step fixes both, on Redis only:

- **Renewal**: every ``lease_interval`` seconds (at most a third of
  ``visibility_timeout``) a thread of the worker moves the delivery time of
  the messages it holds (reserved, running, ETA-held) to now, so
  kombu's restore never sees them as stale while the worker lives, however
  long the task runs. A thread, not the event loop, so a long task on the
  solo pool (or a blocked loop) does not end the lease.
- **Ownership and heartbeat**: each delivered message's tag joins
  ``{park_prefix}.lease.owned:<worker>`` in the transaction where kombu records
  it as unacked (so a SIGKILL at any instant leaves it owned); the beat (also
  one within 0.5 s of a delivery) adds the tags it holds, drops acked ones, and refreshes
  ``{park_prefix}.lease.alive:<worker>`` (``<worker>``: hostname, pid and a
  random token, so a restarted worker never adopts a dead one's set), which expires after
  ``dead_worker_after`` seconds (default 15).
- **Recovery**: on each beat a worker looks for owned sets whose worker's
  heartbeat expired, takes one over into its own set in a transaction (so one
  survivor restores it, and a survivor dying meanwhile passes it on),
  and puts its messages back at the head of their queues (kombu's own
  restore, in a transaction: a message already acked is not restored). A
  SIGKILLed worker's messages are back within ``dead_worker_after`` +
  ``lease_interval`` (20 s by default). Messages of live workers, and of
  workers without celery_ext (no owned set), are never touched.
- **Orphans after a reconnect**: when the broker connection drops, Celery
  forgets the messages it had reserved (their delivery tags belong to the dead
  channel) and an ack that fails during the outage leaves its message unacked;
  kombu's restore on channel close fails too, the broker being gone. Stock
  Celery then leaves them in ``unacked`` for the whole visibility timeout. An
  owned message this worker no longer holds, still unacked for
  ``ORPHAN_GRACE_S`` (1 s) of beats, is restored by the worker itself (a failed
  ack's task then runs again: at-least-once).
- A warm shutdown keeps renewing through the drain, then removes the keys.

A worker frozen (SIGSTOP, swapped out) for longer than ``dead_worker_after``
is taken for dead: its tasks run again elsewhere (at-least-once).

Example::

    app.conf.celery_ext_dead_worker_after = 20    # seconds
    celery_ext.install(app)                        # Redis workers lease what they hold
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from . import _compat
from ._settings import settings_of
from .consumer_state import state_of
from .shutdown import kept_written, requests_now

__all__ = ["Leases"]

logger = logging.getLogger(__name__)

#: Soonest beat after a message arrives (the owned set is at most this stale).
RECEIVED_BEAT_S = 0.5
#: How long a message must stay unacked after this worker let go of it to count
#: as an orphan (an ack in flight when the beat looked has landed by then).
ORPHAN_GRACE_S = 1.0


def _text(value: Any) -> str:
    """A Redis reply item (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _held_tags(c: Any) -> set[str]:
    """Delivery tags of the messages this worker holds and has not acked."""
    requests = requests_now(worker_state.reserved_requests, worker_state.active_requests)
    requests += kept_written(c)  # prefork, warm shutdown: a child runs them
    messages = [_compat.request_message(r) for r in requests]
    backpressure = state_of(c).backpressure
    if backpressure is not None:
        messages += backpressure.eta_messages()
    return {
        str(m.delivery_tag)
        for m in messages
        if m is not None and not m.acknowledged and m.delivery_tag is not None
    }


class Leases(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step renewing this worker's Redis leases and recovering dead workers'.

    ``install(app)`` adds it; it does nothing on other brokers. ``inspect
    stats`` shows ``celery_ext.leases`` (renewals, recovered messages).

    Example::

        celery_ext.install(app, lease_interval=2, dead_worker_after=10)
    """

    name = "celery_ext.leases.Leases"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        settings = settings_of(c.app)
        self.interval_s = settings.lease_interval
        self.dead_after_s = settings.dead_worker_after
        self.prefix = settings.park_prefix
        self.enabled = settings.leases
        self.renewals = self.recovered = self.reclaimed = self.errors = 0
        self._released: dict[str, float] = {}  # owned tag -> first beat that saw it unheld
        self._stop = threading.Event()
        self._received = threading.Event()  # a message arrived: beat soon
        self._thread: threading.Thread | None = None
        self._channel: Any = None
        self._client: Any = None
        self._c: Any = None
        # Per process: a worker restarted under the same name must not take over
        # (and forget) the owned set of the one that died.
        self.identity = f"{c.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        super().__init__(c, **kwargs)

    def _lease_key(self, kind: str, identity: str) -> str:
        return f"{self.prefix}.lease.{kind}:{identity}"

    def start(self, c: Any) -> None:
        state_of(c).leases = self
        connection = getattr(c, "connection", None)
        if not self.enabled or connection is None:
            return
        if connection.transport.driver_type != "redis":
            return
        channel = c.task_consumer.channel
        visibility = float(connection.transport_options.get("visibility_timeout", 3600))
        self.interval_s = min(self.interval_s, visibility / 3)
        # The channel's synchronous pool: usable from our thread, unlike its
        # event-loop client.
        self._channel, self._client, self._c = channel, _compat.sync_client(channel), c
        # Alive before the first delivery: from now on each delivered tag joins the
        # owned set as kombu records it (see bounds._RecordingQoS).
        self._client.set(
            self._lease_key("alive", self.identity), 1, ex=math.ceil(self.dead_after_s)
        )
        channel.celery_ext_owned_key = self._lease_key("owned", self.identity)
        for name, strategy in list(c.strategies.items()):
            c.strategies[name] = self._noting(strategy)
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="celery_ext-leases", daemon=True)
            self._thread.start()

    def _noting(self, strategy: Any) -> Any:
        """Wrap a task strategy: a received message makes the next beat come soon."""
        if getattr(strategy, "celery_ext_leased", False):
            return strategy
        received = self._received

        def handler(*args: Any, **kwargs: Any) -> Any:
            received.set()
            return strategy(*args, **kwargs)

        handler.celery_ext_leased = True  # type: ignore[attr-defined]
        handler.celery_ext_wrapped = getattr(strategy, "celery_ext_wrapped", False)  # type: ignore[attr-defined]
        return handler

    def _run(self) -> None:
        while not self._stop.is_set():
            self._received.clear()
            try:
                self.beat()
            except Exception:  # a broker hiccup: the next beat tries again
                self.errors += 1
                logger.warning("celery_ext: lease beat failed", exc_info=True)
            # New messages are owned within RECEIVED_BEAT_S, not a whole interval:
            # a SIGKILL right after a delivery still leaves them recoverable.
            if self._stop.wait(min(RECEIVED_BEAT_S, self.interval_s)):
                return
            self._received.wait(max(0.0, self.interval_s - RECEIVED_BEAT_S))
            if self._stop.is_set():
                return

    def beat(self) -> None:
        """Renew this worker's leases and heartbeat, then recover dead workers' messages.

        Example::

            step.beat()   # what the lease thread does every lease_interval
        """
        c, client, channel = self._c, self._client, self._channel
        tags = _held_tags(c)
        owned = self._lease_key("owned", self.identity)
        pipe = client.pipeline()  # MULTI/EXEC: owned set and heartbeat change together
        if tags:
            pipe.zadd(channel.unacked_index_key, dict.fromkeys(tags, time.time()), xx=True)
            pipe.sadd(owned, *tags)
        pipe.set(self._lease_key("alive", self.identity), 1, ex=math.ceil(self.dead_after_s))
        pipe.execute()
        self.renewals += 1
        self._reclaim(client, channel, tags, owned)
        self._recover(client, channel, self.identity)

    def _reclaim(self, client: Any, channel: Any, held: set[str], owned: str) -> None:
        """Forget owned tags that were acked; restore those left unacked and unheld."""
        members = set(map(_text, client.smembers(owned)))
        unheld = sorted(members - held)
        now = time.monotonic()
        self._released = {tag: self._released.get(tag, now) for tag in unheld}
        if not unheld:
            return
        gone, orphans = [], []
        for tag, payload in zip(unheld, client.hmget(channel.unacked_key, unheld), strict=True):
            if payload is None:
                gone.append(tag)  # acked, rejected or restored
            elif now - self._released[tag] >= ORPHAN_GRACE_S:
                orphans.append(tag)
        for tag in orphans:
            channel.qos.restore_by_tag(tag, client=client, leftmost=True)
        if gone or orphans:
            client.srem(owned, *gone, *orphans)
            for tag in gone + orphans:
                del self._released[tag]
        if orphans:
            self.reclaimed += len(orphans)
            logger.warning(
                "celery_ext: restored %d message(s) this worker no longer held "
                "(e.g. after a lost broker connection)",
                len(orphans),
            )

    def _recover(self, client: Any, channel: Any, me: str) -> None:
        head = self._lease_key("owned", "")
        mine = self._lease_key("owned", me)
        for raw in client.scan_iter(match=f"{head}*", count=200):
            key = _text(raw)
            identity = key[len(head) :]
            if identity == me or client.exists(self._lease_key("alive", identity)):
                continue
            # Take the set over in one transaction: one survivor gets it, and the
            # tags stay owned (by us) until restored, so our own death in between
            # leaves them to the next survivor.
            pipe = client.pipeline()
            pipe.smembers(key)
            pipe.sunionstore(mine, [mine, key])
            pipe.delete(key)
            members, _, taken = pipe.execute()
            if not taken:
                continue  # another survivor took it
            tags = [_text(t) for t in members]
            for tag in tags:
                channel.qos.restore_by_tag(tag, client=client, leftmost=True)
            if tags:
                client.srem(mine, *tags)
            self.recovered += len(tags)
            logger.warning(
                "celery_ext: worker %s stopped renewing its leases; restored %d message(s)",
                identity,
                len(tags),
            )

    def stop(self, c: Any) -> None:
        """Keep renewing: in-flight work still runs during a warm shutdown's drain."""

    def shutdown(self, c: Any) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._received.set()  # wake it
        thread.join(2.0)
        try:
            self._hand_back(c)
        except Exception:  # the broker is gone: the alive key expires, survivors recover
            logger.debug("celery_ext: could not hand back or remove lease keys", exc_info=True)

    def _hand_back(self, c: Any) -> None:
        """Restore what this exiting worker owns and will not ack; drop its keys if none is left.

        Normally nothing: a drain acked or handed back everything. Not so after
        a lost connection (Celery forgot what it had reserved) or an
        unrecoverable error. Tags still held (a task running on) stay owned, and
        the alive key is left to expire, so survivors recover them if they are
        never acked.
        """
        client, channel = self._client, self._channel
        owned = self._lease_key("owned", self.identity)
        held = _held_tags(c)
        members = set(map(_text, client.smembers(owned)))
        for tag in sorted(members - held):
            channel.qos.restore_by_tag(tag, client=client, leftmost=True)
            client.srem(owned, tag)
        if not members & held:
            client.delete(owned, self._lease_key("alive", self.identity))

    @property
    def enabled_here(self) -> bool:
        """Whether this worker renews leases (Redis, ``leases`` on)."""
        return self._thread is not None

    def section(self) -> dict[str, Any]:
        """Its part of the ``celery_ext`` section of ``inspect stats`` (see :mod:`.metrics`)."""
        return {
            "lease_interval_s": self.interval_s,
            "dead_worker_after_s": self.dead_after_s,
            "renewals": self.renewals,
            "recovered": self.recovered,
            "reclaimed": self.reclaimed,
            "errors": self.errors,
        }
