"""Fan-out branch policy: what happens to a batch when one branch of a fan-out falls behind.

Each branch of a fan-out has its own credits (a `CreditSender` towards that branch) and a policy:

* `Block()` - the fan-out waits for this branch: the source does not advance past a batch until every
  blocking branch has taken it. Memory stays bounded; the slowest blocking branch sets the pace.
* `Shed(after=seconds)` - once the branch has been starved of credits for at least `after` seconds, each
  batch it cannot take goes to the dead-letter queue with reason "shed" instead of waiting. Shed batches
  are counted (`BranchCounters`) and, once durably in the DLQ, completed in the ledger as
  WRITTEN_WITH_DLQ - never silently dropped. Shedding stops as soon as the branch has credits again.

`decide_delivery` is the pure rule. `Branch` applies it to one branch's credit state and counters.
`FanOutBatch` walks one batch across all branches: it is done when every branch has either taken the
batch or shed it, and it tells the driver when to look again (`next_deadline`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from etlrouter.flow.credits import CreditSender

SHED_REASON = "shed"


class Block(msgspec.Struct, frozen=True, tag="block"):
    """Wait for this branch (the default): lossless, the slowest branch sets the pace."""


class Shed(msgspec.Struct, frozen=True, tag="shed"):
    """After `after` seconds without credits, send this branch's batches to the DLQ (reason "shed")."""

    after: float

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ValueError("Shed.after must be >= 0 seconds")


BranchPolicy = Block | Shed


class Delivery(enum.Enum):
    DELIVER = "deliver"
    WAIT = "wait"
    SHED = "shed"


def decide_delivery(policy: BranchPolicy, fits: bool, starved_since: float | None, now: float) -> Delivery:
    """The rule. `fits`: the branch has credits for the batch. `starved_since`: when the branch's current
    wait for credits began (None: it is not waiting yet, so a refusal now starts the wait at `now`)."""
    if fits:
        return Delivery.DELIVER
    if isinstance(policy, Shed):
        starved_for = 0.0 if starved_since is None else now - starved_since
        if starved_for >= policy.after:
            return Delivery.SHED
    return Delivery.WAIT


@dataclass(slots=True)
class BranchCounters:
    delivered_batches: int = 0
    delivered_records: int = 0
    shed_batches: int = 0
    shed_records: int = 0
    waits: int = 0


@dataclass(slots=True)
class Branch:
    """One branch of a fan-out: its policy, its credits, its counters."""

    name: str
    policy: BranchPolicy
    credits: CreditSender
    counters: BranchCounters = field(default_factory=BranchCounters)

    def offer(self, records: int, nbytes: int, now: float) -> Delivery:
        """Decide for one batch and apply it: DELIVER takes the credits (send the batch now); WAIT starts
        or continues the starvation clock; SHED counts the batch (send it to the DLQ, reason "shed")."""
        fits = self.credits.can_acquire(records, nbytes)
        decision = decide_delivery(self.policy, fits, self.credits.starved_since, now)
        if decision is Delivery.DELIVER:
            acquired = self.credits.try_acquire(records, nbytes, now)
            assert acquired, "can_acquire and try_acquire disagree"
            self.counters.delivered_batches += 1
            self.counters.delivered_records += records
            return decision
        # Still behind: the starvation streak continues (shedding does not reset it; credits do).
        self.credits.mark_starved(now)
        if decision is Delivery.SHED:
            self.counters.shed_batches += 1
            self.counters.shed_records += records
        else:
            self.counters.waits += 1
        return decision

    def shed_deadline(self) -> float | None:
        """When a waiting SHED branch would start shedding (None: blocking, or not waiting)."""
        since = self.credits.starved_since
        if isinstance(self.policy, Shed) and since is not None:
            return since + self.policy.after
        return None


@dataclass(frozen=True, slots=True)
class FanOutStep:
    deliver: list[str]
    shed: list[str]
    waiting: list[str]


class FanOutBatch:
    """One batch on its way to every branch of a fan-out.

    Call `step(now)` when the batch arrives, whenever a branch receives credits, and at `next_deadline()`.
    The fan-out takes its next batch only when `done`: this is what makes BLOCK block, and it bounds the
    fan-out's own memory to one batch.
    """

    def __init__(self, records: int, nbytes: int, branches: Iterable[Branch]) -> None:
        self.records = records
        self.nbytes = nbytes
        self._remaining = {branch.name: branch for branch in branches}

    @property
    def done(self) -> bool:
        return not self._remaining

    @property
    def remaining(self) -> list[str]:
        return list(self._remaining)

    def step(self, now: float) -> FanOutStep:
        deliver: list[str] = []
        shed: list[str] = []
        waiting: list[str] = []
        for name, branch in list(self._remaining.items()):
            decision = branch.offer(self.records, self.nbytes, now)
            if decision is Delivery.WAIT:
                waiting.append(name)
                continue
            (deliver if decision is Delivery.DELIVER else shed).append(name)
            del self._remaining[name]
        return FanOutStep(deliver, shed, waiting)

    def drop_branch(self, name: str) -> None:
        """The branch was removed at runtime: stop waiting for it (the ledger counts the obligation)."""
        self._remaining.pop(name, None)

    def next_deadline(self) -> float | None:
        """The earliest time a waiting branch would switch to shedding (None: only grants can help)."""
        deadlines = [d for b in self._remaining.values() if (d := b.shed_deadline()) is not None]
        return min(deadlines, default=None)
