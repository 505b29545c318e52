"""Retry policies: composable back-off, attempt and time budgets, retry-after, dead letters.

A policy is three small parts:

- **wait** (seconds before the next attempt, floats throughout):
  :func:`exponential` (with ``full``, ``equal`` or ``decorrelated`` jitter, or
  none), :func:`fixed`, :func:`linear`; ``+`` adds two waits; any callable
  ``f(state) -> seconds`` works too;
- **stop** (when to give up): :func:`attempts` (total runs, the first
  included) and :func:`deadline` (seconds from the **first** attempt, carried
  in the message across republishes), combined with ``|`` (either) and ``&``
  (both); any callable ``f(state) -> bool`` works too;
- **filters**: ``on`` (exception types to retry), ``giveup_on`` (types never
  retried) and ``when`` (a predicate on the exception).

``raise celery_ext.RetryAfter(seconds)``, or an exception carrying an HTTP
response with status 429/503 and a ``Retry-After`` header (requests and httpx
shapes), sets the next wait; never beyond the deadline.

Mechanics: the next attempt is published (and parked on the broker, see
:mod:`celery_ext.delays`) *before* the current message is acked; if that
publish fails an ``acks_late`` message is requeued, so nothing is lost. When
retries run out the task goes to the dead-letter queue (:mod:`celery_ext.deadletter`)
with every attempt's time and error, :data:`celery_ext.signals.retries_exhausted`
fires, and the task fails with the last error.

Example::

    @app.task(acks_late=True)
    @celery_ext.retry(on=(ConnectionError,), attempts=6, deadline=600,
                      wait=celery_ext.exponential(base=0.5, cap=60, jitter="full"))
    def send_email(to, subject): ...
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from ._settings import seconds as check_seconds
from ._settings import task_label
from .errors import ConfigurationError, RetryAfter

__all__ = [
    "RetryPolicy",
    "RetryState",
    "Stop",
    "Wait",
    "attempts",
    "deadline",
    "exponential",
    "fixed",
    "linear",
    "retry",
    "retry_after_of",
]

Jitter = Literal["full", "equal", "decorrelated"] | None


@dataclass
class RetryState:
    """What a wait or stop strategy sees after a failed attempt.

    ``attempt`` counts the runs so far (1 after the first failure),
    ``elapsed_s`` the seconds since the first attempt started,
    ``previous_s`` the previous wait (0 before the first retry).

    Example::

        exponential(base=1)(RetryState(attempt=3))   # 4.0
    """

    attempt: int = 1
    elapsed_s: float = 0.0
    previous_s: float = 0.0
    exception: BaseException | None = None
    random: random.Random = field(default_factory=random.Random)


# -- waits ------------------------------------------------------------------------
class Wait:
    """Seconds to wait before the next attempt; ``+`` adds two waits.

    Example::

        (fixed(1) + exponential(base=0.5))(RetryState(attempt=2))   # 2.0
    """

    def __call__(self, state: RetryState) -> float:
        raise NotImplementedError

    def __add__(self, other: Wait | Callable[[RetryState], float]) -> Wait:
        return _Sum(self, as_wait(other))

    def __radd__(self, other: Wait | Callable[[RetryState], float]) -> Wait:
        return _Sum(as_wait(other), self)

    def check(self, where: str) -> None:
        """Raise ConfigurationError naming ``where`` when an argument is invalid."""


class _Sum(Wait):
    def __init__(self, a: Wait, b: Wait) -> None:
        self.a, self.b = a, b

    def __call__(self, state: RetryState) -> float:
        return self.a(state) + self.b(state)

    def check(self, where: str) -> None:
        self.a.check(where)
        self.b.check(where)

    def __repr__(self) -> str:
        return f"{self.a!r} + {self.b!r}"


class _Callable(Wait):
    def __init__(self, fn: Callable[[RetryState], float]) -> None:
        self.fn = fn

    def __call__(self, state: RetryState) -> float:
        return float(self.fn(state))

    def __repr__(self) -> str:
        return repr(self.fn)


def as_wait(value: Wait | Callable[[RetryState], float]) -> Wait:
    """A :class:`Wait` from a strategy or a plain callable ``f(state) -> seconds``."""
    if isinstance(value, Wait):
        return value
    if callable(value):
        return _Callable(value)
    raise ConfigurationError(f"wait={value!r}: expected a wait strategy or a callable")


def _seconds(where: str, name: str, value: object, allow_inf: bool = False) -> None:
    if isinstance(value, timedelta):  # the waits compute with it as a number
        raise ConfigurationError(f"{where}: {name}={value!r}: expected seconds (a number)")
    check_seconds(f"{where}: {name}", value, allow_inf=allow_inf)


@dataclass(frozen=True)
class _Exponential(Wait):
    base: float
    factor: float
    cap: float
    jitter: Jitter

    def __call__(self, state: RetryState) -> float:
        n = max(1, state.attempt)
        try:
            ceiling = min(self.cap, self.base * self.factor ** (n - 1))
        except OverflowError:
            ceiling = self.cap
        if self.jitter == "full":
            return state.random.uniform(0.0, ceiling)
        if self.jitter == "equal":
            return ceiling / 2 + state.random.uniform(0.0, ceiling / 2)
        if self.jitter == "decorrelated":
            upper = max(self.base, (state.previous_s or self.base) * 3)
            return min(self.cap, state.random.uniform(self.base, upper))
        return ceiling

    def check(self, where: str) -> None:
        _seconds(where, "base", self.base)
        _seconds(where, "cap", self.cap, allow_inf=True)
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
            raise ConfigurationError(f"{where}: factor={self.factor!r}: expected a number >= 1")
        if not self.factor >= 1 or math.isinf(self.factor):
            raise ConfigurationError(f"{where}: factor={self.factor!r}: expected a number >= 1")
        if self.cap < self.base:
            raise ConfigurationError(
                f"{where}: cap={self.cap!r} is smaller than base={self.base!r}"
            )
        if self.jitter not in (None, "full", "equal", "decorrelated"):
            raise ConfigurationError(
                f"{where}: jitter={self.jitter!r}: expected None, 'full', 'equal' or 'decorrelated'"
            )


def exponential(
    base: float = 1.0, factor: float = 2.0, cap: float = 300.0, jitter: Jitter = None
) -> Wait:
    """``base x factor**(attempt-1)`` seconds, at most ``cap``, with optional jitter.

    ``full``: uniform in [0, that]; ``equal``: half of it plus uniform in [0,
    half]; ``decorrelated``: uniform in [base, 3 x the previous wait], at most
    ``cap``. The factor may be fractional (1.5); nothing is rounded.

    Example::

        exponential(base=0.5, factor=1.5, cap=60, jitter="full")
    """
    return _Exponential(base, factor, cap, jitter)


@dataclass(frozen=True)
class _Fixed(Wait):
    seconds: float

    def __call__(self, state: RetryState) -> float:
        return float(self.seconds)

    def check(self, where: str) -> None:
        _seconds(where, "seconds", self.seconds)


def fixed(seconds: float) -> Wait:
    """The same wait before every retry.

    Example::

        fixed(2.5)(RetryState(attempt=4))   # 2.5
    """
    return _Fixed(seconds)


@dataclass(frozen=True)
class _Linear(Wait):
    start: float
    step: float
    cap: float

    def __call__(self, state: RetryState) -> float:
        return min(self.cap, self.start + self.step * (max(1, state.attempt) - 1))

    def check(self, where: str) -> None:
        _seconds(where, "start", self.start)
        _seconds(where, "step", self.step)
        _seconds(where, "cap", self.cap, allow_inf=True)
        if self.cap < self.start:
            raise ConfigurationError(
                f"{where}: cap={self.cap!r} is smaller than start={self.start!r}"
            )


def linear(start: float = 1.0, step: float = 1.0, cap: float = math.inf) -> Wait:
    """``start + step x (attempt-1)`` seconds, at most ``cap``.

    Example::

        linear(start=1, step=2)(RetryState(attempt=3))   # 5.0
    """
    return _Linear(start, step, cap)


# -- stops ----------------------------------------------------------------------------
class Stop:
    """Whether to give up after a failed attempt; ``|`` and ``&`` combine.

    ``next_s`` is the wait the next attempt would need: a deadline stops when
    that attempt would start past it.

    Example::

        (attempts(5) | deadline(600))(RetryState(attempt=5), next_s=1.0)   # True
    """

    def __call__(self, state: RetryState, next_s: float = 0.0) -> bool:
        raise NotImplementedError

    def __or__(self, other: Stop | Callable[..., bool]) -> Stop:
        return _Any(self, as_stop(other))

    def __and__(self, other: Stop | Callable[..., bool]) -> Stop:
        return _All(self, as_stop(other))

    def check(self, where: str) -> None:
        """Raise ConfigurationError naming ``where`` when an argument is invalid."""

    def deadline_s(self) -> float | None:
        """The total-time budget this stop enforces, if any (caps retry-after hints)."""
        return None


class _Any(Stop):
    def __init__(self, a: Stop, b: Stop) -> None:
        self.a, self.b = a, b

    def __call__(self, state: RetryState, next_s: float = 0.0) -> bool:
        return self.a(state, next_s) or self.b(state, next_s)

    def check(self, where: str) -> None:
        self.a.check(where)
        self.b.check(where)

    def deadline_s(self) -> float | None:
        found = [d for d in (self.a.deadline_s(), self.b.deadline_s()) if d is not None]
        return min(found) if found else None


class _All(_Any):
    def __call__(self, state: RetryState, next_s: float = 0.0) -> bool:
        return self.a(state, next_s) and self.b(state, next_s)

    def deadline_s(self) -> float | None:
        found = [d for d in (self.a.deadline_s(), self.b.deadline_s()) if d is not None]
        return max(found) if len(found) == 2 else None


class _CallableStop(Stop):
    def __init__(self, fn: Callable[..., bool]) -> None:
        self.fn = fn

    def __call__(self, state: RetryState, next_s: float = 0.0) -> bool:
        return bool(self.fn(state))


def as_stop(value: Stop | Callable[..., bool]) -> Stop:
    """A :class:`Stop` from a strategy or a plain callable ``f(state) -> bool``."""
    if isinstance(value, Stop):
        return value
    if callable(value):
        return _CallableStop(value)
    raise ConfigurationError(f"stop={value!r}: expected a stop strategy or a callable")


@dataclass(frozen=True)
class _Attempts(Stop):
    n: int

    def __call__(self, state: RetryState, next_s: float = 0.0) -> bool:
        return state.attempt >= self.n

    def check(self, where: str) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigurationError(f"{where}: attempts={self.n!r}: expected an integer >= 1")


def attempts(n: int) -> Stop:
    """Give up after ``n`` runs in all (the first one included).

    Example::

        attempts(3)(RetryState(attempt=3))   # True: no fourth run
    """
    return _Attempts(n)


@dataclass(frozen=True)
class _Deadline(Stop):
    seconds: float

    def __call__(self, state: RetryState, next_s: float = 0.0) -> bool:
        return state.elapsed_s + next_s > self.seconds

    def check(self, where: str) -> None:
        _seconds(where, "deadline", self.seconds)

    def deadline_s(self) -> float | None:
        return float(self.seconds)


def deadline(seconds: float) -> Stop:
    """Give up when the next attempt would start more than ``seconds`` after the first.

    Example::

        deadline(600)(RetryState(elapsed_s=590), next_s=20)   # True
    """
    return _Deadline(seconds)


# -- retry-after ------------------------------------------------------------------------
def retry_after_of(exc: BaseException, now: float | None = None) -> float | None:
    """The wait an exception asks for: :class:`RetryAfter`, or HTTP 429/503 ``Retry-After``.

    Understands ``exc.response`` with ``status_code`` and ``headers`` (requests
    and httpx); the header is seconds or an HTTP date.

    Example::

        retry_after_of(RetryAfter(30))   # 30.0
    """
    if isinstance(exc, RetryAfter):
        return exc.seconds
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status not in (429, 503):
        return None
    headers = getattr(response, "headers", None) or {}
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")
    except AttributeError:
        return None
    if value is None:
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_s = time.time() if now is None else now
    return max(0.0, when.timestamp() - now_s)


# -- the policy -----------------------------------------------------------------------------
Decision = tuple[Literal["retry", "giveup", "raise"], float, str]


@dataclass(frozen=True)
class RetryPolicy:
    """A task's retry policy: wait, stop and exception filters.

    Built by :func:`retry` (or passed as ``@app.task(retry=RetryPolicy(...))``).
    :meth:`decide` is pure: tests drive it with a fake state, no clock.

    Example::

        policy = RetryPolicy(wait=fixed(1), stop=attempts(3), on=(IOError,))
        policy.decide(IOError(), RetryState(attempt=1))   # ('retry', 1.0, '')
    """

    wait: Wait = field(default_factory=lambda: exponential())
    stop: Stop = field(default_factory=lambda: attempts(5))
    on: tuple[type[BaseException], ...] = (Exception,)
    giveup_on: tuple[type[BaseException], ...] = ()
    when: Callable[[BaseException], bool] | None = None

    def check(self, where: str) -> None:
        """Validate every part; ConfigurationError names ``where`` and the argument."""
        for name, types in (("on", self.on), ("giveup_on", self.giveup_on)):
            for t in types:
                if not (isinstance(t, type) and issubclass(t, BaseException)):
                    raise ConfigurationError(f"{where}: {name}={t!r}: expected exception types")
        if self.when is not None and not callable(self.when):
            raise ConfigurationError(f"{where}: when={self.when!r}: expected a callable")
        self.wait.check(where)
        self.stop.check(where)

    def retries(self, exc: BaseException) -> bool:
        """Whether ``exc`` is one this policy retries (``giveup_on`` aside).

        Example::

            RetryPolicy(on=(IOError,)).retries(ValueError())   # False
        """
        if isinstance(exc, RetryAfter):
            return True
        if not isinstance(exc, self.on):
            return False
        return self.when is None or bool(self.when(exc))

    def decide(self, exc: BaseException, state: RetryState, filtered: bool = True) -> Decision:
        """('retry', wait_s, '') or ('giveup', 0, reason) or ('raise', 0, '') (not ours).

        ``filtered=False`` (a manual ``self.retry()``) skips ``on`` and ``when``.

        Example::

            RetryPolicy(stop=attempts(1)).decide(ValueError(), RetryState())
            # ('giveup', 0.0, 'attempts')
        """
        if self.giveup_on and isinstance(exc, self.giveup_on):
            return ("giveup", 0.0, "giveup_on")
        if filtered and not self.retries(exc):
            return ("raise", 0.0, "")
        hint = retry_after_of(exc)
        wait_s = max(0.0, hint if hint is not None else float(self.wait(state)))
        budget = self.stop.deadline_s()
        if hint is not None and budget is not None and state.elapsed_s + wait_s > budget:
            return ("giveup", 0.0, "deadline")  # a retry-after never takes us past it
        if self.stop(state, wait_s):
            over = budget is not None and state.elapsed_s + wait_s > budget
            return ("giveup", 0.0, "deadline" if over else "attempts")
        return ("retry", wait_s, "")


def _types(value: type[BaseException] | Iterable[type[BaseException]] | None) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, type):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return (value,)  # check() names it
    return tuple(value)


def retry(
    *,
    on: type[BaseException] | Iterable[type[BaseException]] = Exception,
    attempts: int | None = None,
    deadline: float | None = None,
    wait: Wait | Callable[[RetryState], float] | None = None,
    stop: Stop | Callable[..., bool] | None = None,
    giveup_on: type[BaseException] | Iterable[type[BaseException]] | None = None,
    when: Callable[[BaseException], bool] | None = None,
) -> Callable[[Any], Any]:
    """Decorator giving a task a retry policy; above or below ``@app.task``.

    ``attempts`` and ``deadline`` are shortcuts for ``stop=attempts(n) |
    deadline(s)``; with none of them a task stops after 5 attempts. The
    default wait is ``exponential()`` (1 s doubling, at most 300 s).
    Arguments are checked at once (ConfigurationError naming the task).

    Example::

        @app.task
        @celery_ext.retry(on=TimeoutError, attempts=4, wait=celery_ext.fixed(2))
        def ping(host): ...
    """
    parts: list[Stop] = []
    if attempts is not None:
        parts.append(_Attempts(attempts))
    if deadline is not None:
        parts.append(_Deadline(deadline))
    if stop is not None:
        parts.append(as_stop(stop))
    combined: Stop | None = None
    for part in parts:
        combined = part if combined is None else combined | part
    policy = RetryPolicy(
        wait=exponential() if wait is None else as_wait(wait),
        stop=combined if combined is not None else _Attempts(5),
        on=_types(on),
        giveup_on=_types(giveup_on),
        when=when,
    )

    def decorate(obj: Any) -> Any:
        policy.check(f"task {task_label(obj)!r}")
        if hasattr(obj, "apply_async"):  # already a task
            from ._retrying import attach

            attach(obj, policy)
        else:
            obj.__celery_ext_retry_policy__ = policy
        return obj

    return decorate


def now_iso() -> str:
    """The current UTC time as ISO 8601 (attempt records).

    Example::

        now_iso()   # '2026-11-29T05:59:00.123456+00:00'
    """
    return datetime.now(timezone.utc).isoformat()
