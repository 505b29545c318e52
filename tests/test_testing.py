"""The pytest plugin's fixtures, used the way a celery_ext user would use them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_ext import LocalWorker
from celery_ext.lane import lane_of


@pytest.fixture
def celery_ext_config() -> dict[str, Any]:
    return {"celery_ext_lane_max_queued": 50}


def test_app_is_on_the_local_lane_with_the_users_config(celery_ext_app: Celery) -> None:
    assert celery_ext_app.conf.broker_url == "local://"
    assert lane_of(celery_ext_app).max_queued == 50


def test_tasks_defined_after_the_worker_started_run(
    celery_ext_app: Celery, celery_ext_worker: LocalWorker, celery_ext_join: Callable[..., None]
) -> None:
    results: list[int] = []

    @celery_ext_app.task(shared=False)
    def add(x: int, y: int) -> None:
        results.append(x + y)

    for i in range(10):
        add.delay(i, 1)
    celery_ext_join(timeout=10)
    assert sorted(results) == list(range(1, 11))


def test_join_fail_fast_reraises_the_task_exception(
    celery_ext_app: Celery, celery_ext_worker: LocalWorker, celery_ext_join: Callable[..., None]
) -> None:
    @celery_ext_app.task(shared=False)
    def divide(x: int) -> float:
        return 1 / x

    divide.delay(1)
    divide.delay(0)
    with pytest.raises(ZeroDivisionError):
        celery_ext_join(timeout=10)


def test_plugin_is_registered_through_its_entry_point(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.has_plugin("celery_ext")
