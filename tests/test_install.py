"""install(): idempotent, per app, nothing on import, a complete public API."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import celery
import kombu
import pytest
from celery import Celery
from kombu import Connection

import celery_ext
from celery_ext import ConfigurationError, LaneNotInstalled, LocalWorker, _versions
from celery_ext.lane import Lanes, lane_of
from celery_ext.transports.local import Transport


def test_install_is_idempotent() -> None:
    app = Celery("idem", broker="local://", set_as_current=False)
    first = celery_ext.install(app, lane_max_queued=5)
    steps = {name: set(app.steps[name]) for name in ("worker", "consumer")}
    options = {name: set(app.user_options[name]) for name in ("worker",)}
    lanes = Lanes.of(app)

    assert celery_ext.install(app) is first
    assert celery_ext.install(app, lane_max_queued=5) is first
    assert {name: set(app.steps[name]) for name in ("worker", "consumer")} == steps
    assert {name: set(app.user_options[name]) for name in ("worker",)} == options
    assert Lanes.of(app) is lanes


def test_second_install_with_other_settings_is_refused() -> None:
    app = Celery("idem2", broker="local://", set_as_current=False)
    celery_ext.install(app, lane_max_queued=5)
    with pytest.raises(ConfigurationError, match="already installed"):
        celery_ext.install(app, lane_max_queued=6)


def test_nothing_happens_on_import() -> None:
    code = (
        "import kombu.transport as t, celery_ext\n"
        "from celery import Celery\n"
        "assert 'local' not in t.TRANSPORT_ALIASES\n"
        "app = Celery('x', broker='local://')\n"
        "assert not app.steps['worker'], app.steps\n"
        "celery_ext.install(app)\n"
        "assert 'local' in t.TRANSPORT_ALIASES\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_local_url_without_install_says_what_to_do() -> None:
    with pytest.raises(LaneNotInstalled, match=r"celery_ext.install\(app\)"):
        Connection("local://", transport=Transport).connect()


def test_printing_a_local_url_needs_no_lane() -> None:
    # Celery masks broker URLs in `inspect conf` (Flower's Config tab) this way.
    assert Connection("local://", transport=Transport).as_uri(mask="**")  # no LaneNotInstalled
    app = Celery("conf_probe", broker="local://", set_as_current=False)
    celery_ext.install(app)
    with LocalWorker(app) as worker:
        reply = app.control.inspect(destination=[worker.hostname], timeout=5).conf()
    assert reply[worker.hostname]["broker_url"].startswith("local://")


def test_two_apps_in_one_process_never_share_a_lane() -> None:
    a = Celery("iso_a", broker="local://", set_as_current=False)
    b = Celery("iso_b", broker="local://", set_as_current=False)
    celery_ext.install(a)
    celery_ext.install(b)
    ran: dict[str, list[int]] = {"a": [], "b": []}

    @a.task(name="shared.name", shared=False)
    def task_a(i: int) -> None:
        ran["a"].append(i)

    @b.task(name="shared.name", shared=False)
    def task_b(i: int) -> None:
        ran["b"].append(i)

    for i in range(5):
        task_a.delay(i)
    assert lane_of(a).depth("celery") == 5
    assert lane_of(b).depth("celery") == 0

    with LocalWorker(b) as wb:
        task_b.delay(99)
        wb.join(timeout=10)
    assert ran == {"a": [], "b": [99]}
    with LocalWorker(a) as wa:
        wa.join(timeout=10)
    assert sorted(ran["a"]) == [0, 1, 2, 3, 4]


def test_public_names_are_exported() -> None:
    public = {n for n in dir(celery_ext) if not n.startswith("_")} - {"annotations", "typing"}
    modules = {n for n in public if type(getattr(celery_ext, n)).__name__ == "module"}
    assert set(celery_ext.__all__) == (public - modules) | {"__version__"}
    for name in celery_ext.__all__:
        assert getattr(celery_ext, name) is not None
        if name != "__version__":
            assert getattr(celery_ext, name).__doc__, f"{name} has no docstring"


def test_each_local_url_is_its_own_lane() -> None:
    app = Celery("urls", broker="local://", set_as_current=False)
    celery_ext.install(app)
    names = []
    for url in ("local://", "local://other", "local://other/vh", "local://other"):
        with app.connection_for_write(url) as conn:
            names.append(conn.transport.lane.name)
    assert names == ["", "other", "other/vh", "other"]
    lanes = Lanes.of(app)
    assert lanes.get("other") is not lanes.get("")


def test_install_adds_the_intake_step_and_hands_the_size_cap_to_the_transports(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from celery_ext.intake import Intake
    from celery_ext.sizes import LIMIT_OPTION

    caplog.set_level(logging.WARNING, logger="celery_ext.sizes")  # workers raise the root level
    app = Celery("uncapped", broker="local://", set_as_current=False)
    celery_ext.install(app)
    assert Intake in app.steps["consumer"]
    assert LIMIT_OPTION not in app.conf.broker_transport_options  # stock: no cap
    capped = Celery("capped", broker="redis://127.0.0.1:6379/11", set_as_current=False)
    celery_ext.install(capped, max_message_bytes=1000)
    assert capped.conf.broker_transport_options[LIMIT_OPTION] == 1000
    assert "max_message_bytes" not in caplog.text
    custom = Celery("custom", broker="redis://127.0.0.1:6379/11", set_as_current=False)
    custom.conf.broker_transport = "kombu.transport.redis:Transport"
    celery_ext.install(custom, max_message_bytes=1000)
    assert "max_message_bytes is not checked when publishing" in caplog.text


def test_install_warns_once_where_celery_or_kombu_is_outside_the_tested_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _versions.untested({"celery": celery.__version__, "kombu": kombu.__version__}) == []
    assert _versions.untested({"celery": "5.6.3", "kombu": "5.7.0"}) == ["celery 5.6.3"]
    odd = {"celery": "6.0.0rc1", "kombu": "x"}
    assert _versions.untested(odd) == ["celery 6.0.0rc1", "kombu x"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tested versions: no warning at all
        celery_ext.install(Celery("v_ok", broker="local://", set_as_current=False))
    monkeypatch.setattr(celery, "__version__", "5.6.3")
    with pytest.warns(RuntimeWarning, match=r"tested on celery 5\.7\.x.*has celery 5\.6\.3"):
        celery_ext.install(Celery("v_old", broker="local://", set_as_current=False))
