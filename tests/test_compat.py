"""The private names of Celery, kombu and billiard that celery_ext relies on, checked loudly.

celery_ext overrides or reads these (README "How it works"; issue 16 lists them). A
Celery or kombu release that renames, removes or re-signs one fails here, by name,
instead of degrading a feature silently. The pins (``celery_ext/_versions.py``) keep
untested releases out; this is what to run first when moving them.
"""

from __future__ import annotations

import inspect
from typing import Any

import billiard.pool
import celery._state
import celery.app.task
import celery.worker.consumer.consumer
import celery.worker.request
import kombu.transport.redis
import kombu.transport.virtual
import pytest
from celery import Celery
from kombu.transport import pyamqp

# (owner, name, the parameters celery_ext's override or call passes, or None to only
#  require the name). Parameters are checked by name, in order, after ``self``.
METHODS: list[tuple[Any, str, tuple[str, ...] | None]] = [
    # redis_delivery: records deliveries as they are popped, and leases.
    (kombu.transport.redis.Channel, "_brpop_start", ("timeout",)),
    (kombu.transport.redis.Channel, "_brpop_read", None),
    (kombu.transport.redis.Channel, "_q_for_pri", ("queue", "pri")),
    (kombu.transport.redis.Channel, "_get_message_priority", ("message", "reverse")),
    (kombu.transport.redis.Channel, "_do_restore_message", None),
    (kombu.transport.redis.Channel, "_put", ("queue", "message")),
    (kombu.transport.virtual.QoS, "append", ("message", "delivery_tag")),
    # local lane transport and bounded publishes.
    (kombu.transport.virtual.Channel, "_put", ("queue", "message")),
    (kombu.transport.virtual.Channel, "_get", ("queue", "timeout")),
    (pyamqp.Channel, "_basic_publish", None),
    # backpressure: replaced per consumer, so a pool thread never sends basic.qos.
    (
        celery.worker.consumer.consumer.Consumer,
        "_restore_prefetch_count_after_connection_restart",
        None,
    ),
    # bounds.enqueue_many: builds messages as apply_async does.
    (celery.app.task.Task, "_get_exec_options", ()),
    (celery.app.task.Task, "_get_app", ()),
    (celery._state, "_set_task_join_will_block", None),
]


@pytest.mark.parametrize(
    ("owner", "name", "params"),
    METHODS,
    ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in METHODS],
)
def test_each_private_method_celery_ext_relies_on_is_there(
    owner: Any, name: str, params: tuple[str, ...] | None
) -> None:
    found = getattr(owner, name, None)
    assert callable(found), f"{owner!r} has no {name}: celery_ext's override or call breaks"
    if params is None:
        return
    signature = list(inspect.signature(found).parameters)
    if signature and signature[0] == "self":
        signature = signature[1:]
    assert signature[: len(params)] == list(params), (
        f"{owner.__name__}.{name}{tuple(signature)} no longer starts with {params}"
    )


def test_private_attributes_celery_ext_reads_are_there() -> None:
    request = inspect.getsource(celery.worker.request.Request.__init__)
    assert "self._message = message" in request, "Request._message (leases, drain) is gone"
    init = inspect.getsource(celery.worker.consumer.consumer.Consumer.__init__)
    assert "_maximum_prefetch_restored" in init, "Consumer._maximum_prefetch_restored is gone"
    assert "_cache" in inspect.getsource(billiard.pool.Pool.__init__), "billiard Pool._cache"


def test_settings_enqueue_many_reads_are_there() -> None:
    app = Celery("compat", broker="memory://", set_as_current=False)
    # bounds._Plan reads it once per batch; Celery 5.6 has no such setting.
    assert isinstance(app.conf.task_repr_maxlevels, int)
    for name in ("create_task_message", "send_task_message", "producer_pool"):
        assert hasattr(app.amqp, name), f"app.amqp.{name}"
