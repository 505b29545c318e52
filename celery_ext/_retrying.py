"""Worker side of retry policies: republish with back-off, or dead-letter and give up.

A task with a policy (``@celery_ext.retry`` or ``@app.task(retry=RetryPolicy(...))``)
gets its ``run`` wrapped when it is bound. When the body raises, the policy
decides; a retry publishes the next attempt (the attempt history travels in
the ``celery_ext_retry`` header, so a producer with celery_ext parks its wait on
the broker) and then raises Celery's ``Retry``, so the worker acks the current
message only after the next one is safely queued. Manual ``self.retry()`` with
no explicit countdown/eta uses the same policy.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, NoReturn

from celery import Task, current_task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded
from celery.worker import state as worker_state

from . import _compat
from ._settings import settings_of
from .deadletter import DeadLetters, new_entry
from .delays import RETRY_HEADER
from .errors import ConfigurationError, RetryScheduled
from .metrics import DEAD_LETTERED, CountingRequest, counters_of
from .retry_policy import RetryPolicy, RetryState, now_iso
from .shutdown import interrupted_by_drain
from .signals import retries_exhausted

__all__ = ["RetryingRequest", "apply_retry_policy", "attach", "policy_of"]

logger = logging.getLogger(__name__)

_POLICY = "celery_ext_retry_policy"
_KEEP_ATTEMPTS = 50  # the header keeps the first and the latest ones
_ERROR_CHARS = 500


def policy_of(task: Any) -> RetryPolicy | None:
    """The retry policy attached to ``task``, or None.

    Example::

        policy_of(app.tasks["shop.send_email"]).stop
    """
    policy = getattr(task, _POLICY, None)
    return policy if isinstance(policy, RetryPolicy) else None


def apply_retry_policy(task: Any) -> None:
    """Attach the policy of ``@celery_ext.retry`` or ``@app.task(retry=...)`` to ``task``.

    ``@app.task(retry=policy)`` lands on the task class as ``retry`` and hides
    ``Task.retry()``; it is moved aside here so ``self.retry()`` works again.

    Example::

        apply_retry_policy(app.tasks["shop.send_email"])
    """
    cls = task if isinstance(task, type) else type(task)
    policy = cls.__dict__.get("retry")
    if isinstance(policy, RetryPolicy):
        delattr(cls, "retry")
    else:
        run = cls.__dict__.get("run")
        run = run.__func__ if isinstance(run, staticmethod) else run
        policy = getattr(run, "__celery_ext_retry_policy__", None)
    if policy is None or not isinstance(policy, RetryPolicy):
        if policy is not None:
            raise ConfigurationError(
                f"task {getattr(cls, 'name', cls)!r}: retry={policy!r}: expected a RetryPolicy"
            )
        return
    if policy_of(cls) is policy:
        return
    policy.check(f"task {getattr(cls, 'name', cls.__name__)!r}")
    attach(cls, policy)


def attach(task: Any, policy: RetryPolicy) -> None:
    """Give ``task`` (class or instance) ``policy``: wrap its body and its ``retry()``.

    Example::

        attach(app.tasks["shop.ping"], RetryPolicy(stop=attempts(3)))
    """
    cls: Any = task if isinstance(task, type) else type(task)
    setattr(cls, _POLICY, policy)
    cls.max_retries = None  # the policy's stop decides, not Celery's default of 3
    if cls.Request in _OURS:  # a custom Request class stays
        cls.Request = "celery_ext._retrying:RetryingRequest"
    current = cls.__dict__.get("run")
    current = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(current, "__celery_ext_retrying__", False):
        return
    raw = next(k.__dict__["run"] for k in cls.__mro__ if "run" in k.__dict__)
    static = isinstance(raw, staticmethod)
    fun = raw.__func__ if static else raw

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fun(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            if interrupted_by_drain(exc):
                raise  # handed back to the broker as it was: not an attempt
            running = current_task
            if running is None or getattr(running, _POLICY, None) is not policy:
                raise  # called directly, outside a worker
            _handle(running, policy, exc, manual=False)

    run.__celery_ext_retrying__ = True  # type: ignore[attr-defined]
    cls.run = staticmethod(run) if static else run

    def retry(
        self: Any, args: Any = None, kwargs: Any = None, exc: Any = None, *a: Any, **kw: Any
    ) -> Any:
        explicit = (
            a
            or args is not None
            or kwargs is not None
            or any(kw.get(k) is not None for k in ("eta", "countdown", "max_retries"))
        )
        request = self.request
        if explicit or request.called_directly or exc is None:
            return Task.retry(self, args, kwargs, exc, *a, **kw)
        _handle(self, policy, exc, manual=True)

    cls.retry = retry


def _plan(
    policy: RetryPolicy, request: Any, exc: BaseException, manual: bool, started: float | None
) -> tuple[str, float, str, float, list[dict[str, Any]]]:
    """The policy's decision for ``request`` failing with ``exc``, and the new history."""
    history = dict(getattr(request, RETRY_HEADER, None) or {})
    first = float(history.get("first") or (started if started is not None else time.time()))
    attempts = list(history.get("attempts") or [])
    attempts.append({"at": now_iso(), "error": _describe(exc)})
    state = RetryState(
        attempt=len(attempts),
        elapsed_s=max(0.0, time.time() - first),
        previous_s=float(history.get("last_wait") or 0.0),
        exception=exc,
    )
    # self.retry() asked for a retry: `on` and `when` do not apply.
    kind, wait_s, reason = policy.decide(exc, state, filtered=not manual)
    return kind, wait_s, reason, first, attempts


def _republish(
    task: Any, request: Any, wait_s: float, first: float, attempts: list[dict[str, Any]]
) -> None:
    """Publish the next attempt of ``request`` (a task Context) in ``wait_s`` seconds."""
    if len(attempts) > _KEEP_ATTEMPTS:
        attempts = attempts[:1] + attempts[-(_KEEP_ATTEMPTS - 1) :]
    headers = dict(request.headers or {})
    headers[RETRY_HEADER] = {"first": first, "attempts": attempts, "last_wait": wait_s}
    signature = task.signature_from_request(
        request, countdown=wait_s, retries=(request.retries or 0) + 1, headers=headers
    )
    try:
        signature.apply_async()
    except Exception as publish_error:
        logger.error(
            "celery_ext: could not publish attempt %d of %s[%s]: %r",
            len(attempts) + 1,
            task.name,
            request.id,
            publish_error,
        )
        raise


def _scheduled(exc: BaseException, attempts: list[dict[str, Any]], wait_s: float) -> RetryScheduled:
    scheduled = RetryScheduled(f"{_describe(exc)}; attempt {len(attempts) + 1} in {wait_s:.3g}s")
    scheduled.__cause__ = exc
    return scheduled


def _handle(task: Any, policy: RetryPolicy, exc: BaseException, manual: bool) -> NoReturn:
    request = task.request
    if request.called_directly or request.is_eager:
        raise exc
    kind, wait_s, reason, first, attempts = _plan(
        policy, request, exc, manual, _started_wall(request)
    )
    if kind == "raise":
        raise exc
    if kind == "giveup":
        _dead_letter(task, request, exc, attempts, reason)
        raise exc
    try:
        _republish(task, request, wait_s, first, attempts)
    except Exception as publish_error:
        if task.acks_late:
            raise Reject(publish_error, requeue=True) from exc  # run it again, never lose it
        raise exc from publish_error
    scheduled = _scheduled(exc, attempts, wait_s)
    raise Retry(message=str(scheduled), exc=scheduled, when=wait_s)


_OURS = ("celery.worker.request:Request", "celery_ext.metrics:CountingRequest")


class RetryingRequest(CountingRequest):
    """Celery's worker Request, plus: a hard time limit follows the task's retry policy.

    The task body cannot catch a hard limit (its thread or process is gone), so
    the worker's timeout handler decides: retry (publish the next attempt, ack,
    send task-retried) or give up (dead-letter, then Celery's usual failure).
    ``install(app)`` sets it as ``Task.Request`` of tasks with a policy.

    Example::

        app.tasks["shop.export"].Request   # 'celery_ext._retrying:RetryingRequest'
    """

    _hard_limit_decided: bool | None = None  # None: not yet; True: retried

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        # prefork reports a hard limit here first (then calls on_timeout).
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, TimeLimitExceeded) and self._retry_hard_limit(exc):
            return None
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft and self._retry_hard_limit(TimeLimitExceeded(timeout)):
            return None
        return super().on_timeout(soft, timeout)

    def _retry_hard_limit(self, exc: TimeLimitExceeded) -> bool:
        """Decide once per run: True when the next attempt was published."""
        if self._hard_limit_decided is not None:
            return self._hard_limit_decided
        self._hard_limit_decided = False
        policy = policy_of(self.task)
        if policy is None or worker_state.should_terminate:
            return False
        limit = float(exc.args[0]) if exc.args and isinstance(exc.args[0], (int, float)) else 0.0
        context = _compat.request_context(self)
        kind, wait_s, reason, first, attempts = _plan(
            policy, context, exc, False, time.time() - limit
        )
        if kind == "giveup":
            _dead_letter(self.task, context, exc, attempts, reason)
        if kind != "retry":
            return False
        try:
            _republish(self.task, context, wait_s, first, attempts)
        except Exception:
            if not self.task.acks_late:
                return False  # fails as usual: the message is gone already
            # The broker refused the next attempt (say, it is down): never turn that
            # into a failure that acks the message. It goes back and runs again.
            self._hard_limit_decided = True
            worker_state.task_ready(self)
            self.reject(requeue=True)
            return True
        self._hard_limit_decided = True
        counters = counters_of(self.app)
        counters.add("hard_timeouts")
        counters.add("retried")
        logger.warning(
            "celery_ext: %s[%s] passed its hard time limit (%gs); retrying in %.3gs",
            self.name,
            self.id,
            limit,
            wait_s,
        )
        worker_state.task_ready(self)
        scheduled = _scheduled(exc, attempts, wait_s)
        self.task.backend.mark_as_retry(self.id, scheduled, request=context)
        self.send_event("task-retried", exception=repr(scheduled), traceback="")
        if self.task.acks_late:
            self.acknowledge()
        return True


def _started_wall(request: Any) -> float | None:
    started = getattr(request, "celery_ext_started", None)  # set by before_start (timeouts)
    if started is None:
        return None
    return time.time() - (time.monotonic() - float(started))


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


def _dead_letter(
    task: Any, request: Any, exc: BaseException, attempts: list[dict[str, Any]], reason: str
) -> None:
    delivery = request.delivery_info or {}
    headers = {k: v for k, v in (request.headers or {}).items() if k != RETRY_HEADER}
    entry = new_entry(
        request.id,
        task.name,
        delivery.get("routing_key") or "",
        headers,
        reason,
        exc,
        attempts=attempts,
        hostname=request.hostname,
    )
    entry.update(args=list(request.args or ()), kwargs=dict(request.kwargs or {}))
    setattr(exc, DEAD_LETTERED, True)  # the worker's main process counts it
    try:
        DeadLetters(task.app).push(entry)
    except Exception as store_error:
        logger.error(
            "celery_ext: could not dead-letter %s[%s]: %r; entry: %r",
            task.name,
            request.id,
            store_error,
            entry,
        )
        if task.acks_late:
            raise Reject(store_error, requeue=True) from exc
    logger.warning(
        "celery_ext: %s[%s] gave up after %d attempt(s) (%s): %s; dead-lettered",
        task.name,
        request.id,
        len(attempts),
        reason,
        _describe(exc),
    )
    if hasattr(exc, "add_note"):  # Python 3.11+: on the failure's traceback, in Flower too
        exc.add_note(
            f"celery_ext: dead-lettered after {len(attempts)} attempt(s) ({reason}); "
            f"entry in {settings_of(task.app).dead_letter_queue}"
        )
    try:  # Flower and `celery events` see why the task ended (its state stays FAILURE)
        task.send_event(
            "task-dead-lettered",
            retry=False,
            reason=reason,
            attempts=len(attempts),
            queue=settings_of(task.app).dead_letter_queue,
        )
    except Exception:
        logger.debug("celery_ext: could not send the dead-lettered event", exc_info=True)
    try:
        retries_exhausted.send(
            sender=task, task_id=request.id, exception=exc, attempts=attempts, reason=reason
        )
    except Exception:  # a receiver must not change the task's outcome
        logger.exception("celery_ext: a retries_exhausted receiver failed")
