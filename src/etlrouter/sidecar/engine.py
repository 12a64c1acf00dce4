"""The sidecar's data plane: runs the stages the router assigned here and moves batches between them.

Model. A merged DAG is a tree: a source stage and the transforms, lookups and sinks hung below it. Each
stage replica runs on the sidecar that fronts its service. A batch travels down the tree; every hop
answers its upstream with an *outcome* once the whole subtree below it has handled the batch (written,
or durably dead-lettered). The source stage feeds those outcomes into its ack ledger (flow/ledger.py),
which releases source offsets in order, never past a gap. That is the whole delivery guarantee:

- a hop reports DONE only after its children reported DONE (or the records are in the DLQ);
- a hop that cannot finish reports RETRY, or its stream breaks; the hop above retries (to any replica),
  so a record is written at least once, and sinks deduplicate by batch id;
- the source is acknowledged only for what the ledger released.

Backpressure. Every edge (stage replica -> child replica) has a credit window in records and bytes
(flow/credits.py) granted by the receiver as it finishes batches, and the source keeps a bounded number of
batches in flight. A slow sink therefore slows the source's pulls, and memory per edge is bounded by
configuration. A fan-out branch under `shed(after=...)` dead-letters its copy of a batch (reason "shed")
when it has waited longer than that for credits, instead of holding its siblings back.

Hot path: batches stay `RawRecordBatch` (header + encoded records) end to end; records are decoded only to
dead-letter some of them, to tap them, or for lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client import Counter, Gauge, Histogram

from etlrouter._proto.v1 import control_pb2, dataplane_pb2, records_pb2, services_grpc, services_pb2
from etlrouter.core.config import SidecarConfig, TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.core.metrics import REGISTRY
from etlrouter.dsl.options import parse_duration_ms
from etlrouter.flow.credits import Credits, CreditSender, ReceiveBuffer
from etlrouter.flow.gate import AsyncCreditGate
from etlrouter.flow.ledger import AckLedger, Outcome, SourcePartition
from etlrouter.flow.retry import GiveUp, RetryPolicy, classify_grpc_status
from etlrouter.flow.watermarks import NO_WATERMARK, SourceWatermarks, StageWatermark, WatermarkValve
from etlrouter.sidecar.dlq_sink import DlqSinkForwarder
from etlrouter.sidecar.model import DeadLetterSink, LocalService
from etlrouter.sidecar.wire import ServiceClient, count_records, decode_records, encode_records

log = logging.getLogger(__name__)

RECEIVED = Counter(
    "etlrouter_component_received_events_total",
    "Records received by a stage.",
    ["dag", "stage"],
    registry=REGISTRY,
)
SENT = Counter(
    "etlrouter_component_sent_events_total", "Records a stage passed on.", ["dag", "stage"], registry=REGISTRY
)
RECEIVED_BYTES = Counter(
    "etlrouter_component_received_bytes_total",
    "Encoded bytes received by a stage.",
    ["dag", "stage"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "etlrouter_component_errors_total",
    "Failed calls or records, by stage and error type.",
    ["dag", "stage", "error_type"],
    registry=REGISTRY,
)
DISCARDED = Counter(
    "etlrouter_component_discarded_events_total",
    "Records not passed on, by reason; intentional = a filter or a shed policy, not a failure.",
    ["dag", "stage", "reason", "intentional"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "etlrouter_dlq_written_events_total",
    "Records written to the dead-letter queue.",
    ["dag", "stage", "reason"],
    registry=REGISTRY,
)
ACKED = Counter(
    "etlrouter_source_acked_events_total",
    "Source offsets acknowledged, in records.",
    ["dag", "stage"],
    registry=REGISTRY,
)
CREDITS_AVAILABLE = Gauge(
    "etlrouter_edge_credits_available_records",
    "Credits (records) available on an edge.",
    ["dag", "edge"],
    registry=REGISTRY,
)
STARVED = Counter(
    "etlrouter_edge_starved_seconds_total",
    "Time a sender waited for credits on an edge.",
    ["dag", "edge"],
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
WATERMARK_LAG = Gauge(
    "etlrouter_watermark_lag_seconds",
    "Now minus the stage's event-time watermark.",
    ["dag", "stage"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a hop reports upstream for one batch."""

    done: bool
    dead_lettered: int = 0
    error: str = ""

    @staticmethod
    def retry(error: str) -> BatchResult:
        return BatchResult(False, 0, error)


DONE = BatchResult(True)


class EdgeBrokenError(Exception):
    """The edge cannot deliver right now (stream broke, target gone); the sender retries."""


# -------------------------------------------------------------------------------------------------------
# Stage options: the DSL's per-stage options; `config.*` ones go to the service untouched.


@dataclass(frozen=True, slots=True)
class StageOptions:
    batch_size: int = 1000
    retries: int = 5
    backoff_min_s: float = 0.05
    backoff_max_s: float = 5.0
    timeout_s: float = 30.0
    flush: bool | None = None  # None: as the sink's capabilities say
    lookup_key: str = ""
    dlq: str = ""  # a sink service that receives this stage's dead letters ("" = the sidecar's local store)
    service_options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: dict[str, str]) -> StageOptions:
        """From a DagSpec's options, already checked by the DSL and in its canonical text (`2s`, `1m..5m`)."""

        def seconds(text: str) -> float:
            return parse_duration_ms(text) / 1000

        low, _, high = options.get("backoff", "").partition("..")
        return cls(
            batch_size=int(options.get("batch_size", 1000)),
            retries=int(options.get("retries", 5)),
            backoff_min_s=seconds(low) if low else 0.05,
            backoff_max_s=seconds(high) if high else 5.0,
            timeout_s=seconds(options["timeout"]) if "timeout" in options else 30.0,
            flush={"true": True, "false": False}.get(options.get("flush", "")),
            lookup_key=options.get("key", ""),
            dlq=options.get("dlq", ""),
            service_options={k[len("config.") :]: v for k, v in options.items() if k.startswith("config.")},
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            base_delay=self.backoff_min_s,
            max_delay=max(self.backoff_min_s, self.backoff_max_s),
            max_attempts=self.retries + 1,
        )


# -------------------------------------------------------------------------------------------------------
# Edges: how a stage hands a batch to one replica of a child stage.


class Edge:
    """Credit-controlled delivery to one child replica. `deliver` returns the child's BatchResult."""

    def __init__(self, dag_id: str, name: str, sidecar_id: str = "") -> None:
        self.dag_id = dag_id
        self.name = name
        self.sidecar_id = sidecar_id  # where the child replica runs
        # For the stage reports (the dashboard's per-edge view): see EdgeReport in control.proto.
        self.records_sent = 0
        self.starved_s = 0.0  # closed spans during which at least one sender waited for credits
        self._waiters = 0
        self._wait_started = 0.0
        self._sent_at: dict[int, float] = {}  # unanswered batches: token -> when sent (monotonic)
        self._tokens = itertools.count()

    async def deliver(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        raise NotImplementedError

    def credits_available(self) -> int:
        return 0

    def in_flight(self) -> int:
        return 0

    def oldest_in_flight(self, now: float) -> float:
        return now - min(self._sent_at.values()) if self._sent_at else 0.0

    def _sending(self) -> int:
        token = next(self._tokens)
        self._sent_at[token] = time.monotonic()
        return token

    def starved_seconds(self, now: float) -> float:
        """Starved time so far, the ongoing wait included: a stalled child shows at once, not when it ends."""
        return self.starved_s + (now - self._wait_started if self._waiters else 0.0)

    async def close(self) -> None:
        return None


class LocalEdge(Edge):
    """Both stages on this sidecar: an in-process call, with the same credit window as a remote edge."""

    def __init__(
        self,
        dag_id: str,
        name: str,
        target: Callable[[records_pb2.RawRecordBatch], Awaitable[BatchResult]],
        window: Credits,
    ) -> None:
        super().__init__(dag_id, name)
        self.target = target
        self.buffer = ReceiveBuffer(window)
        self.gate = AsyncCreditGate(CreditSender(window))
        first = self.buffer.open()
        self.gate.grant(first.records, first.nbytes)
        self._in_flight = 0

    def credits_available(self) -> int:
        return self.gate.sender.available.records

    def in_flight(self) -> int:
        return self._in_flight

    async def deliver(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        records, nbytes = batch.header.record_count, len(batch.records)
        await _acquire(self, self.gate, records, nbytes)
        self.buffer.on_received(records, nbytes)
        self.records_sent += records
        self._in_flight += 1
        token = self._sending()
        try:
            return await self.target(batch)
        finally:
            self._in_flight -= 1
            del self._sent_at[token]
            grant = self.buffer.on_consumed(records, nbytes)
            if not grant.is_zero:
                self.gate.grant(grant.records, grant.nbytes)
            CREDITS_AVAILABLE.labels(self.dag_id, self.name).set(self.gate.sender.available.records)


class RemoteEdge(Edge):
    """A SidecarDataPlane.ReceiveRecords stream to the sidecar running the child replica."""

    def __init__(
        self,
        dag_id: str,
        name: str,
        address: str,
        open_frame: dataplane_pb2.EdgeOpen,
        transport_config: TransportConfig,
    ) -> None:
        super().__init__(dag_id, name)
        self.address = address
        self.open_frame = open_frame
        self.transport_config = transport_config
        # The window is the receiver's: its first grant on every new stream says how large it is.
        self.gate = AsyncCreditGate(CreditSender(Credits(1, 1)))
        self._channel = open_channel(address, transport_config)
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[BatchResult]] = {}
        self._connect_lock = asyncio.Lock()

    def credits_available(self) -> int:
        return self.gate.sender.available.records

    def in_flight(self) -> int:
        return len(self._pending)

    async def _connect(self) -> None:
        async with self._connect_lock:
            if self._stream is not None and self._reader is not None and not self._reader.done():
                return
            from etlrouter._proto.v1 import dataplane_grpc

            stream = dataplane_grpc.SidecarDataPlaneStub(self._channel).ReceiveRecords.open()
            try:
                await stream.__aenter__()
                await stream.send_message(dataplane_pb2.DataFrame(open=self.open_frame))
                first = await stream.recv_message()
                if first is None or not (first.grant.records and first.grant.bytes):
                    raise EdgeBrokenError(f"edge {self.name} to {self.address}: no initial credit grant")
            except (GRPCError, StreamTerminatedError, OSError, EdgeBrokenError) as e:
                with contextlib.suppress(Exception):
                    await stream.__aexit__(None, None, None)
                raise EdgeBrokenError(f"cannot open edge {self.name} to {self.address}: {e!r}") from e
            window = Credits(first.grant.records, first.grant.bytes)
            gate = AsyncCreditGate(CreditSender(window))
            gate.grant(window.records, window.nbytes)
            self.gate = gate
            self._stream = stream
            self._reader = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: Any) -> None:
        error = "edge stream closed"
        try:
            while (frame := await stream.recv_message()) is not None:
                if frame.grant.records or frame.grant.bytes:
                    self.gate.grant(frame.grant.records, frame.grant.bytes)
                    CREDITS_AVAILABLE.labels(self.dag_id, self.name).set(self.gate.sender.available.records)
                for outcome in frame.outcomes:
                    fut = self._pending.pop(outcome.batch_id, None)
                    if fut is not None and not fut.done():
                        done = outcome.status == dataplane_pb2.BATCH_STATUS_DONE
                        fut.set_result(BatchResult(done, outcome.dead_lettered, outcome.error))
        except (GRPCError, StreamTerminatedError, OSError, ConnectionError) as e:
            error = f"edge stream to {self.address} broke: {e!r}"
        finally:
            self._stream = None
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_result(BatchResult.retry(error))
            self._pending.clear()

    async def deliver(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        await self._connect()
        records, nbytes = batch.header.record_count, len(batch.records)
        reader = self._reader
        assert reader is not None
        # Wait for credits, unless the stream dies first (the receiver refused the edge, or went away):
        # then the caller retries, reconnecting, instead of waiting for credits that will never come.
        gate = self.gate
        acquire = asyncio.ensure_future(_acquire(self, gate, records, nbytes))
        try:
            await asyncio.wait({acquire, reader}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Given up on (a shed deadline): the wait for credits must end too, or it would take credits
            # later for a batch never sent, and the edge would leak them until it had none left.
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
            if not acquire.cancelled() and acquire.exception() is None:
                gate.grant(records, nbytes)  # taken just before the cancellation: give them back
            raise
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
            raise EdgeBrokenError(f"edge {self.name} to {self.address} closed while waiting for credits")
        acquire.result()
        stream = self._stream
        if stream is None:
            raise EdgeBrokenError(f"edge {self.name} to {self.address} closed while waiting for credits")
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._pending[batch.header.batch_id] = fut
        self.records_sent += records
        token = self._sending()
        try:
            try:
                await stream.send_message(dataplane_pb2.DataFrame(batch=batch))
            except (GRPCError, StreamTerminatedError, OSError) as e:
                raise EdgeBrokenError(f"sending on edge {self.name} failed: {e!r}") from e
            return await fut
        finally:  # answered, failed, or given up on (a shed deadline): no longer pending either way
            del self._sent_at[token]
            if self._pending.get(batch.header.batch_id) is fut:
                del self._pending[batch.header.batch_id]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.cancel()
        self._channel.close()


async def _acquire(edge: Edge, gate: AsyncCreditGate, records: int, nbytes: int) -> None:
    started = time.monotonic()
    if edge._waiters == 0:
        edge._wait_started = started
    edge._waiters += 1
    try:
        await gate.acquire(records, nbytes)
    finally:
        now = time.monotonic()
        edge._waiters -= 1
        if edge._waiters == 0:
            edge.starved_s += now - edge._wait_started
        waited = now - started
        if waited > 0.001:
            STARVED.labels(edge.dag_id, edge.name).inc(waited)


# -------------------------------------------------------------------------------------------------------
# Stage runners.


@dataclass
class StageStats:
    records_in: int = 0
    records_out: int = 0
    errors: int = 0
    dead_lettered: int = 0
    watermark_ms: int = 0
    last_error: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    acked_records: int = 0
    acked_offsets: dict[int, int] = field(default_factory=dict)


class StageRunner:
    """One local replica of one stage."""

    def __init__(
        self, dag: DagRuntime, stage: control_pb2.StageSpec, replica: int, service: LocalService
    ) -> None:
        self.dag = dag
        self.stage = stage
        self.replica = replica
        self.service = service
        self.options = StageOptions.parse(dict(stage.options))
        self.client = ServiceClient(dag.engine.channel_for(service.endpoint))
        self.stats = StageStats()
        self.input_watermarks: WatermarkValve[str] = WatermarkValve()
        self.labels = (dag.dag_id, stage.id)
        self.rng = random.Random(hash((dag.dag_id, stage.id, replica)))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        raise NotImplementedError

    def note_input(self, batch: records_pb2.RawRecordBatch) -> None:
        self.stats.records_in += batch.header.record_count
        self.stats.bytes_in += len(batch.records)
        RECEIVED.labels(*self.labels).inc(batch.header.record_count)
        RECEIVED_BYTES.labels(*self.labels).inc(len(batch.records))
        self.dag.engine.tap(self.dag.dag_id, self.stage.id, batch)

    def note_watermark(self, sender: str, batch: records_pb2.RawRecordBatch) -> None:
        """The stage's event-time watermark is the minimum over its senders (the replicas of its parent)."""
        if not batch.header.watermark_ms:
            return
        output = self.input_watermarks.update(sender, StageWatermark(batch.header.watermark_ms / 1000))
        self.set_watermark(output)

    def set_watermark(self, watermark: StageWatermark) -> None:
        if watermark.value == NO_WATERMARK:
            return
        self.stats.watermark_ms = int(watermark.value * 1000)
        WATERMARK_LAG.labels(*self.labels).set(max(0.0, time.time() - watermark.value))

    async def call_with_retries(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run `call`, retrying transient failures with backoff; raise PermanentFailureError on giving up.

        Two kinds of transient failure: the service could not be reached at all (connection refused or
        reset: it is restarting) is retried for as long as it takes, since the data is fine and a DLQ would
        only fill up with good records; an error the service answered with counts against the stage's
        `retries`, after which the records go to the DLQ.
        """
        policy = self.options.retry_policy()
        answered_failures = unreachable = 0
        while True:
            try:
                return await asyncio.wait_for(call(), self.options.timeout_s)
            except (GRPCError, TimeoutError) as e:  # first: TimeoutError is an OSError since Python 3.11
                answered_failures += 1
                code = e.status.value if isinstance(e, GRPCError) else 4  # DEADLINE_EXCEEDED
                message = (
                    e.message if isinstance(e, GRPCError) else f"no answer within {self.options.timeout_s} s"
                )
                ERRORS.labels(*self.labels, e.status.name if isinstance(e, GRPCError) else "TIMEOUT").inc()
                self.stats.errors += 1
                self.stats.last_error = f"{what}: {message}"
                decision = policy.decide(answered_failures, classify_grpc_status(code), self.rng)
                if isinstance(decision, GiveUp):
                    raise PermanentFailureError(f"{what} failed ({decision.reason.value}): {message}") from e
                log.debug("retrying %s after %r", what, e)
                await asyncio.sleep(decision.delay)
            except (StreamTerminatedError, OSError) as e:
                unreachable += 1
                ERRORS.labels(*self.labels, "unreachable").inc()
                self.stats.last_error = f"{what}: service unreachable: {e!r}"
                if unreachable == 1 or unreachable % 50 == 0:
                    log.warning("%s: %s unreachable, retrying", what, self.service.endpoint)
                await asyncio.sleep(min(self.options.backoff_max_s, 0.05 * 2 ** min(unreachable, 6)))

    async def dead_letter(
        self,
        batch: records_pb2.RawRecordBatch,
        records: Sequence[records_pb2.Record],
        errors: Sequence[tuple[int, str, int]],
        reason: str,
        attempts: int = 1,
        stage: control_pb2.StageSpec | None = None,
    ) -> int:
        """Put records in the DLQ durably; `errors` holds (index into records, message, error class).

        The letters are filed under `stage` (default: this one), whose `dlq` option may name a sink service
        that receives them instead of the local store."""
        stage = stage or self.stage
        letters = []
        now_ms = int(time.time() * 1000)
        pipelines = list(stage.pipelines)
        for index, message, error_class in errors:
            letters.append(
                dataplane_pb2.DeadLetter(
                    pipeline=pipelines[0] if pipelines else "",
                    dag_id=self.dag.dag_id,
                    stage_id=stage.id,
                    service=stage.service,
                    error_class=error_class,  # type: ignore[arg-type]
                    error=message,
                    attempts=attempts,
                    failed_at_ms=now_ms,
                    source_id=batch.header.source_id,
                    partition=batch.header.partition,
                    batch_id=batch.header.batch_id,
                    record=records[index],
                    reason=reason,
                )
            )
        if letters:
            dlq_sink = (
                self.options.dlq if stage is self.stage else StageOptions.parse(dict(stage.options)).dlq
            )
            await self.dag.engine.put_dead_letters(letters, dlq_sink)
            DEAD_LETTERED.labels(*self.labels, reason).inc(len(letters))
            self.stats.dead_lettered += len(letters)
        return len(letters)

    async def dead_letter_all(
        self,
        batch: records_pb2.RawRecordBatch,
        message: str,
        reason: str,
        stage: control_pb2.StageSpec | None = None,
    ) -> int:
        records = decode_records(batch)
        permanent = int(records_pb2.ERROR_CLASS_PERMANENT)
        return await self.dead_letter(
            batch, records, [(i, message, permanent) for i in range(len(records))], reason, stage=stage
        )

    async def forward(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        """Send to every child branch; done when all are. Each branch retries on its own."""
        children = list(self.stage.downstream)
        if not children:
            return DONE
        SENT.labels(*self.labels).inc(batch.header.record_count * len(children))
        self.stats.records_out += batch.header.record_count
        self.stats.bytes_out += len(batch.records)
        results = await asyncio.gather(
            *(self.dag.deliver_to_branch(self, child, batch) for child in children)
        )
        return BatchResult(True, sum(r.dead_lettered for r in results))


class PermanentFailureError(Exception):
    pass


def is_push_source(service: LocalService) -> bool:
    """A source that declared Capabilities.push: it pushes batches in (PushRecords) and is never pulled."""
    if service.kind != "source" or not service.capabilities_proto:
        return False
    return records_pb2.Capabilities.FromString(service.capabilities_proto).push


class SourceRunner(StageRunner):
    """Pulls batches sized by the in-flight bound, routes them, and acknowledges what the ledger releases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ledger = AckLedger()
        # Batches pulled and not yet acknowledged. Twice one edge's window: a branch that hangs can hold a
        # full window of batches, and its siblings (and its own shed policy) still need room to work.
        window_batches = max(1, self.dag.engine.config.edge_buffer_records // max(1, self.options.batch_size))
        self.inflight = asyncio.Semaphore(2 * window_batches)
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._acks_due: dict[int, int] = {}
        self._last_offset: dict[tuple[str, int], int] = {}  # highest offset handed out, per partition
        self._acked: dict[int, int] = {}  # last offset acknowledged to the source, per partition
        config = self.dag.engine.config
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
            await asyncio.wait(self._deliveries, timeout=self.dag.engine.config.drain_timeout_ms / 1000)
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
        while not self._stopping:
            await self.inflight.acquire()
            try:
                request = services_pb2.PullRecordsRequest(
                    max_records=self.options.batch_size,
                    wait_ms=500,
                    rewind=rewind,
                    max_bytes=self.dag.engine.config.edge_buffer_bytes // 4,
                )
                reply = await asyncio.wait_for(self.client.pull(request), self.options.timeout_s)
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
                await asyncio.sleep(min(self.options.backoff_max_s, 0.05 * 2 ** min(failures, 6)))
                continue
            except asyncio.CancelledError:
                self.inflight.release()
                raise
            batch = reply.batch
            if not batch.records:
                self.inflight.release()
                self.end_of_stream = reply.end_of_stream
                if reply.end_of_stream:
                    await asyncio.sleep(0.5)
                continue
            if self._route(batch) is None:
                self.inflight.release()

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
        task = asyncio.ensure_future(self._deliver(batch, slot_held))
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

    async def _deliver(self, batch: records_pb2.RawRecordBatch, slot_held: bool = True) -> None:
        if not slot_held:
            await self.inflight.acquire()
        started = time.monotonic()
        try:

            async def branch(child: str) -> None:
                result = await self.dag.deliver_to_branch(self, child, batch)
                outcome = Outcome.WRITTEN_WITH_DLQ if result.dead_lettered else Outcome.WRITTEN
                self._queue_acks(
                    self.ledger.complete(batch.header.batch_id, child, outcome, result.dead_lettered)
                )

            SENT.labels(*self.labels).inc(batch.header.record_count * len(self.stage.downstream))
            self.stats.records_out += batch.header.record_count
            self.stats.bytes_out += len(batch.records)
            await asyncio.gather(*(branch(child) for child in self.stage.downstream))
            BATCH_SECONDS.labels(*self.labels).observe(time.monotonic() - started)
            await self._send_acks()
        finally:
            INFLIGHT.labels(*self.labels).set(self.ledger.pending_batches())
            self.inflight.release()

    def _queue_acks(self, acks: Sequence[Any]) -> None:
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
            newly = sum(o - self._acked.get(p, -1) for p, o in due.items())
            self._acked.update(due)
            ACKED.labels(*self.labels).inc(max(0, newly))
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
        # Records newly acknowledged: acks are cumulative, so count from this session's previous ack.
        newly = sum(o - self._acked.get(p, -1) for p, o in due.items())
        self._acked.update(due)
        self.stats.acked_records += max(0, newly)
        self.stats.acked_offsets = dict(self._acked)
        ACKED.labels(*self.labels).inc(max(0, newly))

    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        """A redriven batch entering at the source: route it as if pulled, without touching the ledger."""
        return await self.forward(batch)


class TransformRunner(StageRunner):
    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        self.note_input(batch)
        request = services_pb2.RawProcessBatchRequest(batch=batch, options=self.options.service_options)
        try:
            reply = await self.call_with_retries("ProcessBatch", lambda: self.client.process(request))
        except PermanentFailureError as e:
            return BatchResult(True, await self.dead_letter_all(batch, str(e), "error"))
        dead = 0
        transient = [err for err in reply.errors if err.error_class == records_pb2.ERROR_CLASS_TRANSIENT]
        if transient:
            return BatchResult.retry(f"transform reported {len(transient)} transient record errors")
        if reply.errors:
            records = decode_records(batch)
            dead = await self.dead_letter(
                batch,
                records,
                [(e.index, e.message, int(e.error_class)) for e in reply.errors if e.index < len(records)],
                "error",
            )
        out = records_pb2.RawRecordBatch(header=batch.header, records=reply.batch.records)
        out.header.record_count = reply.batch.header.record_count or count_records(out.records)
        out.header.byte_size = len(out.records)
        filtered = batch.header.record_count - out.header.record_count - dead
        if filtered > 0:
            DISCARDED.labels(*self.labels, "filtered", "true").inc(filtered)
        if out.header.record_count == 0:
            return BatchResult(True, dead)
        result = await self.forward(out)
        return BatchResult(result.done, result.dead_lettered + dead, result.error)


class LookupRunner(StageRunner):
    """Enrichment: looks each record's key up and copies the result's fields into its headers."""

    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        self.note_input(batch)
        records = decode_records(batch)
        key_name = self.options.lookup_key
        keys = [
            (r.headers[key_name].encode() if key_name and key_name in r.headers else r.key) for r in records
        ]
        lookup = services_pb2.BatchLookupRequest(keys=keys)
        stub = services_grpc.LookupServiceStub(self.dag.engine.channel_for(self.service.endpoint))
        try:
            reply = await self.call_with_retries("BatchLookup", lambda: stub.BatchLookup(lookup))
        except PermanentFailureError as e:
            return BatchResult(True, await self.dead_letter_all(batch, str(e), "error"))
        for record, result in zip(records, reply.results, strict=False):
            if result.found:
                for name, value in result.fields.items():
                    record.headers[f"{self.stage.service}.{name}"] = value
        out = records_pb2.RawRecordBatch(header=batch.header, records=encode_records(records))
        out.header.byte_size = len(out.records)
        return await self.forward(out)


class SinkRunner(StageRunner):
    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        self.note_input(batch)
        # Two sink stages may write the same source batch to one service (two branches ending in it): the id
        # the sink deduplicates on names the stage too.
        request = services_pb2.RawWriteBatchRequest(batch=batch, options=self.options.service_options)
        request.batch.header.batch_id = f"{self.stage.id}:{batch.header.batch_id}"
        try:
            reply = await self.call_with_retries("WriteBatch", lambda: self.client.write(request))
        except PermanentFailureError as e:
            return BatchResult(True, await self.dead_letter_all(batch, str(e), "error"))
        if any(e.error_class == records_pb2.ERROR_CLASS_TRANSIENT for e in reply.errors):
            return BatchResult.retry("sink reported transient record errors")
        dead = 0
        if reply.errors:
            records = decode_records(batch)
            dead = await self.dead_letter(
                batch,
                records,
                [(e.index, e.message, int(e.error_class)) for e in reply.errors if e.index < len(records)],
                "rejected",
            )
        flush = (
            self.options.flush if self.options.flush is not None else self.service.capabilities.requires_flush
        )
        if flush:
            try:
                await self.call_with_retries("Flush", lambda: self.client.flush(services_pb2.FlushRequest()))
            except PermanentFailureError as e:
                return BatchResult.retry(str(e))
        self.stats.records_out += reply.written
        self.stats.bytes_out += len(batch.records)
        SENT.labels(*self.labels).inc(reply.written)
        return BatchResult(True, dead)


_RUNNERS: dict[int, type[StageRunner]] = {
    control_pb2.SERVICE_KIND_SOURCE: SourceRunner,
    control_pb2.SERVICE_KIND_TRANSFORM: TransformRunner,
    control_pb2.SERVICE_KIND_LOOKUP: LookupRunner,
    control_pb2.SERVICE_KIND_SINK: SinkRunner,
}


# -------------------------------------------------------------------------------------------------------


class DagRuntime:
    """One assigned DAG on this sidecar: its spec, where every stage replica runs, and the local runners."""

    def __init__(self, engine: Engine, dag_id: str) -> None:
        self.engine = engine
        self.dag_id = dag_id
        self.spec = control_pb2.DagSpec()
        self.token = 0
        self.stages: dict[str, control_pb2.StageSpec] = {}
        self.placements: dict[str, list[control_pb2.StagePlacement]] = {}
        self.runners: dict[tuple[str, int], StageRunner] = {}
        self.edges: dict[tuple[str, str, int], Edge] = {}
        self._round_robin = itertools.count()

    def local_runner(self, stage_id: str) -> StageRunner | None:
        return next((r for (s, _), r in self.runners.items() if s == stage_id), None)

    def edge_to(self, from_stage: str, placement: control_pb2.StagePlacement) -> Edge:
        key = (from_stage, placement.stage_id, placement.replica)
        edge = self.edges.get(key)
        if edge is None:
            engine = self.engine
            name = f"{from_stage}->{placement.stage_id}#{placement.replica}"
            if placement.sidecar_id == engine.sidecar_id:
                window = Credits(engine.config.edge_buffer_records, engine.config.edge_buffer_bytes)
                edge = LocalEdge(
                    self.dag_id,
                    name,
                    functools.partial(
                        engine.receive,
                        self.dag_id,
                        placement.stage_id,
                        sender=f"{engine.sidecar_id}/{from_stage}",
                    ),
                    window,
                )
            else:
                open_frame = dataplane_pb2.EdgeOpen(
                    dag_id=self.dag_id,
                    stage_id=placement.stage_id,
                    from_stage_id=from_stage,
                    sender_sidecar_id=engine.sidecar_id,
                    fencing_token=self.token,
                )
                edge = RemoteEdge(
                    self.dag_id, name, placement.data_address, open_frame, engine.transport_config
                )
            edge.sidecar_id = placement.sidecar_id
            self.edges[key] = edge
        return edge

    async def deliver_to_branch(
        self, runner: StageRunner, child: str, batch: records_pb2.RawRecordBatch, may_shed: bool = True
    ) -> BatchResult:
        """Deliver a batch to one child stage (any replica), retrying until it is handled. A redrive passes
        `may_shed=False`: the operator asked for these records to go down this branch, so they wait."""
        child_spec = self.stages.get(child)
        shed_after = _shed_after(child_spec) if may_shed else None
        attempt = 0
        while True:
            targets = self.placements.get(child, [])
            if not targets:
                await asyncio.sleep(0.2)  # not placed yet (or its sidecar left): wait for the router
                continue
            target = targets[next(self._round_robin) % len(targets)]
            edge = self.edge_to(runner.stage.id, target)
            try:
                if shed_after is None:
                    result = await edge.deliver(batch)
                else:
                    result = await asyncio.wait_for(edge.deliver(batch), shed_after)
            except TimeoutError:
                # The branch lagged past its shed bound (waiting for credits or for its outcome): its copy
                # goes to the DLQ, counted. If the branch still writes it later: a duplicate, not a loss.
                DISCARDED.labels(self.dag_id, child, "shed", "true").inc(batch.header.record_count)
                # Filed under the branch's first stage, so a redrive sends them down that branch only.
                dead = await runner.dead_letter_all(
                    batch, f"branch {child} lagged past its shed bound", "shed", stage=child_spec
                )
                return BatchResult(True, dead)
            except EdgeBrokenError as e:
                result = BatchResult.retry(str(e))
            if result.done:
                return result
            attempt += 1
            ERRORS.labels(self.dag_id, runner.stage.id, "delivery_retry").inc()
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(attempt, 6)) * (0.5 + random.random() / 2))


def _edge_reports(dag: DagRuntime, stage_id: str, now: float) -> list[control_pb2.EdgeReport]:
    """The outgoing edges of a stage, the replicas of each child summed (starved time: the worst one)."""
    by_child: dict[str, control_pb2.EdgeReport] = {}
    for (from_stage, to_stage, _), edge in dag.edges.items():
        if from_stage != stage_id:
            continue
        report = by_child.setdefault(to_stage, control_pb2.EdgeReport(to_stage_id=to_stage))
        report.records_sent += edge.records_sent
        report.credits_available += max(0, edge.credits_available())
        report.starved_seconds_total = max(report.starved_seconds_total, edge.starved_seconds(now))
        report.in_flight_batches += edge.in_flight()
        report.oldest_in_flight_seconds = max(report.oldest_in_flight_seconds, edge.oldest_in_flight(now))
    return [by_child[k] for k in sorted(by_child)]


def _shed_after(spec: control_pb2.StageSpec | None) -> float | None:
    """None = block; else the seconds a batch for this branch may wait for credits before being shed."""
    if spec is None or not spec.shed_after_ms:
        return None
    return spec.shed_after_ms / 1000


class Engine:
    """The AssignmentTarget (driven by the cluster client) and the Redriver (driven by the admin API)."""

    def __init__(
        self,
        sidecar_id: str,
        config: SidecarConfig,
        transport_config: TransportConfig,
        dlq: DeadLetterSink,
        tap: Callable[[str, str, records_pb2.RawRecordBatch], None] | None = None,
    ) -> None:
        self.sidecar_id = sidecar_id
        self.config = config
        self.transport_config = transport_config
        self.dlq = dlq
        self._tap = tap
        self.services: dict[str, LocalService] = {}
        self.dags: dict[str, DagRuntime] = {}
        self._dlq_sinks: DlqSinkForwarder | None = None  # opened on the first letter for a DLQ sink
        self._channels: dict[str, Any] = {}
        self._started = time.monotonic()
        self._lock = asyncio.Lock()

    def set_services(self, services: Sequence[LocalService]) -> None:
        self.services = {s.name: s for s in services}

    def channel_for(self, endpoint: str) -> Any:
        if endpoint not in self._channels:
            self._channels[endpoint] = open_channel(endpoint, self.transport_config)
        return self._channels[endpoint]

    def tap(self, dag_id: str, stage_id: str, batch: records_pb2.RawRecordBatch) -> None:
        if self._tap is not None:
            self._tap(dag_id, stage_id, batch)

    async def put_dead_letters(self, letters: Sequence[dataplane_pb2.DeadLetter], dlq_sink: str = "") -> None:
        """Durably dead-letter: to the sink service `dlq_sink` when a stage names one, else (and whenever
        that sink fails) into the local store. Returns only once the letters are durable somewhere."""
        if dlq_sink:
            if self._dlq_sinks is None:
                self._dlq_sinks = DlqSinkForwarder(self.sidecar_id, self.config, self.transport_config)
            if await self._dlq_sinks.send(dlq_sink, letters):
                return
        await self.dlq.put(letters)

    # -- AssignmentTarget ------------------------------------------------------------------------------

    async def assign(self, fencing_token: int, command: control_pb2.Assign) -> None:
        async with self._lock:
            dag = self.dags.get(command.dag.id) or DagRuntime(self, command.dag.id)
            self.dags[dag.dag_id] = dag
            dag.spec, dag.token = command.dag, fencing_token
            dag.stages = {s.id: s for s in command.dag.stages}
            placements: dict[str, list[control_pb2.StagePlacement]] = {}
            for p in command.placements:
                placements.setdefault(p.stage_id, []).append(p)
            dag.placements = placements
            # Edges to replicas that moved or went away are closed; new ones open on demand.
            holder = {(p.stage_id, p.replica): p.sidecar_id for p in command.placements}
            for edge_key, edge in list(dag.edges.items()):
                _, stage_id, replica = edge_key
                if holder.get((stage_id, replica)) != edge.sidecar_id:
                    await edge.close()
                    del dag.edges[edge_key]
            wanted = {(p.stage_id, p.replica) for p in command.local}
            for runner_key in [k for k in dag.runners if k not in wanted]:
                await dag.runners.pop(runner_key).stop()
            for stage_id, replica in sorted(wanted - dag.runners.keys()):
                spec = dag.stages.get(stage_id)
                if spec is None:
                    continue
                service = self.services.get(spec.service)
                if service is None:
                    log.warning(
                        "assigned stage %s needs service %s, which is not here", stage_id, spec.service
                    )
                    continue
                runner = _RUNNERS[spec.kind](dag, spec, replica, service)
                dag.runners[(stage_id, replica)] = runner
                await runner.start()
            log.info(
                "assignment applied",
                extra={
                    "fields": {
                        "dag": dag.dag_id,
                        "token": fencing_token,
                        "local": sorted(f"{s}#{r}" for s, r in wanted),
                    }
                },
            )

    async def revoke(self, fencing_token: int, command: control_pb2.Revoke) -> None:
        async with self._lock:
            dag = self.dags.get(command.dag_id)
            if dag is None:
                return
            stages = set(command.stage_ids) or {s for s, _ in dag.runners}
            for key in [k for k in dag.runners if k[0] in stages]:
                await dag.runners.pop(key).stop()
            if not dag.runners and not command.stage_ids:
                for edge in dag.edges.values():
                    await edge.close()
                del self.dags[dag.dag_id]
            log.info(
                "revoked",
                extra={"fields": {"dag": command.dag_id, "token": fencing_token, "stages": sorted(stages)}},
            )

    def stage_reports(self) -> list[control_pb2.StageReport]:
        reports = []
        now, wall_ms = time.monotonic(), int(time.time() * 1000)
        for dag in self.dags.values():
            reported_edges: set[str] = set()
            for (stage_id, _), runner in sorted(dag.runners.items()):
                s = runner.stats
                report = control_pb2.StageReport(
                    dag_id=dag.dag_id,
                    stage_id=stage_id,
                    records_in=s.records_in,
                    records_out=s.records_out,
                    errors=s.errors,
                    dead_lettered=s.dead_lettered,
                    watermark_ms=s.watermark_ms,
                    fencing_token=dag.token,
                    health=control_pb2.HEALTH_SERVING,
                    last_error=s.last_error,
                    bytes_in=s.bytes_in,
                    bytes_out=s.bytes_out,
                    acked_records=s.acked_records,
                    acked_offsets=s.acked_offsets,
                    reported_at_ms=wall_ms,
                )
                # Local replicas of one stage share their edges: reported once, with the first replica.
                if stage_id not in reported_edges:
                    reported_edges.add(stage_id)
                    report.edges.extend(_edge_reports(dag, stage_id, now))
                reports.append(report)
        return reports

    def load(self) -> control_pb2.SidecarLoad:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        running = sum(len(d.runners) for d in self.dags.values())
        total_in = sum(r.stats.records_in for d in self.dags.values() for r in d.runners.values())
        elapsed = max(1e-3, time.monotonic() - self._started)
        return control_pb2.SidecarLoad(
            records_per_second=total_in / elapsed,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            rss_bytes=usage.ru_maxrss * 1024,
            running_stages=running,
        )

    # -- receiving ---------------------------------------------------------------------------------------

    async def receive(
        self, dag_id: str, stage_id: str, batch: records_pb2.RawRecordBatch, sender: str = ""
    ) -> BatchResult:
        """Handle a batch for a local stage; `sender` (sidecar/stage) keys the stage's input watermarks."""
        dag = self.dags.get(dag_id)
        runner = dag.local_runner(stage_id) if dag is not None else None
        if runner is None:
            return BatchResult.retry(f"stage {stage_id} of {dag_id} does not run on {self.sidecar_id}")
        runner.note_watermark(sender, batch)
        try:
            return await runner.handle(batch)
        except Exception as e:  # a bug or an unexpected failure: the sender retries, nothing is lost
            log.exception("stage %s failed on batch %s", stage_id, batch.header.batch_id)
            return BatchResult.retry(f"{type(e).__name__}: {e}")

    def runs(self, dag_id: str, stage_id: str) -> bool:
        dag = self.dags.get(dag_id)
        return dag is not None and dag.local_runner(stage_id) is not None

    async def redrive(self, dag_id: str, stage_id: str, letters: Sequence[dataplane_pb2.DeadLetter]) -> int:
        dag = self.dags.get(dag_id)
        runner = dag.local_runner(stage_id) if dag is not None else None
        # A stage that runs elsewhere (a branch whose copies were shed here) is reached from its parent,
        # which runs here, like any batch sent down that branch.
        parent = None
        if dag is not None and runner is None and stage_id in dag.stages:
            parent = next((r for (s, _), r in dag.runners.items() if stage_id in r.stage.downstream), None)
        if dag is None or (runner is None and parent is None):
            raise LookupError(f"stage {stage_id} of {dag_id} does not run on this sidecar")
        batch = records_pb2.RawRecordBatch(records=encode_records([letter.record for letter in letters]))
        batch.header.batch_id = f"redrive/{letters[0].id}/{len(letters)}" if letters else "redrive"
        batch.header.record_count = len(letters)
        batch.header.byte_size = len(batch.records)
        batch.header.attempt = 1
        if runner is not None:
            result = await runner.handle(batch)
        else:
            assert parent is not None
            result = await dag.deliver_to_branch(parent, stage_id, batch, may_shed=False)
        if not result.done:
            raise RuntimeError(f"redrive into {stage_id} did not complete: {result.error}")
        return len(letters)

    async def close(self) -> None:
        for dag_id in list(self.dags):
            await self.revoke(0, control_pb2.Revoke(dag_id=dag_id))
        for channel in self._channels.values():
            channel.close()
        if self._dlq_sinks is not None:
            self._dlq_sinks.close()
