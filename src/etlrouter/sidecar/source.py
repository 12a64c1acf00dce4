"""The source stage: pulls batches (or takes pushed ones), registers each in the ack ledger, fans it out to
every branch, and acknowledges to the source what the ledger releases: in order, never past a gap.

The in-flight bound (twice one edge's window of batches) is what makes a slow sink slow the pulls. A push
source (Capabilities.push, sidecar/push.py) enters the same path as a pull (`_route`): one in-flight bound,
one ledger, one fan-out; only who keeps the records until they are acknowledged differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client import Counter, Gauge, Histogram

from etlrouter._proto.v1 import control_pb2, records_pb2, services_pb2
from etlrouter.core import tracing
from etlrouter.core.metrics import REGISTRY
from etlrouter.flow.ledger import Ack, AckLedger, Outcome, SourcePartition
from etlrouter.flow.retry import Backoff
from etlrouter.flow.watermarks import SourceWatermarks
from etlrouter.sidecar.model import BatchResult, LocalService, StageHost
from etlrouter.sidecar.stages import DISCARDED, ERRORS, PermanentFailureError, StageRunner
from etlrouter.sidecar.wire import count_records, decode_records, encode_records

log = logging.getLogger(__name__)

ACKED = Counter(
    "etlrouter_source_acked_events_total",
    "Source offsets acknowledged, in records.",
    ["dag", "stage"],
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "etlrouter_source_inflight_batches",
    "Batches pulled and not yet acknowledged.",
    ["dag", "stage"],
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "etlrouter_batch_seconds",
    "Time for a batch to be handled by a stage and everything below it.",
    ["dag", "stage"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


# Long poll: a pull may be held by the source up to this long while it has no records (PullRecords'
# wait_ms), so an idle source answers the moment a record arrives, and the sidecar pulls again at once
# after an empty answer that used the wait.
PULL_WAIT_MS = 500
# A source that answers an empty pull long before wait_ms (one that does not long-poll, e.g. written in
# another language without a wait; or one with nothing for the partitions asked) is pulled again after
# 1, 2, 4, ... 50 ms, not in a busy loop; a pull with records, or an empty one that waited, resets it.
EMPTY_PULL_BACKOFF = Backoff(base=0.001, cap=0.05, jitter=0.0)


def answered_at_once(took_s: float, wait_ms: int = PULL_WAIT_MS) -> bool:
    """An empty answer that came back in less than half the wait: the source did not hold the pull (with no
    wait allowed, every empty answer is one)."""
    return wait_ms == 0 or took_s < wait_ms / 2000


def is_push_source(service: LocalService) -> bool:
    """A source that declared Capabilities.push: it pushes batches in (PushRecords) and is never pulled."""
    if service.kind != "source" or not service.capabilities_proto:
        return False
    return records_pb2.Capabilities.FromString(service.capabilities_proto).push


class SourceRunner(StageRunner):
    """Pulls batches sized by the in-flight bound, routes them, and acknowledges what the ledger releases."""

    def __init__(
        self, host: StageHost, stage: control_pb2.StageSpec, replica: int, service: LocalService
    ) -> None:
        super().__init__(host, stage, replica, service)
        self.ledger = AckLedger()
        # Batches pulled and not yet acknowledged. By default twice one edge's window: a branch that hangs
        # can hold a full window of batches, and its siblings (and its own shed policy) still need room to
        # work. Every batch in flight beyond what keeps the slowest stage busy only waits in a queue: the
        # `max_inflight` option trades that room for latency (docs/adr/0006-data-plane.md, round two).
        window_batches = max(1, self.host.config.edge_buffer_records // max(1, self.options.batch_size))
        self.inflight = asyncio.Semaphore(self.options.max_inflight or 2 * window_batches)
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._acks_due: dict[int, int] = {}
        self._last_offset: dict[tuple[str, int], int] = {}  # highest offset handed out, per partition
        self._acked: dict[int, int] = {}  # last offset acknowledged to the source, per partition
        config = self.host.config
        # Event-time watermark per partition, max event time seen minus the allowed lateness; a partition
        # silent past the idle timeout stops holding the source's watermark back.
        self.watermarks = SourceWatermarks(
            allowed_lateness=config.watermark_lateness_ms / 1000, idle_timeout=config.watermark_idle_ms / 1000
        )
        self._ack_lock = asyncio.Lock()  # one Acknowledge at a time: they reach the source in order
        self.end_of_stream = False
        # A push source (Capabilities.push) hands batches in through SidecarDataPlane.PushRecords
        # (sidecar/push.py): no pull loop, and acks go to the push streams' listeners, not Acknowledge.
        self.push_mode = is_push_source(self.service)
        self.ack_listeners: set[Callable[[], None]] = set()
        # A batch's delivery: traced (its root span, sidecar/tracing.py) only when tracing is on.
        self.start_delivery: Callable[[records_pb2.RawRecordBatch, bool], Coroutine[Any, Any, None]] = (
            self._deliver
        )
        if tracing.TRACER is not None:
            from etlrouter.sidecar import tracing as traced

            self.start_delivery = traced.traced_source_delivery(self)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def acked(self, partition: int) -> int:
        """Last offset of the partition released by the ack ledger (-1 = none yet)."""
        return self._acked.get(partition, -1)

    async def start(self) -> None:
        if not self.push_mode:
            self._task = asyncio.ensure_future(self._run())

    async def accept_pushed(self, batch: records_pb2.RawRecordBatch) -> asyncio.Task[None] | None:
        """Route a pushed batch exactly like a pulled one (same in-flight bound, ledger and fan-out). Returns
        its delivery task, or None when its offsets were already handed out (in flight or acknowledged).

        The batch is in the ledger when this returns (what the pusher is told as "accepted"); its delivery
        waits for an in-flight slot, while the push stream's credits bound how much may wait."""
        return self._route(batch, slot_held=False)

    async def stop(self) -> None:
        """Stop pulling; wait (bounded) for in-flight batches so their offsets are acknowledged."""
        self._stopping = True
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=self.host.config.drain_timeout_ms / 1000)
        for task in self._deliveries:
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._send_acks()

    async def _run(self) -> None:
        rewind = True  # a new sidecar session: whatever an earlier one pulled and did not ack must come again
        failures = 0
        quick_empties = 0  # consecutive empty answers that did not wait (EMPTY_PULL_BACKOFF)
        linger = self.options.linger_s
        partial = False  # the last pull returned fewer records than a batch holds
        # The source may hold a pull this long; never most of the stage's call timeout.
        wait_ms = min(PULL_WAIT_MS, int(self.options.timeout_s * 500))
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if linger and partial and self._deliveries:
                # Nagle-style linger: the last batch went out short and is still in flight, so records are
                # arriving faster than batches finish. Let them accumulate into a fuller batch until every
                # batch in flight is done or `linger` passed. An idle edge (nothing in flight) never waits.
                await asyncio.wait(set(self._deliveries), timeout=linger)
            await self.inflight.acquire()
            try:
                request = services_pb2.PullRecordsRequest(
                    max_records=self.options.batch_size,
                    wait_ms=wait_ms,
                    rewind=rewind,
                    max_bytes=self.host.config.edge_buffer_bytes // 4,
                )
                started = loop.time()
                reply = await asyncio.wait_for(self.client.pull(request), self.options.timeout_s)
                took = loop.time() - started
                rewind = False
                failures = 0
            except (GRPCError, StreamTerminatedError, OSError) as e:  # OSError covers TimeoutError
                # The source may have handed out records whose answer we never got: the next pull rewinds to
                # the last acknowledged offset, and what was already in flight is recognised and skipped.
                self.inflight.release()
                rewind, failures = True, failures + 1
                self.stats.errors += 1
                self.stats.last_error = f"PullRecords: {e!r}"
                ERRORS.labels(*self.labels, "pull_failed").inc()
                if failures == 1 or failures % 50 == 0:
                    log.warning("pulling from %s failed (%r); retrying with rewind", self.service.endpoint, e)
                await asyncio.sleep(self.unreachable_backoff.delay(failures, self.rng))
                continue
            except asyncio.CancelledError:
                self.inflight.release()
                raise
            batch = reply.batch
            if not batch.records:
                self.inflight.release()
                self.end_of_stream = reply.end_of_stream
                partial = False
                if reply.end_of_stream:
                    await asyncio.sleep(0.5)
                elif answered_at_once(took, wait_ms):
                    quick_empties += 1
                    await asyncio.sleep(EMPTY_PULL_BACKOFF.delay(quick_empties))
                else:
                    quick_empties = 0  # a long poll that ran out: ask again at once
                continue
            quick_empties = 0
            if self._route(batch) is None:
                self.inflight.release()
            partial = batch.header.record_count < self.options.batch_size

    def _route(self, batch: records_pb2.RawRecordBatch, slot_held: bool = True) -> asyncio.Task[None] | None:
        """Register a batch in the ledger and start delivering it to every branch (its in-flight slot is held
        by the caller, or taken by the delivery when not `slot_held`); None when it holds nothing new (the
        caller releases a held slot)."""
        header = batch.header
        header.source_id = header.source_id or self.stage.service
        header.record_count = header.record_count or count_records(batch.records)
        if not self._first_time_for(batch):
            return None
        if not header.batch_id:
            # Named by its source position: a batch redelivered after a crash, with the same offsets,
            # gets the same id, so sinks recognise what they already wrote.
            header.batch_id = (
                f"{header.source_id}/{header.partition}/{header.first_offset}-{header.last_offset}"
            )
        header.byte_size = len(batch.records)
        header.attempt = header.attempt or 1
        now = time.time()
        if header.max_event_time_ms:
            watermark = self.watermarks.observe(header.partition, header.max_event_time_ms / 1000, now)
        else:
            watermark = self.watermarks.advance(now)
        self.set_watermark(watermark)
        header.watermark_ms = self.stats.watermark_ms
        self.note_input(batch)
        partition = SourcePartition(header.source_id, header.partition)
        acks = self.ledger.register(
            header.batch_id,
            partition,
            header.first_offset,
            header.last_offset,
            header.record_count,
            list(self.stage.downstream),
        )
        self._queue_acks(acks)
        INFLIGHT.labels(*self.labels).set(self.ledger.pending_batches())
        task = asyncio.ensure_future(self.start_delivery(batch, slot_held))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        return task

    def _first_time_for(self, batch: records_pb2.RawRecordBatch) -> bool:
        """False for a batch whose offsets this session already handed out (a source redelivering on its own,
        e.g. after its own restart): those offsets are in flight or acknowledged already. A batch that only
        partly overlaps keeps its new records."""
        header = batch.header
        partition = (header.source_id, header.partition)
        last = self._last_offset.get(partition)
        if last is not None and header.first_offset <= last:
            if header.last_offset <= last:
                DISCARDED.labels(*self.labels, "already_delivered", "true").inc(header.record_count)
                return False
            records = [r for r in decode_records(batch) if r.offset > last]
            DISCARDED.labels(*self.labels, "already_delivered", "true").inc(
                header.record_count - len(records)
            )
            batch.records = encode_records(records)
            header.first_offset, header.record_count = last + 1, len(records)
            header.batch_id = ""
        self._last_offset[partition] = header.last_offset
        return True

    async def _deliver(
        self,
        batch: records_pb2.RawRecordBatch,
        slot_held: bool = True,
        exemplar: dict[str, str] | None = None,
    ) -> None:
        """Deliver to every branch, then acknowledge; `exemplar` (a sampled batch's trace id) goes with its
        latency observation."""
        if not slot_held:
            await self.inflight.acquire()
        started = time.monotonic()
        batch_id = batch.header.batch_id

        def branch_done(child: str, result: BatchResult) -> None:
            outcome = Outcome.WRITTEN_WITH_DLQ if result.dead_lettered else Outcome.WRITTEN
            self._queue_acks(self.ledger.complete(batch_id, child, outcome, result.dead_lettered))

        try:
            await self.forward(batch, branch_done)
            BATCH_SECONDS.labels(*self.labels).observe(time.monotonic() - started, exemplar)
            await self._send_acks()
        finally:
            INFLIGHT.labels(*self.labels).set(self.ledger.pending_batches())
            self.inflight.release()

    def _queue_acks(self, acks: Sequence[Ack]) -> None:
        for ack in acks:
            self._acks_due[ack.partition] = max(self._acks_due.get(ack.partition, -1), ack.offset)

    async def _send_acks(self) -> None:
        async with self._ack_lock:
            await self._send_acks_locked()

    async def _send_acks_locked(self) -> None:
        if not self._acks_due:
            return
        due, self._acks_due = self._acks_due, {}
        if self.push_mode:
            # The pusher keeps the records until acked: the push streams' listeners tell it (sidecar/push.py).
            self._note_acked(due)
            for listener in list(self.ack_listeners):
                listener()
            return
        request = services_pb2.AcknowledgeRequest(
            acks=[services_pb2.PartitionAck(partition=p, up_to_offset=o) for p, o in sorted(due.items())]
        )
        try:
            await self.call_with_retries("Acknowledge", lambda: self.client.acknowledge(request))
        except PermanentFailureError as e:
            # Acks are cumulative: keep the newest per partition and send it with the next ones.
            for p, o in due.items():
                self._acks_due[p] = max(self._acks_due.get(p, -1), o)
            log.warning("acknowledging the source failed, will retry: %s", e)
            return
        self._note_acked(due)

    def _note_acked(self, due: dict[int, int]) -> None:
        """Count what the source was told: records newly acknowledged (acks are cumulative, so counted from
        this session's previous ack of the partition) and the ack watermark per partition."""
        newly = max(0, sum(o - self._acked.get(p, -1) for p, o in due.items()))
        self._acked.update(due)
        self.stats.acked_records += newly
        self.stats.acked_offsets = dict(self._acked)
        ACKED.labels(*self.labels).inc(newly)

    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        """A redriven batch entering at the source: route it as if pulled, without touching the ledger."""
        return await self.forward(batch)
