"""Retry policy: error classification, exponential backoff with jitter, bounded attempts.

The one backoff rule of the project: `Backoff` for loops that retry until they succeed or are stopped
(reconnects, leader searches, watches, heartbeats), `RetryPolicy` for operations with a bounded number of
attempts (a stage's call to its user service). Both compute the same capped exponential delay.

Pure: the random source is passed in (seeded in tests and simulations), and the policy returns a delay; the
caller does the sleeping. Sink writes are idempotent by batch id, so retrying a batch is always safe.

Classification. Only conditions that are transient by nature are retried: UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED and ABORTED. Everything else is permanent, including UNKNOWN and INTERNAL, which is
what a user service produces when its handler raises: retrying a batch that crashes the user's code would
loop forever, so such a batch goes to the dead-letter queue. A user service whose dependency is briefly
down should say so with UNAVAILABLE (the SDK maps connection errors to it).
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass


class GrpcStatus(enum.IntEnum):
    """The numeric gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ErrorClass(enum.Enum):
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


RETRYABLE_STATUSES = frozenset(
    {
        GrpcStatus.UNAVAILABLE,
        GrpcStatus.DEADLINE_EXCEEDED,
        GrpcStatus.RESOURCE_EXHAUSTED,
        GrpcStatus.ABORTED,
    }
)


def classify_grpc_status(code: int) -> ErrorClass:
    """Map a numeric gRPC status code onto retryable / permanent. OK is not an error.

    Codes outside 0..16 are treated like UNKNOWN (as the gRPC spec asks of receivers): permanent.
    """
    if code == GrpcStatus.OK:
        raise ValueError("status OK is not an error")
    return ErrorClass.RETRYABLE if code in RETRYABLE_STATUSES else ErrorClass.PERMANENT


def capped_exponential(retry_number: int, base: float, cap: float, multiplier: float) -> float:
    """min(cap, base * multiplier ** (retry_number - 1)), without overflowing for large retry numbers."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    if multiplier == 1:
        return min(base, cap)
    # Compare exponents in log space: multiplier ** n overflows a float long before attempts run out.
    steps_to_cap = math.log(cap / base) / math.log(multiplier) if cap > base else 0.0
    if retry_number - 1 >= steps_to_cap:
        return cap
    return min(cap, base * multiplier ** (retry_number - 1))


_SHARED_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with proportional jitter, for retry-until-stopped loops.

    The delay after the n-th consecutive failure (n >= 1) is cap_n * (1 - jitter * u), u uniform in [0, 1),
    cap_n = min(cap, base * multiplier ** (n - 1)). `jitter=1.0` is AWS' "full jitter", `jitter=0` a fixed
    schedule (for tests and for waits that must not shrink). n <= 0 (no failure yet) waits 0.
    """

    base: float = 0.05
    cap: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError("need 0 < base <= cap")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after `failures` consecutive failures; pass a seeded `rng` in simulations."""
        if failures < 1:
            return 0.0
        ceiling = capped_exponential(failures, self.base, self.cap, self.multiplier)
        if not self.jitter:
            return ceiling
        return ceiling * (1.0 - self.jitter * (rng or _SHARED_RNG).random())


class GiveUpReason(enum.Enum):
    PERMANENT = "permanent"
    EXHAUSTED = "attempts_exhausted"


@dataclass(frozen=True, slots=True)
class RetryAfter:
    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: GiveUpReason


RetryDecision = RetryAfter | GiveUp


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter").

    The delay before retry number n (n = 1 after the first failure) is uniform in [0, cap_n] with
    cap_n = min(max_delay, base_delay * multiplier ** (n - 1)). `max_attempts` counts every attempt,
    the first included: max_attempts=1 means never retry.
    """

    base_delay: float = 0.05
    max_delay: float = 10.0
    multiplier: float = 2.0
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.base_delay <= 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def delay_cap(self, retry_number: int) -> float:
        """The upper bound of the jittered delay before retry `retry_number` (1-based)."""
        return capped_exponential(retry_number, self.base_delay, self.max_delay, self.multiplier)

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """A full-jitter delay before retry `retry_number`."""
        return rng.uniform(0.0, self.delay_cap(retry_number))

    def decide(self, attempts_made: int, error: ErrorClass, rng: random.Random) -> RetryDecision:
        """After `attempts_made` failed attempts (>= 1) with this error: retry after a delay, or give up."""
        if attempts_made < 1:
            raise ValueError("attempts_made starts at 1 (decide is called after a failure)")
        if error is ErrorClass.PERMANENT:
            return GiveUp(GiveUpReason.PERMANENT)
        if attempts_made >= self.max_attempts:
            return GiveUp(GiveUpReason.EXHAUSTED)
        return RetryAfter(self.backoff(attempts_made, rng))
