"""Retry strategies and policy decisions: pure, on a fake state, no sleeping."""

from __future__ import annotations

import email.utils
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import celery_ext
from celery_ext import (
    ConfigurationError,
    RetryAfter,
    RetryPolicy,
    RetryState,
    attempts,
    deadline,
    exponential,
    fixed,
    linear,
)
from celery_ext.retry_policy import retry_after_of


def state(attempt: int = 1, elapsed: float = 0.0, previous: float = 0.0, seed: int = 0) -> Any:
    return RetryState(
        attempt=attempt, elapsed_s=elapsed, previous_s=previous, random=random.Random(seed)
    )


# -- waits ----------------------------------------------------------------------------------------
def test_exponential_uses_float_factors_and_caps() -> None:
    wait = exponential(base=0.5, factor=1.5, cap=3)
    assert [wait(state(n)) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 0.75, 1.125, 1.6875, 2.53125, 3]


def test_fixed_linear_and_sum() -> None:
    assert fixed(2.5)(state(7)) == 2.5
    assert [linear(1, 2, cap=6)(state(n)) for n in (1, 2, 3, 4)] == [1, 3, 5, 6]
    assert (fixed(1) + linear(0, 1))(state(3)) == 3
    assert (fixed(1) + (lambda s: 0.25))(state()) == 1.25  # plain callables compose


@given(
    attempt=st.integers(1, 200),
    base=st.floats(0.001, 10),
    factor=st.floats(1, 4),
    cap=st.floats(10, 1000),
    jitter=st.sampled_from([None, "full", "equal", "decorrelated"]),
    previous=st.floats(0, 1000),
    seed=st.integers(0, 2**32),
)
def test_every_jitter_stays_within_zero_and_cap(
    attempt: int, base: float, factor: float, cap: float, jitter: Any, previous: float, seed: int
) -> None:
    delay = exponential(base, factor, cap, jitter)(state(attempt, previous=previous, seed=seed))
    assert 0 <= delay <= cap


@given(previous=st.floats(0, 100), seed=st.integers(0, 2**32))
def test_decorrelated_jitter_bounds(previous: float, seed: int) -> None:
    base, cap = 0.5, 60.0
    delay = exponential(base, cap=cap, jitter="decorrelated")(
        state(3, previous=previous, seed=seed)
    )
    assert base <= delay <= min(cap, max(base, (previous or base) * 3))


def test_equal_jitter_keeps_at_least_half() -> None:
    wait = exponential(base=1, cap=100, jitter="equal")
    delays = [wait(state(4, seed=s)) for s in range(200)]
    assert all(4 <= d <= 8 for d in delays) and len(set(delays)) > 100


# -- stops ----------------------------------------------------------------------------------------
def test_attempts_count_the_first_run() -> None:
    stop = attempts(3)
    assert [stop(state(n)) for n in (1, 2, 3)] == [False, False, True]


def test_deadline_stops_before_an_attempt_past_it() -> None:
    stop = deadline(10)
    assert not stop(state(elapsed=5), next_s=4.9)
    assert stop(state(elapsed=5), next_s=5.1)


def test_or_and_combine() -> None:
    either = attempts(5) | deadline(10)
    both = attempts(5) & deadline(10)
    assert either(state(5, elapsed=1)) and either(state(1, elapsed=11))
    assert not both(state(5, elapsed=1)) and both(state(5, elapsed=11))
    assert (attempts(9) | (lambda s: s.attempt == 2))(state(2))


@given(
    elapsed=st.floats(0, 100),
    budget=st.floats(1, 100),
    jitter=st.sampled_from([None, "full", "decorrelated"]),
    seed=st.integers(0, 2**32),
    hint=st.one_of(st.none(), st.floats(0, 200)),
)
def test_a_retry_is_never_scheduled_past_the_deadline(
    elapsed: float, budget: float, jitter: Any, seed: int, hint: float | None
) -> None:
    policy = RetryPolicy(wait=exponential(1, cap=50, jitter=jitter), stop=deadline(budget))
    exc: BaseException = RetryAfter(hint) if hint is not None else ValueError()
    kind, wait_s, _ = policy.decide(exc, state(3, elapsed=elapsed, seed=seed))
    if kind == "retry":
        assert elapsed + wait_s <= budget


# -- filters, retry-after, decisions -------------------------------------------------------------
def test_filters_on_giveup_on_and_when() -> None:
    policy = RetryPolicy(
        on=(OSError,), giveup_on=(PermissionError,), when=lambda e: "transient" in str(e)
    )
    assert policy.decide(OSError("transient"), state())[0] == "retry"
    assert policy.decide(OSError("fatal"), state())[0] == "raise"  # when() says no
    assert policy.decide(ValueError("transient"), state())[0] == "raise"  # not in on
    assert policy.decide(PermissionError("transient"), state()) == ("giveup", 0.0, "giveup_on")


def test_giving_up_names_the_reason() -> None:
    assert RetryPolicy(stop=attempts(2)).decide(ValueError(), state(2)) == (
        "giveup",
        0.0,
        "attempts",
    )
    policy = RetryPolicy(wait=fixed(5), stop=attempts(10) | deadline(60))
    assert policy.decide(ValueError(), state(2, elapsed=58))[2] == "deadline"


class _Response:
    def __init__(self, status: int, retry_after: str | None) -> None:
        self.status_code = status
        self.headers = {} if retry_after is None else {"Retry-After": retry_after}


class _HTTPError(Exception):
    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(status)
        self.response = _Response(status, retry_after)


def test_retry_after_from_exceptions_and_http_responses() -> None:
    assert retry_after_of(RetryAfter(12.5)) == 12.5
    assert retry_after_of(_HTTPError(429, "7")) == 7.0
    assert retry_after_of(_HTTPError(503, "3")) == 3.0
    assert retry_after_of(_HTTPError(500, "3")) is None  # only 429 and 503
    assert retry_after_of(_HTTPError(429, None)) is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_of(_HTTPError(429, date), now=1_000_000) == 30.0


def test_retry_after_replaces_the_wait_but_not_the_deadline() -> None:
    policy = RetryPolicy(wait=fixed(1), stop=deadline(60))
    assert policy.decide(_HTTPError(429, "20"), state(elapsed=10)) == ("retry", 20.0, "")
    assert policy.decide(RetryAfter(55), state(elapsed=10)) == ("giveup", 0.0, "deadline")


# -- bad arguments ------------------------------------------------------------------------------
F = r"task 'tests\.test_retry\.f'"  # below @app.task: named as Celery will name the function


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"wait": exponential(base=-1)}, F + r".*base=-1"),
        ({"wait": exponential(base=10, cap=5)}, F + r".*cap=5 is smaller than base=10"),
        ({"wait": exponential(factor=0.5)}, F + r".*factor=0.5"),
        ({"wait": exponential(jitter="wild")}, F + r".*jitter='wild'"),  # type: ignore[arg-type]
        ({"wait": fixed(-2)}, F + r".*seconds=-2"),
        ({"attempts": 0}, F + r".*attempts=0: expected an integer >= 1"),
        ({"deadline": -5}, F + r".*deadline=-5"),
        ({"on": (ValueError, "oops")}, F + r".*on='oops': expected exception types"),
        ({"giveup_on": int}, F + r".*giveup_on=<class 'int'>"),
    ],
)
def test_bad_arguments_fail_at_decoration(kwargs: dict[str, Any], message: str) -> None:
    def f() -> None: ...

    with pytest.raises(ConfigurationError, match=message):
        celery_ext.retry(**kwargs)(f)


def test_the_default_policy() -> None:
    def f() -> None: ...

    policy = celery_ext.retry()(f).__celery_ext_retry_policy__
    assert policy.decide(ValueError(), state(4))[0] == "retry"
    assert policy.decide(ValueError(), state(5)) == ("giveup", 0.0, "attempts")
    assert policy.decide(KeyboardInterrupt(), state())[0] == "raise"
