"""pytest plugin: ``celery_ext.install(app)`` on the apps of Celery's own integration suite.

Loaded by ``celery_suite.py`` with ``-p dropin_plugin``; no file of Celery's is edited.
It installs on:

- the values of the ``celery_session_app`` and ``celery_app`` fixtures of
  ``celery.contrib.pytest`` (the suite's session worker app and each test's app), right
  after the fixture builds them, before any task module is imported or worker built;
- any app an embedded worker starts on (``celery.contrib.testing.worker.start_worker``
  sends ``test_worker_starting`` before it builds the worker).

Apps a test builds itself with ``Celery(...)`` and uses without a worker are left
stock. After ``celery_session_worker`` is up, the plugin checks that the worker runs
celery_ext's bootsteps and that ``inspect stats`` over the broker carries the
``celery_ext`` rows; it stops the session if not, since a comparison would be
meaningless. With ``CELERY_EXT_DROPIN_REPORT=PATH`` it writes what it did as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing import worker as testing_worker

import celery_ext

_APP_FIXTURES = frozenset({"celery_session_app", "celery_app"})
_report: dict[str, Any] = {"installed_apps": 0, "workers": []}


def _install(app: Celery) -> None:
    try:
        celery_ext.settings_of(app)
    except celery_ext.ConfigurationError:  # not installed yet
        _report["installed_apps"] += 1
        celery_ext.install(app)


def _on_worker_starting(sender: Celery, **kwargs: Any) -> None:
    _install(sender)


# A strong reference: the signal keeps weak ones by default.
testing_worker.test_worker_starting.connect(_on_worker_starting, weak=False)


def _steps(app: Celery, kind: str, blueprint: Any) -> dict[str, Any]:
    """celery_ext's steps of ``kind`` as install() added them, and which the worker built."""
    expected = sorted(s.name for s in app.steps[kind] if s.__module__.startswith("celery_ext"))
    built = {name: step for name, step in blueprint.steps.items() if name in expected}
    return {
        "expected": expected,
        "missing": sorted(set(expected) - set(built)),
        "enabled": sorted(name for name, step in built.items() if step.enabled),
    }


def _verify(worker: Any) -> dict[str, Any]:
    app = worker.app
    replies = app.control.inspect(destination=[worker.hostname], timeout=5).stats() or {}
    stats = replies.get(worker.hostname)
    found = {
        "hostname": worker.hostname,
        "broker_transport": str(app.conf.broker_transport),
        "worker_steps": _steps(app, "worker", worker.blueprint),
        "consumer_steps": _steps(app, "consumer", worker.consumer.blueprint),
        "stats_section": stats is not None and celery_ext.stats_section(stats) is not None,
    }
    _report["workers"].append(found)
    problems = [
        f"{kind} steps {found[kind]['missing']} not built"
        for kind in ("worker_steps", "consumer_steps")
        if found[kind]["missing"] or not found[kind]["expected"]
    ]
    if not found["stats_section"]:
        problems.append(f"no celery_ext rows in inspect stats (reply: {stats!r})")
    if problems:
        pytest.exit(f"celery_ext is not running in the session worker: {problems}", returncode=3)
    return found


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    value = yield
    if fixturedef.argname in _APP_FIXTURES:
        _install(value)
    elif fixturedef.argname == "celery_session_worker" and value is not None:
        _verify(value)
    return value


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("CELERY_EXT_DROPIN_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(_report, file, indent=2)


def pytest_report_header() -> str:
    return f"dropin_plugin: celery_ext {celery_ext.__version__} installed on the suite's apps"
