"""``celery ext ...``: celery_ext's sub-commands (entry point group ``celery.commands``).

Example::

    celery -A shop ext dlq list
    celery -A shop ext dlq show 3f2a...
    celery -A shop ext dlq replay 3f2a... 9b1c...     # or --all
    celery -A shop ext dlq purge --all
    celery -A shop ext status                         # one line per worker
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from .deadletter import DeadLetters
from .metrics import stats_section

__all__ = ["ext"]


def _app(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        raise click.UsageError("run it as `celery -A <your app> ext ...`")
    return app


@click.group(name="ext")
def ext() -> None:
    """celery_ext: dead letters and plugin state."""


@ext.group(name="dlq")
def dlq() -> None:
    """Tasks whose retries ran out, messages workers could not run (the dead-letter queue)."""


@dlq.command(name="list")
@click.pass_context
def dlq_list(ctx: click.Context) -> None:
    """One line per dead-lettered task, oldest first."""
    entries = DeadLetters(_app(ctx)).list()
    if not entries:
        click.echo("no dead-lettered tasks")
        return
    rows = [("ID", "TASK", "REASON", "ATTEMPTS", "DEAD AT", "LAST ERROR")]
    for e in entries:
        attempts = e.get("attempts") or []
        error = (e.get("exception") or {}).get("message") or e.get("reason", "")
        last = attempts[-1]["error"] if attempts else error
        rows.append(
            (
                str(e.get("id")),
                str(e.get("task")),
                str(e.get("reason")),
                str(len(attempts)),
                str(e.get("dead_at", ""))[:19],
                str(last)[:60],
            )
        )
    _table(rows)


def _figure(value: object) -> str:
    return "-" if value is None else str(value)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
        click.echo("  ".join(cells).rstrip())


@dlq.command(name="show")
@click.argument("task_id")
@click.pass_context
def dlq_show(ctx: click.Context, task_id: str) -> None:
    """The whole entry of one task, as JSON."""
    entry = DeadLetters(_app(ctx)).show(task_id)
    if entry is None:
        raise click.ClickException(f"no dead-lettered task {task_id}")
    click.echo(json.dumps(entry, indent=2, sort_keys=True))


def _ids(task_ids: tuple[str, ...], all_: bool) -> list[str] | None:
    if all_ == bool(task_ids):
        raise click.UsageError("give task ids, or --all")
    return None if all_ else list(task_ids)


@dlq.command(name="replay")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Replay every entry.")
@click.pass_context
def dlq_replay(ctx: click.Context, task_ids: tuple[str, ...], all_: bool) -> None:
    """Publish tasks again (same id, fresh attempt budget) and drop their entries."""
    replayed = DeadLetters(_app(ctx)).replay(_ids(task_ids, all_))
    for task_id in replayed:
        click.echo(f"replayed {task_id}")
    missing = set(task_ids) - set(replayed)
    if missing:
        raise click.ClickException(
            f"not replayed (no such entry, or no task call in it): {', '.join(sorted(missing))}"
        )


@dlq.command(name="purge")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Delete every entry.")
@click.pass_context
def dlq_purge(ctx: click.Context, task_ids: tuple[str, ...], all_: bool) -> None:
    """Delete entries for good (an unknown id is named and the exit status is 1)."""
    letters = DeadLetters(_app(ctx))
    ids = _ids(task_ids, all_)
    unknown = [task_id for task_id in ids or () if letters.show(task_id) is None]
    removed = letters.purge(ids)
    click.echo(f"purged {removed} entr{'y' if removed == 1 else 'ies'}")
    if unknown:
        raise click.ClickException(f"no dead-lettered task {', '.join(unknown)}")


@ext.command(name="status")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for replies.")
@click.option("--json", "as_json", is_flag=True, help="Each worker's celery_ext section as JSON.")
@click.pass_context
def status(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """One line per worker: held/limit, running, ETA, parked, outcomes, timeouts, drain, broker."""
    replies = _app(ctx).control.inspect(timeout=timeout).stats() or {}
    sections = {host: stats_section(stats) for host, stats in sorted(replies.items())}
    if as_json:
        click.echo(json.dumps(sections, indent=2, sort_keys=True, default=str))
        return
    if not sections:
        raise click.ClickException("no worker replied")
    rows = [
        (
            "WORKER",
            "HELD/LIMIT",
            "RUNNING",
            "ETA",
            "PARKED",
            "OK",
            "FAILED",
            "RETRIED",
            "DEAD",
            "TIMEOUTS S/H",
            "DRAIN",
            "BROKER",
        )
    ]
    for host, section in sections.items():
        if not section:
            rows.append((host, "-", "-", "-", "-", "-", "-", "-", "-", "-", "no celery_ext", "-"))
            continue
        tasks = section.get("tasks") or {}
        rows.append(
            (
                host,
                f"{section.get('held', '-')}/{section.get('prefetch_limit', '-')}",
                str(section.get("active", "-")),
                str(section.get("eta_held", "-")),
                _figure(section.get("parked_now")),
                str(tasks.get("succeeded", 0)),
                str(tasks.get("failed", 0)),
                str(tasks.get("retried", 0)),
                str(tasks.get("dead_lettered", 0)),
                f"{tasks.get('soft_timeouts', 0)}/{tasks.get('hard_timeouts', 0)}",
                str((section.get("drain") or {}).get("state", "-")),
                _setup(section.get("broker") or {}),
            )
        )
    _table(rows)


def _setup(broker: dict[str, Any]) -> str:
    """The broker setup in a few words: ``sentinel replica_acks=1``, ``amqp quorum``."""
    words = [str(broker.get("transport", "-"))]
    if broker.get("queue_type"):
        words.append(str(broker["queue_type"]))
    if broker.get("replica_acks"):
        words.append(f"replica_acks={broker['replica_acks']}")
    return " ".join(words)
