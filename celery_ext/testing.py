"""pytest plugin shipped with celery_ext (loaded through the ``pytest11`` entry point).

Fixtures for testing Celery tasks on the local lane with a real, embedded
worker: no broker server, no eager mode, every bootstep running.

- ``celery_ext_config``: dict of extra ``app.conf`` settings (override it).
- ``celery_ext_app``: a fresh app on ``local://`` with ``celery_ext.install``
  done. It also applies the classic ``celery_config`` / ``celery_parameters``
  fixtures of ``celery.contrib.pytest`` (re-exported by pytest-celery) when
  they exist, with the broker forced to the local lane.
- ``celery_ext_worker_options``: dict of :class:`~celery_ext.LocalWorker` options.
- ``celery_ext_worker``: a started :class:`~celery_ext.LocalWorker`; tasks may be
  defined before or after it starts.
- ``celery_ext_join``: ``join(queue=None, timeout=10.0, fail_fast=True)``, waits
  until the lane is empty and re-raises the first task failure.

Example::

    def test_add(celery_ext_app, celery_ext_worker, celery_ext_join):
        seen = []

        @celery_ext_app.task
        def add(x, y):
            seen.append(x + y)

        add.delay(2, 2)
        celery_ext_join(timeout=5)
        assert seen == [4]
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from . import install
from .embedded import LocalWorker

__all__ = [
    "celery_ext_app",
    "celery_ext_config",
    "celery_ext_join",
    "celery_ext_worker",
    "celery_ext_worker_options",
]


def _optional_fixture(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    try:
        value = request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return {}
    return dict(value or {})


@pytest.fixture
def celery_ext_config() -> dict[str, Any]:
    """Extra ``app.conf`` settings for :func:`celery_ext_app` (override in your conftest).

    Example::

        @pytest.fixture
        def celery_ext_config():
            return {"celery_ext_lane_max_queued": 10}
    """
    return {}


@pytest.fixture
def celery_ext_app(
    request: pytest.FixtureRequest, celery_ext_config: dict[str, Any]
) -> Iterator[Celery]:
    """A new app on the local lane with celery_ext installed.

    Example::

        def test_it(celery_ext_app):
            assert celery_ext_app.conf.broker_url == "local://"
    """
    config = _optional_fixture(request, "celery_config")
    config.update(celery_ext_config)
    config["broker_url"] = "local://"
    config.setdefault("result_backend", "cache+memory://")
    params = _optional_fixture(request, "celery_parameters")
    params.setdefault("set_as_current", False)
    app = Celery(f"celery_ext_test_{uuid.uuid4().hex[:8]}", **params)
    app.conf.update(config)
    install(app)
    yield app
    app.close()


@pytest.fixture
def celery_ext_worker_options() -> dict[str, Any]:
    """Options for :func:`celery_ext_worker` (``concurrency``, ``pool``, ...).

    Example::

        @pytest.fixture
        def celery_ext_worker_options():
            return {"concurrency": 1, "pool": "solo"}
    """
    return {"concurrency": 4}


@pytest.fixture
def celery_ext_worker(
    celery_ext_app: Celery, celery_ext_worker_options: dict[str, Any]
) -> Iterator[LocalWorker]:
    """A started embedded worker for :func:`celery_ext_app`, stopped after the test.

    Example::

        def test_it(celery_ext_worker):
            assert celery_ext_worker.consumed_queues() == ["celery"]
    """
    worker = LocalWorker(celery_ext_app, **celery_ext_worker_options).start()
    try:
        yield worker
    finally:
        worker.stop(timeout=5)


@pytest.fixture
def celery_ext_join(celery_ext_worker: LocalWorker) -> Callable[..., None]:
    """``join(queue=None, timeout=10.0, fail_fast=True)`` for :func:`celery_ext_worker`.

    Example::

        def test_fails(celery_ext_app, celery_ext_join):
            ...
            with pytest.raises(ZeroDivisionError):
                celery_ext_join()
    """
    return celery_ext_worker.join
