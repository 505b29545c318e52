"""The private names of Celery, kombu and billiard that celery_ext relies on, checked loudly.

celery_ext uses them only through ``celery_ext/_compat.py`` (:data:`REQUIRED` there). A
Celery or kombu release that renames, removes or re-signs one fails here, by name,
instead of degrading a feature silently. The pins (``celery_ext/_versions.py``) keep
untested releases out; this is what to run first when moving them.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from celery import Celery
from kombu.utils.imports import symbol_by_name

from celery_ext import _compat
from tests._private_names import touches


def _owner(required: _compat.Required) -> Any:
    owner = required.owner  # "module:Class" for an owner imported only on use
    return symbol_by_name(owner) if isinstance(owner, str) else owner


def _label(required: _compat.Required) -> str:
    owner = required.owner
    if isinstance(owner, str):
        return owner.rsplit(":", 1)[-1] + "." + required.name
    return f"{getattr(owner, '__qualname__', owner.__name__)}.{required.name}"


@pytest.mark.parametrize("required", _compat.REQUIRED, ids=map(_label, _compat.REQUIRED))
def test_each_private_name_celery_ext_uses_is_there(required: _compat.Required) -> None:
    owner, name = _owner(required), required.name
    if required.how != "defined":
        source = inspect.getsource(owner)
        expected = f"self.{name} =" if required.how == "set" else f".{name}("
        assert expected in source, (
            f"{_label(required)} is no longer {required.how}: celery_ext/_compat.py uses it"
        )
        return
    assert hasattr(owner, name), f"{_label(required)} is gone: celery_ext/_compat.py uses it"
    found = getattr(owner, name)
    if required.params is None:
        return
    if isinstance(found, property):
        found = found.fget
    signature = list(inspect.signature(found).parameters)
    if signature and signature[0] == "self":
        signature = signature[1:]
    assert signature[: len(required.params)] == list(required.params), (
        f"{_label(required)}{tuple(signature)} no longer starts with {required.params}"
    )


def test_only_the_compat_module_touches_private_names() -> None:
    found = touches()
    assert not found, (
        "private Celery/kombu/billiard names outside celery_ext/_compat.py "
        "(go through _compat, with a note):\n" + "\n".join(map(str, found))
    )


def test_settings_enqueue_many_reads_are_there() -> None:
    app = Celery("compat", broker="memory://", set_as_current=False)
    # bounds._Plan reads it once per batch; Celery 5.6 has no such setting.
    assert isinstance(app.conf.task_repr_maxlevels, int)
    for name in ("create_task_message", "send_task_message", "producer_pool"):
        assert hasattr(app.amqp, name), f"app.amqp.{name}"
