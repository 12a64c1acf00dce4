"""Stage runners: one local replica of one stage, calling its user service and passing batches on.

A runner knows its stage, its service and its host (`StageHost`, model.py: the DAG it belongs to on this
sidecar), never the engine: it asks the host for channels, the tap, the DLQ, and delivery to a child branch.
The source runner (pulling, push mode, acks) is in source.py; transforms, lookups and sinks are here.

What the counters mean (each counted in one place, `note_input` / `note_output` / `dead_letter`):

- records in (`etlrouter_component_received_events_total`, StageStats.records_in): records handed to the
  stage, a batch delivered again (a retry from upstream) counted again;
- records out (`etlrouter_component_sent_events_total`, StageStats.records_out): records the stage passed
  on, each record once however many child branches it goes to (what each branch got is its edge's
  `records_sent`); for a sink, the records the service wrote;
- dead-lettered (`etlrouter_dlq_written_events_total`, StageStats.dead_lettered): records this stage put in
  a DLQ, whichever stage they are filed under (a shed copy is filed under the branch's stage).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client import Counter, Gauge

from etlrouter._proto.v1 import control_pb2, dataplane_pb2, records_pb2, services_pb2
from etlrouter.core import tracing
from etlrouter.core.metrics import REGISTRY
from etlrouter.dsl.options import parse_duration_ms
from etlrouter.flow.retry import Backoff, GiveUp, RetryPolicy, classify_grpc_status
from etlrouter.flow.watermarks import NO_WATERMARK, StageWatermark, WatermarkValve
from etlrouter.sidecar.model import DONE, BatchResult, BranchShedError, LocalService, StageHost
from etlrouter.sidecar.wire import (
    ServiceClient,
    UndecodableBatchError,
    count_records,
    decode_records,
    encode_records,
    raw_batch_record,
)

log = logging.getLogger(__name__)

R = TypeVar("R")

RECEIVED = Counter(
    "etlrouter_component_received_events_total",
    "Records handed to a stage (a batch delivered again after a retry counts again).",
    ["dag", "stage"],
    registry=REGISTRY,
)
SENT = Counter(
    "etlrouter_component_sent_events_total",
    "Records a stage passed on, each once however many branches it goes to (a branch's share: its edge's"
    " records_sent); for a sink, records written.",
    ["dag", "stage"],
    registry=REGISTRY,
)
RECEIVED_BYTES = Counter(
    "etlrouter_component_received_bytes_total",
    "Encoded bytes handed to a stage.",
    ["dag", "stage"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "etlrouter_component_errors_total",
    "Failed attempts, by stage and error type: calls to the stage's service (a gRPC status, TIMEOUT,"
    " unreachable), pulls (pull_failed), deliveries to a branch (delivery_retry). Failed records are"
    " counted by etlrouter_dlq_written_events_total.",
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
    "Records a stage wrote to the dead-letter queue.",
    ["dag", "stage", "reason"],
    registry=REGISTRY,
)
WATERMARK_LAG = Gauge(
    "etlrouter_watermark_lag_seconds",
    "Now minus the stage's event-time watermark.",
    ["dag", "stage"],
    registry=REGISTRY,
)

# A service that cannot be reached (restarting) is polled 0.1, 0.2, ... 3.2 s apart, at most the stage's
# backoff ceiling: its records are fine, so this never gives up.
UNREACHABLE_CAP_S = 3.2


class PermanentFailureError(Exception):
    pass


# -------------------------------------------------------------------------------------------------------
# Stage options: the DSL's per-stage options; `config.*` ones go to the service untouched.


@dataclass(frozen=True, slots=True)
class StageOptions:
    batch_size: int = 1000
    retries: int = 5
    backoff_min_s: float = 0.05
    backoff_max_s: float = 5.0
    timeout_s: float = 30.0
    linger_s: float = 0.0  # a source: how long a short batch may wait for the batches in flight (source.py)
    max_inflight: int = 0  # a source: batches pulled and not yet acknowledged; 0 = two edge windows
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
            linger_s=seconds(options["linger"]) if "linger" in options else 0.0,
            max_inflight=int(options.get("max_inflight", 0)),
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

    def unreachable_backoff(self) -> Backoff:
        """Between attempts to reach a service that is not there (unbounded): no jitter, one caller."""
        cap = min(self.backoff_max_s, UNREACHABLE_CAP_S)
        return Backoff(base=min(0.1, cap), cap=cap, jitter=0.0)


@dataclass
class StageStats:
    """One replica's counts since it started, for the stage reports (meanings: the module's docstring)."""

    records_in: int = 0
    records_out: int = 0
    errors: int = 0  # failed calls to the service that count against `retries`, and failed pulls
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
        self, host: StageHost, stage: control_pb2.StageSpec, replica: int, service: LocalService
    ) -> None:
        self.host = host
        self.stage = stage
        self.replica = replica
        self.service = service
        self.options = StageOptions.parse(dict(stage.options))
        self.client = ServiceClient(host.channel_for(service.endpoint))
        # The hooks a batch goes through; tracing (sidecar/tracing.py) swaps them for traced ones here, once,
        # so that with tracing off a batch runs no tracing code at all.
        self.receive: Callable[[records_pb2.RawRecordBatch], Awaitable[BatchResult]] = self.handle
        self.to_branch: Callable[..., Awaitable[BatchResult]] = host.deliver_to_branch
        self.put_dead_letters: Callable[[Sequence[dataplane_pb2.DeadLetter], str], Awaitable[None]] = (
            host.put_dead_letters
        )
        if tracing.TRACER is not None:
            from etlrouter.sidecar import tracing as traced

            traced.instrument(self)
        self.stats = StageStats()
        self.input_watermarks: WatermarkValve[str] = WatermarkValve()
        self.labels = (host.dag_id, stage.id)
        self.rng = random.Random(hash((host.dag_id, stage.id, replica)))
        self.unreachable_backoff = self.options.unreachable_backoff()
        # The per-batch metrics, resolved once (a labels() lookup per batch is measurable on the hot path).
        self._received = RECEIVED.labels(*self.labels)
        self._received_bytes = RECEIVED_BYTES.labels(*self.labels)
        self._sent = SENT.labels(*self.labels)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        raise NotImplementedError

    def note_input(self, batch: records_pb2.RawRecordBatch) -> None:
        """Count a batch handed to this stage, and offer it to the taps."""
        nbytes = len(batch.records)  # a copy of the records (upb): once
        self.stats.records_in += batch.header.record_count
        self.stats.bytes_in += nbytes
        self._received.inc(batch.header.record_count)
        self._received_bytes.inc(nbytes)
        self.host.tap(self.stage.id, batch)

    def note_output(self, records: int, nbytes: int) -> None:
        """Count records passed on (once, however many branches) or, for a sink, written."""
        self.stats.records_out += records
        self.stats.bytes_out += nbytes
        self._sent.inc(records)

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

    async def call_with_retries(self, what: str, call: Callable[[], Awaitable[R]]) -> R:
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
                await asyncio.sleep(self.unreachable_backoff.delay(unreachable, self.rng))

    async def call_or_dead_letter(
        self, what: str, call: Callable[[], Awaitable[R]], batch: records_pb2.RawRecordBatch
    ) -> R | BatchResult:
        """The service's reply, or, once the call failed for good, the batch's outcome: every record in the
        DLQ (reason "error"), done."""
        try:
            return await self.call_with_retries(what, call)
        except PermanentFailureError as e:
            return BatchResult(True, await self.dead_letter_all(batch, str(e), "error"))

    async def dead_letter_failed_records(
        self,
        batch: records_pb2.RawRecordBatch,
        errors: Sequence[records_pb2.RecordError],
        reason: str,
        what: str,
    ) -> int | BatchResult:
        """The per-record errors a reply reported: how many records went to the DLQ, or a RETRY outcome
        when one failed transiently (the whole batch is sent again)."""
        if not errors:
            return 0
        transient = sum(1 for e in errors if e.error_class == records_pb2.ERROR_CLASS_TRANSIENT)
        if transient:
            return BatchResult.retry(f"{what} reported {transient} transient record errors")
        try:
            records = decode_records(batch)
        except UndecodableBatchError as e:
            return await self.dead_letter_undecodable(batch, str(e))
        failed = [(e.index, e.message, int(e.error_class)) for e in errors if e.index < len(records)]
        return await self.dead_letter(batch, records, failed, reason)

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
                    dag_id=self.host.dag_id,
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
            await self.put_dead_letters(letters, dlq_sink)
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
        permanent = int(records_pb2.ERROR_CLASS_PERMANENT)
        try:
            records = decode_records(batch)
        except UndecodableBatchError as e:
            records, message, reason = [raw_batch_record(batch)], f"{message}; {e}", "undecodable"
        return await self.dead_letter(
            batch, records, [(i, message, permanent) for i in range(len(records))], reason, stage=stage
        )

    async def dead_letter_undecodable(self, batch: records_pb2.RawRecordBatch, error: str) -> int:
        """A batch whose records do not decode: one letter with its raw bytes (retrying cannot help)."""
        permanent = int(records_pb2.ERROR_CLASS_PERMANENT)
        return await self.dead_letter(
            batch, [raw_batch_record(batch)], [(0, error, permanent)], "undecodable"
        )

    async def deliver_to_branch(
        self, child: str, batch: records_pb2.RawRecordBatch, may_shed: bool = True
    ) -> BatchResult:
        """Deliver to one child branch until it is handled; a copy the branch's shed policy gave up on goes
        to the DLQ, filed under the branch's stage so a redrive sends it down that branch only. A redrive
        passes `may_shed=False`: the operator asked for these records to go down this branch, so they wait."""
        try:
            return await self.to_branch(self.stage.id, child, batch, self.rng, may_shed)
        except BranchShedError as e:
            # If the branch still writes its copy later: a duplicate, not a loss.
            DISCARDED.labels(self.host.dag_id, child, "shed", "true").inc(batch.header.record_count)
            dead = await self.dead_letter_all(batch, str(e), "shed", stage=self.host.stage_spec(child))
            return BatchResult(True, dead)

    async def forward(
        self,
        batch: records_pb2.RawRecordBatch,
        branch_done: Callable[[str, BatchResult], None] | None = None,
    ) -> BatchResult:
        """Send to every child branch; done when all are (each branch retries on its own). `branch_done` is
        told each branch's outcome as it arrives (the source's ack ledger)."""
        children = self.stage.downstream
        if not children:
            return DONE
        self.note_output(batch.header.record_count, len(batch.records))

        async def branch(child: str) -> BatchResult:
            result = await self.deliver_to_branch(child, batch)
            if branch_done is not None:
                branch_done(child, result)
            return result

        results = await asyncio.gather(*(branch(child) for child in children))
        return BatchResult(True, sum(r.dead_lettered for r in results))


class TransformRunner(StageRunner):
    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        self.note_input(batch)
        request = services_pb2.RawProcessBatchRequest(batch=batch, options=self.options.service_options)
        reply = await self.call_or_dead_letter("ProcessBatch", lambda: self.client.process(request), batch)
        if isinstance(reply, BatchResult):
            return reply
        dead = await self.dead_letter_failed_records(batch, reply.errors, "error", "transform")
        if isinstance(dead, BatchResult):
            return dead
        # The answer's batch, with the input's header: reading `records` copies them (upb), so once.
        out, records = reply.batch, reply.batch.records
        said = out.header.record_count
        out.header.CopyFrom(batch.header)
        out.header.record_count = said or count_records(records)
        out.header.byte_size = len(records)
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
        reply = await self.call_or_dead_letter("BatchLookup", lambda: self.client.lookup(lookup), batch)
        if isinstance(reply, BatchResult):
            return reply
        for record, result in zip(records, reply.results, strict=False):
            if result.found:
                for name, value in result.fields.items():
                    record.headers[f"{self.stage.service}.{name}"] = value
        encoded = encode_records(records)
        out = records_pb2.RawRecordBatch(header=batch.header, records=encoded)
        out.header.byte_size = len(encoded)
        return await self.forward(out)


class SinkRunner(StageRunner):
    async def handle(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        self.note_input(batch)
        # Two sink stages may write the same source batch to one service (two branches ending in it): the id
        # the sink deduplicates on names the stage too.
        request = services_pb2.RawWriteBatchRequest(batch=batch, options=self.options.service_options)
        request.batch.header.batch_id = f"{self.stage.id}:{batch.header.batch_id}"
        reply = await self.call_or_dead_letter("WriteBatch", lambda: self.client.write(request), batch)
        if isinstance(reply, BatchResult):
            return reply
        dead = await self.dead_letter_failed_records(batch, reply.errors, "rejected", "sink")
        if isinstance(dead, BatchResult):
            return dead
        flush = (
            self.options.flush if self.options.flush is not None else self.service.capabilities.requires_flush
        )
        if flush:
            try:
                await self.call_with_retries("Flush", lambda: self.client.flush(services_pb2.FlushRequest()))
            except PermanentFailureError as e:
                return BatchResult.retry(str(e))
        self.note_output(reply.written, len(batch.records))
        return BatchResult(True, dead)
