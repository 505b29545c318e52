"""CI: what a new user does, on a fresh clone in fresh venvs, without the dev extras.

1. ``make demo`` (the README's first command) in a fresh clone: it must listen,
   answer ``POST /emails`` with 202, and on Ctrl-C print its drain line; ``celery
   --help`` in that venv must load the ``ext`` plugin.
2. The built wheel (with its LICENSE) installed alone in a fresh venv runs a task on
   ``local://`` and publishes through the bounded transport on ``amqp://``; with
   the ``redis`` extra, on ``redis://``.

Standard library only: it runs before anything is installed. Usage: ``python3
.ci/fresh_install.py`` from the repository (``.ci/run`` does it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_S = 300.0  # a fresh venv installs celery, flower, ... first

# Run in the fresh venvs: the installed package, not the clone, is what is imported.
SMOKE = r"""
import sys, uuid
from celery import Celery
import celery_ext

url = sys.argv[1]
queue = f"celery_ext.fresh.{uuid.uuid4().hex[:8]}"
app = Celery("fresh", broker=url, set_as_current=False)
app.conf.update(task_default_queue=queue, result_backend="cache+memory://")
celery_ext.install(app, queue_limits={queue: 10})

@app.task(name="fresh.add")
def add(x, y):
    return x + y

if url.startswith("local://"):
    with celery_ext.LocalWorker(app) as worker:
        assert add.delay(2, 3).get(timeout=10) == 5
else:  # publish through celery_ext's bounded transport, read the message back
    add.delay(2, 3)
    with app.connection_for_write() as conn:
        assert type(conn.transport).__module__.startswith("celery_ext."), conn.transport
        channel = conn.default_channel
        message = None
        for _ in range(50):
            message = channel.basic_get(queue, no_ack=True)
            if message is not None:
                break
            import time; time.sleep(0.1)
        assert message is not None and message.headers["task"] == "fresh.add", message
        channel.queue_delete(queue)
        if url.startswith("amqp"):
            channel.exchange_delete(queue)
print("ok", url)
"""


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        sys.exit(f"FAILED: {' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def demo(clone: Path) -> None:
    """``make demo`` in a fresh clone: listening, a 202, the drain line at Ctrl-C."""
    proc = subprocess.Popen(
        ["make", "demo", "ARGS=--port 0"],
        cwd=clone,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C goes to the whole group, as in a terminal
        # A CI job started in the background inherits SIGINT ignored; a terminal has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: list[str] = []
    listening = threading.Event()
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.append(line)
            if "listening on" in line:
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        if not listening.wait(START_S):
            sys.exit(f"FAILED: make demo did not listen within {START_S}s:\n{''.join(lines)}")
        print(f"make demo: listening after {time.monotonic() - started:.0f} s (fresh venv)")
        url = next(m.group(1) for ln in lines if (m := re.search(r"listening on (\S+)", ln)))
        body = json.dumps({"to": "a@example.com", "subject": "hi"}).encode()
        request = urllib.request.Request(url + "/emails", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 202:
                sys.exit(f"FAILED: POST /emails answered {response.status}, not 202")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        reader.join(10)
    output = "".join(lines)
    if "drained:" not in output:
        sys.exit(f"FAILED: no drain line after Ctrl-C:\n{output}")
    if "Traceback" in output:
        sys.exit(f"FAILED: make demo printed a traceback:\n{output}")
    help_text = run(clone / ".venv/bin/celery", "--help")
    if "could not load" in help_text or "ext" not in help_text:
        sys.exit(f"FAILED: celery --help does not load the ext plugin:\n{help_text}")
    print("make demo: 202, drain line at Ctrl-C; celery --help loads `ext`")


def wheel(clone: Path, tmp: Path) -> None:
    """The wheel alone on local:// and amqp://; with the redis extra on redis://."""
    dist = tmp / "dist"
    run(clone / ".venv/bin/python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, clone)
    (built,) = dist.glob("celery_ext-*.whl")
    with zipfile.ZipFile(built) as zf:
        if not any(n.endswith(".dist-info/licenses/LICENSE") for n in zf.namelist()):
            sys.exit(f"FAILED: {built.name} has no LICENSE")
    smoke = tmp / "smoke.py"
    smoke.write_text(SMOKE)
    for name, requirement, urls in [
        ("plain", str(built), ["local://", "amqp://guest:guest@127.0.0.1:5672//"]),
        ("redis", f"celery_ext[redis] @ {built.as_uri()}", ["redis://127.0.0.1:6379/11"]),
    ]:
        venv = tmp / f"venv-{name}"
        run(sys.executable, "-m", "venv", venv)
        run(venv / "bin/python", "-m", "pip", "install", "-q", requirement)
        for url in urls:
            print(run(venv / "bin/python", smoke, url).strip().splitlines()[-1])
    print(f"wheel {built.name}: LICENSE inside; runs alone and with [redis]")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="celery_ext_fresh_") as name:
        tmp = Path(name)
        clone = tmp / "clone"
        run("git", "clone", "-q", REPO, clone)
        demo(clone)
        wheel(clone, tmp)


if __name__ == "__main__":
    main()
