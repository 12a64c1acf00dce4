"""The sidecar's inspection API (etlrouter.v1.SidecarAdmin): the dead-letter queue and live taps.

`SidecarAdminService` serves ListDeadLetters / GetDeadLetter / RedriveDeadLetters from a `DeadLetterStore`
and a `Redriver` (the engine), and Tap from a `TapHub`, which the engine feeds with every batch that passes
a stage. The hub costs one dict truth test per batch while nobody taps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream
from prometheus_client import Counter

from etlrouter._proto.v1 import dataplane_grpc, dataplane_pb2, records_pb2
from etlrouter.core.metrics import REGISTRY
from etlrouter.sidecar.dlq import (
    MAX_LIST_LIMIT,
    DeadLetterStore,
    DeadLetterStoreError,
    InvalidPageTokenError,
)
from etlrouter.sidecar.model import Redriver

__all__ = [
    "MAX_REDRIVE_IDS",
    "REDRIVE_CHUNK",
    "SidecarAdminService",
    "Tap",
    "TapHub",
    "TapLimitError",
]

log = logging.getLogger(__name__)

MAX_REDRIVE_IDS: Final = 10_000  # letters one RedriveDeadLetters call handles (by ids or by filter)
REDRIVE_CHUNK: Final = 1000  # letters per Redriver.redrive call
MAX_ID_CHARS: Final = 256  # ids, dag and stage ids, pipeline names in requests

TAP_DROPPED = Counter(
    "etlrouter_tap_dropped_records_total",
    "Tapped records not shown because the tap client was slower than the stage.",
    registry=REGISTRY,
)
TAP_UNDECODABLE = Counter(
    "etlrouter_tap_undecodable_batches_total",
    "Batches offered to a tap whose records could not be decoded (not shown).",
    registry=REGISTRY,
)


# ---------------------------------------------------------------------------------------------------
# Tap


class TapLimitError(Exception):
    """Too many taps are open at once."""


@dataclass(eq=False, slots=True)
class Tap:
    """One subscriber: a bounded queue of sampled events and its counts.

    `dropped` is cumulative: records sampled for this tap but not queued because its queue was full.
    `limit` (0 = none) stops sampling once that many events have been queued.
    """

    dag_id: str
    stage_id: str
    sample_rate: float
    limit: int
    queue: asyncio.Queue[dataplane_pb2.TapEvent | None]
    dropped: int = 0
    queued: int = 0
    _credit: float = field(default=0.0)

    async def next_event(self) -> dataplane_pb2.TapEvent | None:
        """The next event, its `dropped` set to the drops so far; None when the hub closed the tap."""
        event = await self.queue.get()
        if event is not None:
            event.dropped = self.dropped
        return event

    def _offer(self, batch_id: str, records: Sequence[records_pb2.Record]) -> None:
        rate = self.sample_rate
        for record in records:
            if self.limit and self.queued >= self.limit:
                return
            # Deterministic sampling: exactly `rate` of the records, evenly spread.
            self._credit += rate
            if self._credit < 1.0:
                continue
            self._credit -= 1.0
            if self.queue.full():
                self.dropped += 1
                TAP_DROPPED.inc()
                continue
            event = dataplane_pb2.TapEvent(batch_id=batch_id)
            event.record.CopyFrom(record)
            self.queue.put_nowait(event)
            self.queued += 1


class TapHub:
    """Fans out samples of the batches passing stages to tap subscribers.

    The engine calls `offer` (from the event loop thread) for every batch; with no tap open anywhere it is
    one dict truth test, with taps on other stages one dict lookup. Records are decoded only for a stage
    somebody taps. At most `max_taps` taps are open at once; each buffers at most `queue_size` events.
    """

    def __init__(self, *, max_taps: int = 16, queue_size: int = 256) -> None:
        if max_taps < 1 or queue_size < 1:
            raise ValueError(f"max_taps and queue_size must be positive, got {max_taps} and {queue_size}")
        self.max_taps = max_taps
        self.queue_size = queue_size
        self._taps: dict[tuple[str, str], list[Tap]] = {}
        self._count = 0

    @property
    def tap_count(self) -> int:
        return self._count

    def offer(self, dag_id: str, stage_id: str, batch_id: str, records_raw: bytes) -> None:
        """A batch passed a stage: `records_raw` is its encoded RecordList. Never raises."""
        if not self._taps:
            return
        taps = self._taps.get((dag_id, stage_id))
        if not taps:
            return
        try:
            records = records_pb2.RecordList.FromString(records_raw).records
        except DecodeError:
            TAP_UNDECODABLE.inc()
            return
        for tap in taps:
            tap._offer(batch_id, records)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, dag_id: str, stage_id: str, *, sample_rate: float = 1.0, limit: int = 0
    ) -> AsyncIterator[Tap]:
        """Opens a tap for the block's duration. Raises TapLimitError when `max_taps` are open."""
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if self._count >= self.max_taps:
            raise TapLimitError(f"{self._count} taps are open, the limit is {self.max_taps}; retry later")
        tap = Tap(dag_id, stage_id, sample_rate, limit, asyncio.Queue(self.queue_size))
        key = (dag_id, stage_id)
        self._taps.setdefault(key, []).append(tap)
        self._count += 1
        try:
            yield tap
        finally:
            taps = self._taps.get(key)
            if taps is not None and tap in taps:
                taps.remove(tap)
                self._count -= 1
                if not taps:
                    del self._taps[key]

    def close(self) -> None:
        """Ends every open tap (for a draining sidecar); new taps may still be opened."""
        for taps in self._taps.values():
            for tap in taps:
                with contextlib.suppress(asyncio.QueueFull):
                    # Make room for the end marker: the client is leaving anyway.
                    if tap.queue.full():
                        tap.queue.get_nowait()
                    tap.queue.put_nowait(None)


# ---------------------------------------------------------------------------------------------------
# The service


def _check_name(value: str, what: str, *, required: bool = False) -> None:
    if required and not value:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{what} is required")
    if len(value) > MAX_ID_CHARS:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{what} is {len(value)} characters, at most {MAX_ID_CHARS}")


def _store_error(exc: DeadLetterStoreError) -> GRPCError:
    return GRPCError(Status.UNAVAILABLE, f"dead-letter store: {exc}")


class SidecarAdminService(dataplane_grpc.SidecarAdminBase):
    """etlrouter.v1.SidecarAdmin over a DeadLetterStore, the engine's Redriver and a TapHub."""

    def __init__(self, store: DeadLetterStore, redriver: Redriver | None, tap_hub: TapHub) -> None:
        self.store = store
        self.redriver = redriver
        self.tap_hub = tap_hub
        self._redrive_lock = asyncio.Lock()  # two redrives of the same letters must not both send them

    async def ListDeadLetters(
        self, stream: Stream[dataplane_pb2.ListDeadLettersRequest, dataplane_pb2.ListDeadLettersResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        _check_name(request.pipeline, "pipeline")
        _check_name(request.stage_id, "stage_id")
        try:
            letters, token, total = await self.store.list(
                pipeline=request.pipeline,
                stage_id=request.stage_id,
                error_class=request.error_class,
                limit=min(request.limit, MAX_LIST_LIMIT),
                page_token=request.page_token,
            )
        except InvalidPageTokenError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None
        except DeadLetterStoreError as exc:
            raise _store_error(exc) from None
        await stream.send_message(
            dataplane_pb2.ListDeadLettersResponse(dead_letters=letters, next_page_token=token, total=total)
        )

    async def GetDeadLetter(
        self, stream: Stream[dataplane_pb2.GetDeadLetterRequest, dataplane_pb2.DeadLetter]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        _check_name(request.id, "id", required=True)
        try:
            letter = await self.store.get(request.id)
        except DeadLetterStoreError as exc:
            raise _store_error(exc) from None
        if letter is None:
            raise GRPCError(Status.NOT_FOUND, f"dead letter {request.id!r} is not in this sidecar's DLQ")
        await stream.send_message(letter)

    async def RedriveDeadLetters(
        self,
        stream: Stream[dataplane_pb2.RedriveDeadLettersRequest, dataplane_pb2.RedriveDeadLettersResponse],
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        if self.redriver is None:
            raise GRPCError(Status.UNAVAILABLE, "this sidecar runs no engine to redrive dead letters into")
        if len(request.ids) > MAX_REDRIVE_IDS:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"{len(request.ids)} ids in one request, at most {MAX_REDRIVE_IDS}; split the request",
            )
        for letter_id in request.ids:
            _check_name(letter_id, "id", required=True)
        _check_name(request.pipeline, "pipeline")
        _check_name(request.stage_id, "stage_id")
        _check_name(request.target_stage_id, "target_stage_id")
        async with self._redrive_lock:
            redriven, failed = await self._redrive(self.redriver, request)
        await stream.send_message(dataplane_pb2.RedriveDeadLettersResponse(redriven=redriven, failed=failed))

    async def _redrive(
        self, redriver: Redriver, request: dataplane_pb2.RedriveDeadLettersRequest
    ) -> tuple[int, dict[str, str]]:
        """Redrives chunk by chunk (at most REDRIVE_CHUNK letters in memory); returns (redriven, failed)."""
        failed: dict[str, str] = {}
        if request.ids:
            ids = list(dict.fromkeys(request.ids))
        else:
            ids = self.store.ids(pipeline=request.pipeline, stage_id=request.stage_id, limit=MAX_REDRIVE_IDS)
        redriven = 0
        for start in range(0, len(ids), REDRIVE_CHUNK):
            chunk_ids = ids[start : start + REDRIVE_CHUNK]
            try:
                found = await self.store.get_many(chunk_ids)
            except DeadLetterStoreError as exc:
                why = f"reading it from the DLQ failed: {exc}"
                failed.update((letter_id, why) for letter_id in ids[start:])
                break
            groups: dict[tuple[str, str], list[dataplane_pb2.DeadLetter]] = {}
            for letter_id in chunk_ids:
                letter = found.get(letter_id)
                if letter is None:
                    failed[letter_id] = "not in this sidecar's DLQ"
                elif not letter.dag_id:
                    failed[letter_id] = "the dead letter names no dag_id to redrive into"
                elif not (request.target_stage_id or letter.stage_id):
                    failed[letter_id] = (
                        "the dead letter names no stage and the request gives no target_stage_id"
                    )
                else:
                    key = (letter.dag_id, request.target_stage_id or letter.stage_id)
                    groups.setdefault(key, []).append(letter)
            for (dag_id, stage_id), letters in groups.items():
                redriven += await self._redrive_group(redriver, dag_id, stage_id, letters, failed)
        return redriven, failed

    async def _redrive_group(
        self,
        redriver: Redriver,
        dag_id: str,
        stage_id: str,
        letters: list[dataplane_pb2.DeadLetter],
        failed: dict[str, str],
    ) -> int:
        try:
            accepted = await redriver.redrive(dag_id, stage_id, letters)
        except Exception as exc:
            log.warning("redrive of %d letters into %s/%s failed: %s", len(letters), dag_id, stage_id, exc)
            why = f"redrive into dag {dag_id!r} stage {stage_id!r} failed: {exc}"
            failed.update((x.id, why) for x in letters)
            return 0
        # The engine accepts a prefix: the first `accepted` letters.
        accepted = max(0, min(int(accepted), len(letters)))
        for x in letters[accepted:]:
            failed[x.id] = (
                f"the engine accepted {accepted} of {len(letters)} letters for dag {dag_id!r} "
                f"stage {stage_id!r}; this one was not accepted"
            )
        done = [x.id for x in letters[:accepted]]
        if done:
            try:
                await self.store.remove(done)
            except DeadLetterStoreError as exc:
                # Redriven but still stored: a later redrive would send them again.
                why = f"redriven, but removing it from the DLQ failed: {exc}"
                failed.update((letter_id, why) for letter_id in done)
        return len(done)

    async def Tap(self, stream: Stream[dataplane_pb2.TapRequest, dataplane_pb2.TapEvent]) -> None:
        request = await stream.recv_message()
        assert request is not None
        _check_name(request.dag_id, "dag_id", required=True)
        _check_name(request.stage_id, "stage_id", required=True)
        rate = request.sample_rate or 1.0
        if math.isnan(rate) or not 0.0 < rate <= 1.0:
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"sample_rate must be in (0, 1], got {request.sample_rate}"
            )
        try:
            subscription = self.tap_hub.subscribe(
                request.dag_id, request.stage_id, sample_rate=rate, limit=request.limit
            )
            async with subscription as tap:
                await stream.send_initial_metadata()
                sent = 0
                while not request.limit or sent < request.limit:
                    event = await tap.next_event()
                    if event is None:
                        break
                    await stream.send_message(event)
                    sent += 1
        except TapLimitError as exc:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
