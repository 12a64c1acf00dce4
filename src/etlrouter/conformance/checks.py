"""The contract checks, kind by kind. Each check drives the service through a `Session` (the I/O edge),
hands what came back to a pure judgement (`judge`) and returns `Result`s; a check never raises for anything
the service does.

The kit changes the state of the service: it pulls and acknowledges records of a source, writes batches to
a sink. Point it at a test instance (see docs/conformance.md).
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from etlrouter._proto.v1 import records_pb2, services_pb2
from etlrouter.conformance import judge
from etlrouter.conformance.calls import CallFailed, Session
from etlrouter.conformance.model import Result, Status, fail, ok, skip, verdict, warn
from etlrouter.connectors.generator import GeneratorConfig, make_record
from etlrouter.core.config import TransportConfig
from etlrouter.sdk.records import Record, records_to_proto

PIPELINE_BATCH = (
    1000  # the sidecar's default batch_size: what a stage sends when the service has no preference
)
PROBE_RECORDS = 50  # records per pull in the source checks
UNKNOWN_PARTITIONS = 1 << 16
POISON = b"\xff\xfe not JSON, not UTF-8 \x00"


@dataclass
class Options:
    timeout_s: float = 30.0  # the pipeline's per-call timeout (a stage's `timeout` option, 30 s by default)
    slack_s: float = 1.0  # how much later than asked a long poll or a call after a cancellation may answer
    kinds: tuple[str, ...] = ()  # check these kinds even when reflection does not list them
    stage_options: dict[str, str] = field(default_factory=dict)
    records: list[Record] | None = None  # what transforms and sinks get; default: generator-like JSON
    keys: list[bytes] = field(default_factory=list)  # lookup keys that exist
    verify_command: str | None = None  # prints how many records of batch {batch_id} the sink holds
    transport_config: TransportConfig | None = None

    def sample(self) -> list[Record]:
        if self.records:
            return list(self.records)
        config = GeneratorConfig(seed=19, record_size=120)
        return [make_record(config, 0, offset) for offset in range(20)]


def _batch(records: Sequence[Record], batch_id: str, attempt: int = 1) -> records_pb2.RecordBatch:
    record_list = records_to_proto(records)
    header = records_pb2.BatchHeader(
        batch_id=batch_id,
        record_count=len(records),
        byte_size=record_list.ByteSize(),
        source_id="conformance",
        attempt=attempt,
    )
    if records:
        header.first_offset, header.last_offset = records[0].offset, records[-1].offset
    return records_pb2.RecordBatch(header=header, records=record_list)


def _scaled(records: Sequence[Record], count: int) -> list[Record]:
    """`count` records cycling through the samples, with fresh increasing offsets."""
    base = records or [Record(b"k", b"{}")]
    out: list[Record] = []
    for i in range(count):
        r = base[i % len(base)]
        out.append(Record(r.key, r.value, r.headers, r.event_time_ms, 1_000_000 + i))
    return out


def _batch_limit(caps: records_pb2.Capabilities | None) -> int:
    return (caps.max_batch_records if caps and caps.max_batch_records else 0) or PIPELINE_BATCH


def _new_id(what: str) -> str:
    return f"conformance-{what}-{uuid.uuid4().hex[:12]}"


# --- common ------------------------------------------------------------------------------------------


async def check_capabilities(session: Session, kind: str) -> tuple[Result, records_pb2.Capabilities | None]:
    """The check and the capabilities to go by: the declared ones, the defaults when UNIMPLEMENTED, None
    when GetCapabilities fails (then what they would claim is not judged)."""
    check = f"{kind}.capabilities"
    expected = "GetCapabilities answers the same Capabilities twice (UNIMPLEMENTED: the defaults)"
    try:
        first = await session.capabilities(kind)
        second = await session.capabilities(kind)
    except CallFailed as e:
        return fail(check, expected, str(e)), None
    if first is None:  # the defaults apply, as in the sidecar
        defaults = records_pb2.Capabilities()
        return warn(
            check, "GetCapabilities answered", "UNIMPLEMENTED: the sidecar assumes the defaults"
        ), defaults
    if second is None or first.SerializeToString(deterministic=True) != second.SerializeToString(
        deterministic=True
    ):
        return fail(check, expected, "two calls answered different capabilities"), first
    if first.name and not (0 < len(first.name) <= 253 and first.name == first.name.strip()):
        return warn(check, "a name the router accepts", f"name {first.name[:60]!r} is ignored"), first
    claims = [
        name for name in ("requires_flush", "idempotent_writes", "one_to_one", "push") if getattr(first, name)
    ]
    summary = f"name={first.name or '-'} partitions={first.partitions or 1}"
    summary += f" max_batch_records={first.max_batch_records}" + (f" {' '.join(claims)}" if claims else "")
    return ok(check, "GetCapabilities answered", summary), first


def check_deadlines(session: Session, timeout_s: float) -> Result:
    expected = f"every call answered within the pipeline's timeout of {timeout_s:g} s"
    late = [t for t in session.timings if t.seconds > timeout_s]
    if not session.timings:
        return skip("deadlines", "no call was made")
    slowest = max(session.timings, key=lambda t: t.seconds)
    if late:
        return fail(
            "deadlines",
            expected,
            f"{len(late)} calls later, the slowest {slowest.method} {slowest.seconds:.2f} s",
        )
    return ok(
        "deadlines",
        expected,
        f"{len(session.timings)} calls, slowest {slowest.method} {slowest.seconds:.3f} s",
    )


async def _responsive_after(
    session: Session, kind: str, options: Options, check: str, probe_partition: int = 0
) -> Result:
    """After cancelled calls, the service answers a fresh call within the slack."""
    expected = f"after calls cancelled by their deadline, a new call answered within {options.slack_s:g} s"
    started = time.monotonic()
    try:
        if kind == "source":  # through the data path a cancelled pull may still hold
            request = services_pb2.PullRecordsRequest(max_records=1, partitions=[probe_partition])
            await session.call(kind, "PullRecords", request, timed=False)
        else:
            await session.call(kind, "GetCapabilities", records_pb2.GetCapabilitiesRequest(), timed=False)
    except CallFailed as e:
        if e.status in ("DEADLINE_EXCEEDED", "StreamTerminatedError", "ConnectionError", "OSError"):
            return fail(check, expected, str(e))
        # Any other answer is an answer: this check is about time (other checks judge the statuses).
    took = time.monotonic() - started
    if took > options.slack_s:
        return fail(check, expected, f"it took {took:.2f} s (cancelled work still holding the service?)")
    return ok(check, expected, f"{took * 1000:.0f} ms")


# --- source ------------------------------------------------------------------------------------------


@dataclass
class _SourceState:
    partition: int = 0
    first: list[records_pb2.Record] = field(default_factory=list)  # the first pull of a fresh session
    second: list[records_pb2.Record] = field(default_factory=list)  # the pull after it
    acked: int | None = None
    resume: records_pb2.Record | None = None  # the first record delivered after `acked`
    rewind_works: bool = False
    highest: int = 0  # the highest offset of the partition the kit has seen

    def saw(self, records: Sequence[records_pb2.Record]) -> None:
        if records:
            self.highest = max(self.highest, records[-1].offset)


async def _pull(
    session: Session,
    *,
    max_records: int = PROBE_RECORDS,
    max_bytes: int = 0,
    wait_ms: int = 0,
    partitions: Sequence[int] = (),
    rewind: bool = False,
    timeout: float | None = None,
    timed: bool = True,
) -> services_pb2.PullRecordsResponse:
    request = services_pb2.PullRecordsRequest(
        max_records=max_records, max_bytes=max_bytes, wait_ms=wait_ms, partitions=partitions, rewind=rewind
    )
    reply: services_pb2.PullRecordsResponse = await session.call(
        "source", "PullRecords", request, timeout=timeout, timed=timed
    )
    return reply


async def _ack(session: Session, partition: int, offset: int) -> None:
    request = services_pb2.AcknowledgeRequest(
        acks=[services_pb2.PartitionAck(partition=partition, up_to_offset=offset)]
    )
    await session.call("source", "Acknowledge", request)


async def _pull_some(session: Session, partition: int, rewind: bool) -> list[records_pb2.Record]:
    """The first non-empty pull of a partition (a few tries with a long poll), as a list."""
    for attempt in range(3):
        reply = await _pull(session, partitions=[partition], rewind=rewind and attempt == 0, wait_ms=500)
        if reply.batch.records.records:
            return list(reply.batch.records.records)
    return []


def _starts(records: Sequence[records_pb2.Record]) -> str:
    return f"offset {records[0].offset}" if records else "no records"


async def source_checks(
    session: Session, caps: records_pb2.Capabilities | None, options: Options
) -> list[Result]:
    if caps is not None and caps.push:
        return await _push_source_checks(session)
    # Unknown when GetCapabilities failed: then partition numbers are not judged, and a partition far
    # beyond any plausible count stands for one the source does not have.
    partitions = (caps.partitions or 1) if caps is not None else UNKNOWN_PARTITIONS
    empty_part = partitions
    results: list[Result] = []
    state = _SourceState()

    # offsets: a fresh session (rewind), then a few pulls of any partition.
    expected = "offsets strictly increase per partition, headers describe their records"
    batches: list[records_pb2.RecordBatch] = []
    problems: list[str] = []
    try:
        for n in range(5):
            reply = await _pull(session, rewind=n == 0, wait_ms=500)
            batches.append(reply.batch)
            problems += judge.source_batch_problems(reply.batch, partitions, [])
    except CallFailed as e:
        problems.append(str(e))
    problems += judge.across_batches_problems(batches)
    got = [b for b in batches if b.records.records]
    if not problems and not got:
        results.append(warn("source.offsets", expected, "the source gave no records in 5 pulls"))
        return (
            results
            + [skip(c, "the source gave no records") for c in _SOURCE_STATEFUL]
            + await _source_stateless(session, partitions, options, state)
        )
    counted = sum(len(b.records.records) for b in got)
    results.append(verdict(problems, "source.offsets", expected, f"{counted} records in {len(got)} pulls"))
    state.partition = got[0].header.partition if got else 0
    for b in got:
        if b.header.partition == state.partition:
            state.saw(b.records.records)

    results.append(await _rewind(session, state))
    for ack_check in (_ack_old(session, state), _ack_unknown(session, state, empty_part)):
        result = await ack_check
        results.append(result)
        if result.status is Status.FAIL:
            state.rewind_works = False  # its acknowledged offset is not what the kit thinks any more
    return results + await _source_stateless(session, partitions, options, state)


_SOURCE_STATEFUL = ("source.rewind", "source.ack-old", "source.ack-unknown")


async def _rewind(session: Session, state: _SourceState) -> Result:
    check = "source.rewind"
    expected = "a new session (rewind) without acks redelivers from the last acknowledged offset"
    p = state.partition
    try:
        state.first = await _pull_some(session, p, rewind=True)
        state.second = await _pull_some(session, p, rewind=False)
        state.saw(state.first)
        state.saw(state.second)
        if not state.first or not state.second:
            return warn(check, expected, f"partition {p} gave fewer than two batches: not checked")
        again = await _pull_some(session, p, rewind=True)
        state.saw(again)
        if not again or not judge.same_record(again[0], state.first[0]):
            return fail(
                check, f"{expected} (offset {state.first[0].offset}, the same record)", f"{_starts(again)}"
            )
        # Acknowledge the first batch: the next session starts after it.
        state.acked = state.first[-1].offset
        await _ack(session, p, state.acked)
        after = await _pull_some(session, p, rewind=True)
        state.saw(after)
        want = next((r for r in state.second if r.offset > state.acked), state.second[-1])
        state.resume = want
        if not after or not judge.same_record(after[0], want):
            return fail(
                check,
                f"after an ack up to {state.acked}, a new session starts at offset {want.offset}",
                _starts(after),
            )
    except CallFailed as e:
        return fail(check, expected, str(e))
    state.rewind_works = True
    return ok(
        check, expected, f"partition {p}: acked {state.acked}, the next session starts at {want.offset}"
    )


def _resume(state: _SourceState) -> int:
    assert state.resume is not None
    return state.resume.offset


async def _restart_point(session: Session, state: _SourceState) -> list[records_pb2.Record]:
    return await _pull_some(session, state.partition, rewind=True)


async def _ack_old(session: Session, state: _SourceState) -> Result:
    check = "source.ack-old"
    if not state.rewind_works or state.acked is None:
        return skip(check, "needs a working rewind")
    expected = "repeated and older acknowledgements answer OK and move nothing back"
    p = state.partition
    older = state.first[0].offset
    try:
        await _ack(session, p, state.acked)
        await _ack(session, p, older)
    except CallFailed as e:
        return fail(check, expected, f"an ack up to {older} after one up to {state.acked}: {e}")
    try:
        after = await _restart_point(session, state)
    except CallFailed as e:
        return fail(check, expected, str(e))
    want = _resume(state)
    if not after or after[0].offset != want:
        return fail(check, f"a new session still starts at offset {want}", _starts(after))
    return ok(check, expected)


async def _ack_unknown(session: Session, state: _SourceState, unknown_partition: int) -> Result:
    check = "source.ack-unknown"
    if not state.rewind_works or state.acked is None:
        return skip(check, "needs a working rewind")
    expected = "acks of offsets never delivered or of unknown partitions skip nothing (an error is fine)"
    p = state.partition
    answers: list[str] = []
    for partition, offset in ((p, state.highest + 1_000_000), (unknown_partition, 0)):
        try:
            await _ack(session, partition, offset)
            answers.append("OK")
        except CallFailed as e:
            answers.append(e.status)
    try:
        after = await _restart_point(session, state)
    except CallFailed as e:
        return fail(check, expected, f"the source stopped serving after them: {e}")
    want = _resume(state)
    if not after or after[0].offset != want:
        return fail(
            check,
            f"a new session still starts at offset {want}",
            f"{_starts(after)} after an ack up to {state.highest + 1_000_000} answered {answers[0]}",
        )
    return ok(check, expected, "answered " + ", ".join(answers))


async def _source_stateless(
    session: Session, partitions: int, options: Options, state: _SourceState
) -> list[Result]:
    results: list[Result] = []
    p = state.partition
    # batch limits
    expected = "max_records and max_bytes are upper bounds"
    problems: list[str] = []
    try:
        for max_records, max_bytes in ((3, 0), (1000, 2048)):
            reply = await _pull(
                session, partitions=[p], max_records=max_records, max_bytes=max_bytes, wait_ms=200
            )
            problems += judge.size_problems(reply.batch, max_records, max_bytes)
    except CallFailed as e:
        problems.append(str(e))
    results.append(verdict(problems, "source.batch-limits", expected))
    # a large pull
    expected = "a pull of max_records=100000 answers within the timeout, in one message"
    try:
        started = time.monotonic()
        reply = await _pull(session, partitions=[p], max_records=100_000, timed=False)
        took = time.monotonic() - started
        n = len(reply.batch.records.records)
        if took > options.timeout_s:
            results.append(fail("source.large-pull", expected, f"{n} records after {took:.2f} s"))
        else:
            results.append(ok("source.large-pull", expected, f"{n} records, {reply.batch.ByteSize()} bytes"))
    except CallFailed as e:
        results.append(fail("source.large-pull", expected, str(e)))
    # an empty pull: a partition the source does not have holds no records
    empty_part = partitions
    expected = f"a pull that finds nothing (partition {empty_part}, which the source lacks) answers OK, empty"
    try:
        reply = await _pull(session, partitions=[empty_part], wait_ms=0)
        n = len(reply.batch.records.records)
        results.append(
            ok("source.empty-pull", expected)
            if n == 0
            else fail(
                "source.empty-pull", expected, f"{n} records of partition {reply.batch.header.partition}"
            )
        )
    except CallFailed as e:
        results.append(fail("source.empty-pull", expected, str(e)))
    # long poll: wait_ms bounds how long an empty pull may wait
    wait_ms = 300
    expected = f"an empty pull with wait_ms={wait_ms} answers within wait_ms + {options.slack_s:g} s"
    started = time.monotonic()
    answer = "OK"
    try:
        await _pull(session, partitions=[empty_part], wait_ms=wait_ms, timed=False)
    except CallFailed as e:
        answer = e.status  # an error status is source.empty-pull's business; this check is about time
    took = time.monotonic() - started
    results.append(
        ok("source.long-poll", expected, f"{answer} after {took * 1000:.0f} ms")
        if took <= wait_ms / 1000 + options.slack_s and answer != "DEADLINE_EXCEEDED"
        else fail("source.long-poll", expected, f"{answer} after {took:.2f} s")
    )
    # cancellation: long polls and pulls given up on by the caller; the source then answers at once and,
    # with a working rewind, still redelivers from the last ack (what the cancelled pulls took is not lost).
    await session.cancelled_calls(
        [lambda: _pull(session, partitions=[empty_part], wait_ms=2000, timed=False)]
        + [lambda: _pull(session, partitions=[p], wait_ms=2000, timed=False) for _ in range(2)],
        after_s=0.2,
    )
    result = await _responsive_after(session, "source", options, "source.cancellation", empty_part)
    if result.status is Status.PASS and state.rewind_works:
        try:
            after = await _restart_point(session, state)
            want = _resume(state)
            if not after or after[0].offset != want:
                result = fail(
                    "source.cancellation",
                    f"after cancelled pulls a new session starts at offset {want}",
                    _starts(after),
                )
        except CallFailed as e:
            result = fail("source.cancellation", "a pull after cancelled ones answers", str(e))
    results.append(result)
    return results


async def _push_source_checks(session: Session) -> list[Result]:
    """A push source's records travel on the sidecar's PushRecords stream, which the kit does not serve;
    what it can check: PullRecords and Acknowledge refuse at once with FAILED_PRECONDITION."""
    expected = (
        "PullRecords and Acknowledge answer FAILED_PRECONDITION (the sidecar never pulls a push source)"
    )
    got: list[str] = []
    for call in (lambda: _pull(session, wait_ms=0), lambda: _ack(session, 0, 0)):
        try:
            await call()
            got.append("OK")
        except CallFailed as e:
            got.append(e.status)
    results = [
        verdict(
            [f"answered {g}" for g in got if g != "FAILED_PRECONDITION"],
            "source.push",
            expected,
            ", ".join(got),
        )
    ]
    results.append(
        skip("source.offsets", "a push source: PushRecords is checked by the sidecar, not the kit")
    )
    return results


# --- transform ---------------------------------------------------------------------------------------


async def _process(
    session: Session,
    records: Sequence[Record],
    options: Options,
    batch_id: str,
    attempt: int = 1,
    timed: bool = True,
) -> services_pb2.ProcessBatchResponse:
    request = services_pb2.ProcessBatchRequest(
        batch=_batch(records, batch_id, attempt), options=options.stage_options
    )
    reply: services_pb2.ProcessBatchResponse = await session.call(
        "transform", "ProcessBatch", request, timed=timed
    )
    return reply


async def transform_checks(
    session: Session, caps: records_pb2.Capabilities | None, options: Options
) -> list[Result]:
    results: list[Result] = []
    sample = options.sample()
    inputs = records_to_proto(sample).records
    batch_id = _new_id("transform")
    expected = "ProcessBatch answers OK; errors name records of the batch, once each, with a class"
    try:
        clean = await _process(session, sample, options, batch_id)
    except CallFailed as e:
        hint = (
            " (stage options missing? give them with --option KEY=VALUE)"
            if e.status == "INVALID_ARGUMENT"
            else ""
        )
        results.append(fail("transform.results", expected, f"{e}{hint}"))
        return (
            results
            + [
                skip(c, "ProcessBatch does not answer")
                for c in ("transform.record-errors", "transform.retry", "transform.one-to-one")
            ]
            + await _transform_limits(session, caps, options)
        )
    problems = judge.error_index_problems(clean.errors, len(sample)) + judge.record_count_problems(
        clean.batch
    )
    results.append(
        verdict(
            problems,
            "transform.results",
            expected,
            f"{len(clean.batch.records.records)} out, {len(clean.errors)} errors for {len(sample)} in",
        )
    )

    # A bad record in the middle: the call still succeeds and only that record may fail.
    k = len(sample) // 2
    poisoned = [*sample[:k], Record(b"poison", POISON, {}, 0, 999_999), *sample[k:]]
    check = "transform.record-errors"
    expected = "a batch with one bad record answers OK; the other records are processed as without it"
    try:
        reply = await _process(session, poisoned, options, _new_id("transform-poison"))
        clean_failed = {e.index for e in clean.errors}
        shifted = {i if i < k else i + 1 for i in clean_failed}
        others = sorted({e.index for e in reply.errors} - shifted - {k})
        problems = judge.error_index_problems(reply.errors, len(poisoned))
        if others:
            problems.append(f"records {others[:5]} failed beside the bad one (they did not without it)")
        missing = judge.outputs(clean, whole=False) - judge.outputs(reply, whole=False)
        if missing:
            problems.append(f"{sum(missing.values())} outputs of the good records are missing")
        errors = [e for e in reply.errors if e.index == k]
        named = records_pb2.ErrorClass.Name(errors[0].error_class) if errors else ""
        got = f"the bad record: {named + ' error' if errors else 'no error'}"
        results.append(verdict(problems, check, expected, got))
    except CallFailed as e:
        results.append(fail(check, expected, f"the whole call failed: {e}"))

    check = "transform.retry"
    expected = "ProcessBatch of the same batch again (attempt 2) answers OK with the same result"
    try:
        again = await _process(session, sample, options, batch_id, attempt=2)
        same = judge.outputs(again) == judge.outputs(clean) and sorted(
            e.index for e in again.errors
        ) == sorted(e.index for e in clean.errors)
        results.append(
            ok(check, expected)
            if same
            else warn(check, expected, "a different result (not deterministic: retries change the output)")
        )
    except CallFailed as e:
        results.append(fail(check, expected, str(e)))

    check = "transform.one-to-one"
    if caps is None or not caps.one_to_one:
        results.append(skip(check, "one_to_one not claimed"))
    else:
        results.append(
            verdict(
                judge.one_to_one_problems(inputs, clean),
                check,
                "one output per input that did not fail, in input order (one_to_one is claimed)",
            )
        )
    return results + await _transform_limits(session, caps, options)


async def _transform_limits(
    session: Session, caps: records_pb2.Capabilities | None, options: Options
) -> list[Result]:
    results: list[Result] = []
    n = _batch_limit(caps)
    expected = (
        f"a batch of {n} records (the declared max_batch_records, else the pipeline's batch) answers OK"
    )
    try:
        await _process(session, _scaled(options.sample(), n), options, _new_id("transform-large"))
        results.append(ok("transform.batch-limit", expected))
    except CallFailed as e:
        results.append(fail("transform.batch-limit", expected, str(e)))
    expected = "an empty batch answers OK with no records and no errors"
    try:
        reply = await _process(session, [], options, _new_id("transform-empty"))
        n_out = len(reply.batch.records.records)
        results.append(
            ok("transform.empty-batch", expected)
            if not n_out and not reply.errors
            else fail("transform.empty-batch", expected, f"{n_out} records, {len(reply.errors)} errors")
        )
    except CallFailed as e:
        results.append(fail("transform.empty-batch", expected, str(e)))
    sample = options.sample()
    await session.cancelled_calls(
        [
            lambda: _process(session, _scaled(sample, n), options, _new_id("transform-cancel"), timed=False)
            for _ in range(3)
        ],
        after_s=0.001,
    )
    results.append(await _responsive_after(session, "transform", options, "transform.cancellation"))
    return results


# --- sink --------------------------------------------------------------------------------------------


async def _write(
    session: Session,
    records: Sequence[Record],
    options: Options,
    batch_id: str,
    attempt: int = 1,
    timed: bool = True,
) -> services_pb2.WriteBatchResponse:
    request = services_pb2.WriteBatchRequest(
        batch=_batch(records, batch_id, attempt), options=options.stage_options
    )
    reply: services_pb2.WriteBatchResponse = await session.call("sink", "WriteBatch", request, timed=timed)
    return reply


async def _flush(session: Session) -> None:
    await session.call("sink", "Flush", services_pb2.FlushRequest())


async def read_back(command: str, batch_id: str, count: int, timeout_s: float) -> int:
    """Run the --verify-command for a batch id: it prints how many records of the batch the sink holds."""
    text = command.replace("{batch_id}", batch_id)
    env_extra = {"ETLROUTER_BATCH_ID": batch_id, "ETLROUTER_BATCH_RECORDS": str(count)}

    def run() -> subprocess.CompletedProcess[str]:
        import os

        return subprocess.run(
            text,
            shell=True,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **env_extra},
        )

    done = await asyncio.to_thread(run)
    words = done.stdout.split()
    if not words or not words[-1].isdigit():
        raise ValueError(
            f"--verify-command {shlex.quote(text)} exited {done.returncode} and printed no count "
            f"(stdout {done.stdout[-80:]!r}, stderr {done.stderr[-120:]!r})"
        )
    return int(words[-1])


async def sink_checks(
    session: Session, caps: records_pb2.Capabilities | None, options: Options
) -> list[Result]:
    results: list[Result] = []
    sample = options.sample()
    requires_flush = bool(caps and caps.requires_flush)

    check = "sink.write"
    expected = f"WriteBatch of {len(sample)} records answers OK, written + errors = {len(sample)}"
    written_id = _new_id("sink")
    written_ok = False
    try:
        reply = await _write(session, sample, options, written_id)
        problems = judge.error_index_problems(reply.errors, len(sample))
        if reply.written + len(reply.errors) != len(sample):
            problems.append(
                f"written={reply.written} and {len(reply.errors)} errors for {len(sample)} records"
            )
        results.append(verdict(problems, check, expected, f"written={reply.written}"))
        written_ok = not problems
    except CallFailed as e:
        results.append(fail(check, expected, str(e)))

    check = "sink.read-back"
    when = "after Flush (requires_flush)" if requires_flush else "as soon as WriteBatch answered"
    expected = f"the batch's records can be read back {when}"
    if options.verify_command is None:
        results.append(warn(check, expected, "not checked: give --verify-command to read the sink back"))
    elif not written_ok:
        results.append(skip(check, "WriteBatch did not succeed"))
    else:
        try:
            if requires_flush:
                await _flush(session)
            found = await read_back(options.verify_command, written_id, len(sample), options.timeout_s)
            want = len(sample) - len(reply.errors)
            results.append(
                ok(check, expected, f"{found} records")
                if found == want
                else fail(check, f"{expected}: {want} records", f"{found}")
            )
        except (CallFailed, ValueError, subprocess.TimeoutExpired) as e:
            results.append(fail(check, expected, str(e)))

    check = "sink.idempotent"
    claimed = bool(caps and caps.idempotent_writes)
    expected = (
        "a repeated batch id answers OK, written = the batch, and is not written twice (idempotent_writes)"
        if claimed
        else "a repeated batch id answers OK (idempotent_writes not claimed: duplicates are allowed)"
    )
    retry_id = _new_id("sink-retry")
    try:
        first = await _write(session, sample, options, retry_id)
        second = await _write(session, sample, options, retry_id, attempt=2)
        problems = []
        if claimed and second.written != first.written:
            problems.append(f"the retry answered written={second.written}, the first write {first.written}")
        got = "answered OK twice"
        if claimed and options.verify_command is not None and not problems:
            if requires_flush:
                await _flush(session)
            want = len(sample) - len(first.errors)
            # Counted until it reaches the batch or the slack passes: a store may show writes a little late,
            # and the question here is how many copies there are, not when they appear.
            deadline = time.monotonic() + 2 * options.slack_s
            found = await read_back(options.verify_command, retry_id, len(sample), options.timeout_s)
            while found < want and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                found = await read_back(options.verify_command, retry_id, len(sample), options.timeout_s)
            if found != want:
                problems.append(f"{found} records of the batch id read back after two writes of {want}")
            got = f"{found} records read back after two writes"
        elif claimed:
            got += " (copies not counted: no --verify-command)"
        results.append(verdict(problems, check, expected, got))
    except (CallFailed, ValueError, subprocess.TimeoutExpired) as e:
        results.append(fail(check, expected, str(e)))

    check = "sink.flush"
    expected = "Flush answers OK" + (" (requires_flush is claimed)" if requires_flush else "")
    try:
        await _flush(session)
        results.append(ok(check, expected))
    except CallFailed as e:
        if e.status == "UNIMPLEMENTED" and not requires_flush:
            results.append(warn(check, expected, "UNIMPLEMENTED (fine while requires_flush is not claimed)"))
        else:
            results.append(fail(check, expected, str(e)))

    n = _batch_limit(caps)
    expected = (
        f"a batch of {n} records (the declared max_batch_records, else the pipeline's batch) answers OK"
    )
    try:
        await _write(session, _scaled(sample, n), options, _new_id("sink-large"))
        results.append(ok("sink.batch-limit", expected))
    except CallFailed as e:
        results.append(fail("sink.batch-limit", expected, str(e)))

    expected = "an empty batch answers OK, written=0"
    try:
        reply = await _write(session, [], options, _new_id("sink-empty"))
        results.append(
            ok("sink.empty-batch", expected)
            if reply.written == 0 and not reply.errors
            else fail("sink.empty-batch", expected, f"written={reply.written}, {len(reply.errors)} errors")
        )
    except CallFailed as e:
        results.append(fail("sink.empty-batch", expected, str(e)))

    await session.cancelled_calls(
        [lambda: _write(session, sample, options, _new_id("sink-cancel"), timed=False) for _ in range(3)],
        after_s=0.001,
    )
    results.append(await _responsive_after(session, "sink", options, "sink.cancellation"))
    return results


# --- lookup ------------------------------------------------------------------------------------------


async def _lookup(session: Session, key: bytes) -> services_pb2.LookupResult:
    reply = await session.call("lookup", "Lookup", services_pb2.LookupRequest(key=key))
    result: services_pb2.LookupResult = reply.result
    return result


async def _batch_lookup(
    session: Session, keys: Sequence[bytes], timed: bool = True
) -> list[services_pb2.LookupResult]:
    reply = await session.call(
        "lookup", "BatchLookup", services_pb2.BatchLookupRequest(keys=keys), timed=timed
    )
    return list(reply.results)


async def lookup_checks(
    session: Session, caps: records_pb2.Capabilities | None, options: Options
) -> list[Result]:
    results: list[Result] = []
    missing = f"conformance-missing-{uuid.uuid4().hex}".encode()

    check = "lookup.agree"
    expected = "BatchLookup agrees with Lookup key by key, in request order"
    if not options.keys:
        results.append(warn(check, expected, "not checked: give keys that exist with --key"))
    else:
        try:
            singles = [await _lookup(session, key) for key in options.keys]
            many = await _batch_lookup(session, options.keys)
            problems = judge.lookup_agreement_problems(options.keys, singles, many)
            found = sum(r.found for r in singles)
            results.append(verdict(problems, check, expected, f"{found} of {len(options.keys)} keys found"))
        except CallFailed as e:
            results.append(fail(check, expected, str(e)))

    check = "lookup.missing"
    expected = "a missing key answers OK with found=false, in Lookup and in BatchLookup"
    try:
        one = await _lookup(session, missing)
        many = await _batch_lookup(session, [missing])
        problems = []
        if one.found:
            problems.append("Lookup found a key that does not exist")
        if len(many) != 1 or many[0].found:
            problems.append(f"BatchLookup answered found={[r.found for r in many]} for one missing key")
        results.append(verdict(problems, check, expected))
    except CallFailed as e:
        results.append(fail(check, expected, str(e)))

    n = _batch_limit(caps)
    expected = f"BatchLookup of {n} keys answers OK with {n} results"
    # Known keys when given (missing ones are lookup.missing's business), else distinct missing ones.
    keys = [
        options.keys[i % len(options.keys)] if options.keys else b"%s-%d" % (missing, i) for i in range(n)
    ]
    try:
        many = await _batch_lookup(session, keys)
        results.append(
            ok("lookup.batch-limit", expected)
            if len(many) == n
            else fail("lookup.batch-limit", expected, f"{len(many)} results")
        )
    except CallFailed as e:
        results.append(fail("lookup.batch-limit", expected, str(e)))

    await session.cancelled_calls(
        [lambda: _batch_lookup(session, keys, timed=False) for _ in range(3)], after_s=0.001
    )
    results.append(await _responsive_after(session, "lookup", options, "lookup.cancellation"))
    return results


KIND_CHECKS = {
    "source": source_checks,
    "transform": transform_checks,
    "sink": sink_checks,
    "lookup": lookup_checks,
}
