"""The ack ledger: when may a source offset be acknowledged? (at-least-once, end to end)

This module is the one place that answers that question. It is pure: it records what happened and returns
the acks to send; the sidecar does the sending.

Model
-----
* For each source partition, batches are registered **in source order** with their inclusive offset
  range and the branches (sinks) the routing table sent them to.
* A batch may travel as several *pieces*: initially one piece per branch, whose id is the batch id. A
  transform that splits a batch replaces a piece with child pieces (`split`); a transform that filters
  every record of a piece replaces it with none. A filtered-out record is therefore done for every branch
  it would have gone to: nothing is left to wait for.
* A branch reports, per piece, one `Outcome`: WRITTEN; WRITTEN_WITH_DLQ (some or all records are durably
  in the dead-letter queue, the rest written: also done); or FAILED_RETRYABLE (not done, the sink runner
  retries with the same batch id so the write is idempotent).
* A batch is complete when no branch has an outstanding piece of it. Acks are released as a contiguous
  prefix per partition: a completed batch behind an incomplete one waits. `Ack.offset` is the **last
  offset (inclusive)** of that prefix; a Kafka-style source commits `offset + 1`.

Edge cases, made explicit
-------------------------
* Late or repeated reports (a retry that succeeded twice, a report for a batch already acked or a branch
  already removed) are ignored and counted in `LedgerStats`, never raised: they are normal under
  at-least-once delivery and asynchronous removal.
* `remove_branch` drops the branch's outstanding pieces on purpose (the operator removed that sink), counts
  them as dropped obligations, and returns the acks this unblocks.
* `drop_partition` forgets a revoked partition (e.g. a Kafka rebalance) *without* acking anything: the new
  owner redelivers from the last committed ack.
* Restart: the ledger is in memory only. After a sidecar restart nothing pending is acknowledged; the source
  redelivers from its last ack, and batch ids make the repeated sink writes idempotent. That is the
  at-least-once contract: duplicates are possible, loss is not.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

BatchId = str
BranchId = str


class SourcePartition(msgspec.Struct, frozen=True, array_like=True):
    """One ordered stream of offsets from a source."""

    source_id: str
    partition: int


class Ack(msgspec.Struct, frozen=True, array_like=True):
    """Everything up to and including `offset` on this partition may be acknowledged to the source."""

    source_id: str
    partition: int
    offset: int


class Outcome(enum.Enum):
    WRITTEN = "written"
    WRITTEN_WITH_DLQ = "written_with_dlq"  # the rest durably in the DLQ: done
    FAILED_RETRYABLE = "failed_retryable"  # not done: will be retried


class LedgerError(Exception):
    """A caller broke the ledger's contract (out-of-order registration, duplicate ids)."""


@dataclass(slots=True)
class LedgerStats:
    """Counters that say what happened and why (exported as metrics by the sidecar)."""

    batches_registered: int = 0
    batches_acked: int = 0
    records_acked: int = 0
    retryable_failures: Counter[BranchId] = field(default_factory=Counter)
    dead_lettered_records: Counter[tuple[BranchId, str]] = field(default_factory=Counter)
    filtered_records: int = 0
    duplicate_reports: int = 0
    stale_reports: int = 0
    dropped_obligations: Counter[BranchId] = field(default_factory=Counter)
    dropped_partition_batches: int = 0


@dataclass(slots=True)
class _Batch:
    batch_id: BatchId
    partition: SourcePartition
    first_offset: int
    last_offset: int
    records: int
    # Outstanding piece ids per branch; a branch with no outstanding piece is done with this batch.
    pending: dict[BranchId, set[BatchId]]
    # Pieces already finished, per branch, so a repeated report is recognised as a duplicate.
    finished: dict[BranchId, set[BatchId]] = field(default_factory=dict)
    # Child piece ids ever indexed for this batch (None until a split), so forgetting it is exact.
    child_pieces: set[BatchId] | None = None

    @property
    def complete(self) -> bool:
        return not self.pending


@dataclass(slots=True)
class _PartitionLog:
    batches: deque[_Batch] = field(default_factory=deque)
    last_registered_offset: int | None = None
    last_acked_offset: int | None = None


@dataclass(frozen=True, slots=True)
class BranchRemoval:
    """What removing a branch did: the obligations dropped (explicitly) and the acks it released."""

    dropped_pieces: int
    dropped_batches: int
    dropped_records: int
    acks: list[Ack]


class AckLedger:
    """Tracks which source offsets every branch has finished, and releases acks in source order."""

    def __init__(self) -> None:
        self._partitions: dict[SourcePartition, _PartitionLog] = {}
        # Every outstanding piece id -> the source batch it belongs to.
        self._pieces: dict[BatchId, _Batch] = {}
        self.stats = LedgerStats()

    # -- registration -------------------------------------------------------------------------------

    def register(
        self,
        batch_id: BatchId,
        partition: SourcePartition,
        first_offset: int,
        last_offset: int,
        records: int,
        branches: Iterable[BranchId],
    ) -> list[Ack]:
        """Record a batch read from `partition`, routed to `branches`. Must follow source order.

        Returns acks only in the degenerate case of a batch routed nowhere (done at once, may be the head).
        """
        if last_offset < first_offset:
            raise LedgerError(f"batch {batch_id}: last offset {last_offset} < first offset {first_offset}")
        if batch_id in self._pieces:
            raise LedgerError(f"batch id {batch_id} is already in the ledger")
        log = self._partitions.get(partition)
        if log is None:
            log = self._partitions[partition] = _PartitionLog()
        if log.last_registered_offset is not None and first_offset <= log.last_registered_offset:
            raise LedgerError(
                f"batch {batch_id} on {partition}: offsets must increase in source order "
                f"(first {first_offset} <= previous last {log.last_registered_offset})"
            )
        batch = _Batch(
            batch_id=batch_id,
            partition=partition,
            first_offset=first_offset,
            last_offset=last_offset,
            records=records,
            pending={branch: {batch_id} for branch in branches},
        )
        log.batches.append(batch)
        log.last_registered_offset = last_offset
        self.stats.batches_registered += 1
        if batch.complete:
            return self._release(partition)
        self._pieces[batch_id] = batch
        return []

    # -- transforms -----------------------------------------------------------------------------------

    def split(
        self,
        piece_id: BatchId,
        children: Sequence[BatchId],
        branches: Iterable[BranchId] | None = None,
        filtered_records: int = 0,
    ) -> list[Ack]:
        """A transform turned piece `piece_id` into `children` (none: every record was filtered out).

        Applies to `branches` (default: every branch still waiting for that piece). Children inherit the
        piece's obligations on those branches. Returns the acks this releases (possible when filtering
        finishes the batch).
        """
        batch = self._pieces.get(piece_id)
        if batch is None:
            self.stats.stale_reports += 1
            return []
        targets = [b for b in (batch.pending if branches is None else branches) if b in batch.pending]
        for child in children:
            owner = self._pieces.get(child)
            if owner is not None and owner is not batch:
                raise LedgerError(f"piece id {child} already belongs to batch {owner.batch_id}")
        self.stats.filtered_records += filtered_records
        for branch in targets:
            outstanding = batch.pending[branch]
            if piece_id not in outstanding:
                continue
            outstanding.discard(piece_id)
            outstanding.update(children)
            if not outstanding:
                del batch.pending[branch]
        self._reindex(batch, children)
        return self._release(batch.partition) if batch.complete else []

    # -- outcomes -------------------------------------------------------------------------------------

    def complete(
        self,
        piece_id: BatchId,
        branch: BranchId,
        outcome: Outcome,
        dead_lettered: int = 0,
        reason: str = "",
    ) -> list[Ack]:
        """Record a branch's outcome for one piece. Returns the new acks to send to the source."""
        if outcome is Outcome.FAILED_RETRYABLE:
            self.stats.retryable_failures[branch] += 1
            return []
        batch = self._pieces.get(piece_id)
        if batch is None:
            self.stats.stale_reports += 1
            return []
        outstanding = batch.pending.get(branch)
        if outstanding is None or piece_id not in outstanding:
            if piece_id in batch.finished.get(branch, ()):
                self.stats.duplicate_reports += 1
            else:
                self.stats.stale_reports += 1
            return []
        if outcome is Outcome.WRITTEN_WITH_DLQ:
            self.stats.dead_lettered_records[(branch, reason or "unspecified")] += dead_lettered
        outstanding.discard(piece_id)
        batch.finished.setdefault(branch, set()).add(piece_id)
        if outstanding:
            return []
        del batch.pending[branch]
        if not batch.complete:
            return []
        return self._release(batch.partition)

    # -- topology changes -----------------------------------------------------------------------------

    def remove_branch(self, branch: BranchId) -> BranchRemoval:
        """Drop every outstanding obligation of a removed branch (counted), and release what it unblocks."""
        dropped_pieces = dropped_batches = dropped_records = 0
        touched: set[SourcePartition] = set()
        for partition, log in self._partitions.items():
            for batch in log.batches:
                outstanding = batch.pending.pop(branch, None)
                if outstanding is None:
                    continue
                dropped_pieces += len(outstanding)
                dropped_batches += 1
                dropped_records += batch.records
                touched.add(partition)
        self.stats.dropped_obligations[branch] += dropped_batches
        acks: list[Ack] = []
        for partition in touched:
            acks.extend(self._release(partition))
        return BranchRemoval(dropped_pieces, dropped_batches, dropped_records, acks)

    def drop_partition(self, partition: SourcePartition) -> int:
        """Forget a revoked partition without acking anything more. Returns the batches forgotten."""
        log = self._partitions.pop(partition, None)
        if log is None:
            return 0
        for batch in log.batches:
            self._forget(batch)
        self.stats.dropped_partition_batches += len(log.batches)
        return len(log.batches)

    # -- queries --------------------------------------------------------------------------------------

    def last_acked(self, partition: SourcePartition) -> int | None:
        log = self._partitions.get(partition)
        return None if log is None else log.last_acked_offset

    def pending_batches(self, partition: SourcePartition | None = None) -> int:
        """Registered batches not yet acked (on one partition, or on all)."""
        if partition is not None:
            log = self._partitions.get(partition)
            return 0 if log is None else len(log.batches)
        return sum(len(log.batches) for log in self._partitions.values())

    def waiting_on(self, piece_id: BatchId) -> frozenset[BranchId]:
        """The branches that still owe the batch containing this piece (empty if unknown or done)."""
        batch = self._pieces.get(piece_id)
        return frozenset() if batch is None else frozenset(batch.pending)

    def partitions(self) -> list[SourcePartition]:
        return list(self._partitions)

    # -- internals ------------------------------------------------------------------------------------

    def _release(self, partition: SourcePartition) -> list[Ack]:
        """Pop the completed prefix of a partition; return one ack for it, or none."""
        log = self._partitions[partition]
        released: _Batch | None = None
        while log.batches and log.batches[0].complete:
            released = log.batches.popleft()
            self._forget(released)
            self.stats.batches_acked += 1
            self.stats.records_acked += released.records
        if released is None:
            return []
        log.last_acked_offset = released.last_offset
        return [Ack(partition.source_id, partition.partition, released.last_offset)]

    def _reindex(self, batch: _Batch, children: Sequence[BatchId]) -> None:
        # Replaced pieces stay indexed until the batch is forgotten, so late reports about them are
        # classified (duplicate or stale) rather than mistaken for another batch.
        if children and batch.child_pieces is None:
            batch.child_pieces = set()
        for child in children:
            self._pieces[child] = batch
            if batch.child_pieces is not None:
                batch.child_pieces.add(child)

    def _forget(self, batch: _Batch) -> None:
        self._pieces.pop(batch.batch_id, None)
        if batch.child_pieces is not None:
            for piece in batch.child_pieces:
                self._pieces.pop(piece, None)
