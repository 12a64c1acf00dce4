"""Retry policy: error classification, exponential backoff with full jitter, bounded attempts.

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
        if retry_number < 1:
            raise ValueError("retry_number starts at 1")
        if self.multiplier == 1:
            return self.base_delay
        # Compare exponents in log space: multiplier ** n overflows a float long before attempts run out.
        steps_to_max = math.log(self.max_delay / self.base_delay) / math.log(self.multiplier)
        if retry_number - 1 >= steps_to_max:
            return self.max_delay
        return min(self.max_delay, self.base_delay * self.multiplier ** (retry_number - 1))

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
