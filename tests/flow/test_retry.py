"""Retry policy: classification of gRPC codes, full-jitter bounds, attempt budget."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etlrouter.flow.retry import (
    Backoff,
    ErrorClass,
    GiveUp,
    GiveUpReason,
    GrpcStatus,
    RetryAfter,
    RetryPolicy,
    classify_grpc_status,
)


# UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED
@pytest.mark.parametrize("code", [14, 4, 8, 10])
def test_transient_codes_are_retryable(code: int) -> None:
    assert classify_grpc_status(code) is ErrorClass.RETRYABLE


@pytest.mark.parametrize("code", [1, 2, 3, 5, 6, 7, 9, 11, 12, 13, 15, 16, 99])
def test_everything_else_is_permanent(code: int) -> None:
    assert classify_grpc_status(code) is ErrorClass.PERMANENT


def test_ok_is_not_an_error() -> None:
    with pytest.raises(ValueError):
        classify_grpc_status(GrpcStatus.OK)


def test_status_numbers_match_the_grpc_spec() -> None:
    assert (GrpcStatus.INVALID_ARGUMENT, GrpcStatus.FAILED_PRECONDITION, GrpcStatus.UNAVAILABLE) == (3, 9, 14)
    assert [s.value for s in GrpcStatus] == list(range(17))


def test_delay_cap_grows_exponentially_then_saturates() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0, multiplier=2.0)
    caps = [policy.delay_cap(n) for n in range(1, 7)]
    assert caps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.delay_cap(10_000) == 1.0  # no float overflow for absurd attempt numbers


@given(retry_number=st.integers(1, 200), seed=st.integers(0, 2**32))
def test_full_jitter_stays_within_zero_and_the_cap(retry_number: int, seed: int) -> None:
    policy = RetryPolicy(base_delay=0.05, max_delay=5.0)
    delay = policy.backoff(retry_number, random.Random(seed))
    assert 0.0 <= delay <= policy.delay_cap(retry_number)


def test_jitter_is_reproducible_with_a_seed_and_spread_without_one() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=1.0)
    first = [policy.backoff(1, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = random.Random(7)
    spread = [policy.backoff(1, rng) for _ in range(200)]
    assert min(spread) < 0.1 and max(spread) > 0.9  # "full" jitter uses the whole interval


def test_decide_gives_up_on_permanent_errors_and_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    rng = random.Random(0)
    assert policy.decide(1, ErrorClass.PERMANENT, rng) == GiveUp(GiveUpReason.PERMANENT)
    assert isinstance(policy.decide(1, ErrorClass.RETRYABLE, rng), RetryAfter)
    assert isinstance(policy.decide(2, ErrorClass.RETRYABLE, rng), RetryAfter)
    assert policy.decide(3, ErrorClass.RETRYABLE, rng) == GiveUp(GiveUpReason.EXHAUSTED)


def test_invalid_policies_are_rejected() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=2, max_delay=1)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_backoff_doubles_to_its_cap_without_jitter() -> None:

    backoff = Backoff(base=0.1, cap=1.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(0, 7)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.delay(10_000) == 1.0  # no float overflow far past the cap


def test_backoff_jitter_stays_within_its_fraction() -> None:

    backoff = Backoff(base=1.0, cap=1.0, jitter=0.25)
    rng = random.Random(7)
    delays = [backoff.delay(3, rng) for _ in range(1000)]
    assert all(0.75 < d <= 1.0 for d in delays)
    assert max(delays) - min(delays) > 0.2  # it does jitter
