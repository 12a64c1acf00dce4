"""Dead letters over GraphQL: they live on the sidecars (SidecarAdmin in dataplane.proto), so the router asks
the registered sidecars, a few at a time, each call with a deadline; a sidecar that does not answer is
reported in `unreachable` instead of failing the whole request (faults are normal).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from etlrouter._proto.v1 import dataplane_grpc, dataplane_pb2, records_pb2
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.security.context import Security
from etlrouter.security.identity import SIDECAR

CALL_TIMEOUT_S = 5.0
REDRIVE_TIMEOUT_S = 60.0
MAX_PARALLEL = 16
MAX_LIMIT = 1000
MAX_IDS = 1000
MAX_TEXT_BYTES = 64 * 1024

ERROR_CLASSES = {
    records_pb2.ERROR_CLASS_UNSPECIFIED: "unspecified",
    records_pb2.ERROR_CLASS_TRANSIENT: "transient",
    records_pb2.ERROR_CLASS_PERMANENT: "permanent",
    records_pb2.ERROR_CLASS_REJECTED: "rejected",
}
ERROR_CLASS_NUMBERS = {name: number for number, name in ERROR_CLASSES.items()}

T = TypeVar("T")


class DlqInputError(ValueError):
    """A bad argument; the message names it."""


def _text(data: bytes) -> tuple[str, bool]:
    cut = len(data) > MAX_TEXT_BYTES
    return data[:MAX_TEXT_BYTES].decode(errors="replace"), cut


def letter_view(sidecar_id: str, letter: dataplane_pb2.DeadLetter, *, with_record: bool) -> dict[str, Any]:
    record: dict[str, Any] | None = None
    if with_record and letter.HasField("record"):
        key, key_cut = _text(letter.record.key)
        value, value_cut = _text(letter.record.value)
        record = {
            "offset": letter.record.offset,
            "eventTimeMs": float(letter.record.event_time_ms),
            "key": key,
            "value": value,
            "truncated": key_cut or value_cut,
            "headers": [{"key": k, "value": v} for k, v in sorted(letter.record.headers.items())],
        }
    return {
        "id": letter.id,
        "sidecar": sidecar_id,
        "pipeline": letter.pipeline,
        "dagId": letter.dag_id,
        "stageId": letter.stage_id,
        "service": letter.service,
        "errorClass": ERROR_CLASSES.get(letter.error_class, "unspecified"),
        "error": letter.error,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "failedAtMs": float(letter.failed_at_ms),
        "sourceId": letter.source_id,
        "partition": letter.partition,
        "batchId": letter.batch_id,
        "record": record,
    }


def _problem(e: BaseException) -> str:
    if isinstance(e, GRPCError):
        return f"{e.status.name}: {e.message or ''}".rstrip(": ")
    if isinstance(e, TimeoutError):
        return "did not answer in time"
    return f"unreachable: {e!r}"


class SidecarAdmins:
    """Calls SidecarAdmin on sidecars by address; one short-lived channel per call keeps nothing open."""

    def __init__(self, transport: TransportConfig, security: Security | None = None) -> None:
        self.transport = transport
        self.security = security
        self._limit = asyncio.Semaphore(MAX_PARALLEL)

    async def call(
        self,
        address: str,
        timeout: float,
        work: Callable[[dataplane_grpc.SidecarAdminStub], Awaitable[T]],
    ) -> T:
        async with self._limit:
            channel = open_channel(address, self.transport, self.security, SIDECAR)
            try:
                return await asyncio.wait_for(work(dataplane_grpc.SidecarAdminStub(channel)), timeout)
            finally:
                channel.close()

    async def each(
        self,
        sidecars: Sequence[tuple[str, str]],
        timeout: float,
        work: Callable[[dataplane_grpc.SidecarAdminStub], Awaitable[T]],
    ) -> tuple[list[tuple[str, T]], list[dict[str, str]]]:
        """`work` on every (sidecar id, address); returns the answers and the sidecars that failed."""
        results = await asyncio.gather(
            *(self.call(address, timeout, work) for _, address in sidecars), return_exceptions=True
        )
        answers: list[tuple[str, T]] = []
        problems: list[dict[str, str]] = []
        for (sidecar_id, _), result in zip(sidecars, results, strict=True):
            if isinstance(result, GRPCError | StreamTerminatedError | OSError | TimeoutError):
                problems.append({"sidecar": sidecar_id, "message": _problem(result)})
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append((sidecar_id, result))
        return answers, problems

    async def list(
        self,
        sidecars: Sequence[tuple[str, str]],
        pipeline: str,
        stage: str,
        error_class: str | None,
        limit: int,
    ) -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIMIT:
            raise DlqInputError(f"limit must be 1..{MAX_LIMIT}, got {limit}")
        request = dataplane_pb2.ListDeadLettersRequest(
            pipeline=pipeline,
            stage_id=stage,
            error_class=ERROR_CLASS_NUMBERS[error_class] if error_class else 0,  # type: ignore[arg-type]
            limit=limit,
        )

        async def work(stub: dataplane_grpc.SidecarAdminStub) -> dataplane_pb2.ListDeadLettersResponse:
            return await stub.ListDeadLetters(request)

        answers, problems = await self.each(sidecars, CALL_TIMEOUT_S, work)
        letters = [
            letter_view(sidecar_id, letter, with_record=False)
            for sidecar_id, reply in answers
            for letter in reply.dead_letters
        ]
        letters.sort(key=lambda x: (-x["failedAtMs"], x["sidecar"], x["id"]))
        total = sum(int(reply.total) for _, reply in answers)
        return {"letters": letters, "total": total, "unreachable": problems}

    async def get(self, sidecar_id: str, address: str, letter_id: str) -> dict[str, Any] | None:
        async def work(stub: dataplane_grpc.SidecarAdminStub) -> dataplane_pb2.DeadLetter:
            return await stub.GetDeadLetter(dataplane_pb2.GetDeadLetterRequest(id=letter_id))

        try:
            letter = await self.call(address, CALL_TIMEOUT_S, work)
        except GRPCError as e:
            if e.status == Status.NOT_FOUND:
                return None
            raise
        return letter_view(sidecar_id, letter, with_record=True)

    async def redrive(
        self,
        sidecars: Sequence[tuple[str, str]],
        ids: Sequence[str],
        pipeline: str,
        stage: str,
        target_stage: str,
    ) -> dict[str, Any]:
        if len(ids) > MAX_IDS:
            raise DlqInputError(f"ids has {len(ids)} entries, at most {MAX_IDS}; split the request")
        request = dataplane_pb2.RedriveDeadLettersRequest(
            ids=list(ids), pipeline=pipeline, stage_id=stage, target_stage_id=target_stage
        )

        async def work(stub: dataplane_grpc.SidecarAdminStub) -> dataplane_pb2.RedriveDeadLettersResponse:
            return await stub.RedriveDeadLetters(request)

        answers, problems = await self.each(sidecars, REDRIVE_TIMEOUT_S, work)
        failed = [
            {"sidecar": sidecar_id, "id": letter_id, "reason": why}
            for sidecar_id, reply in answers
            for letter_id, why in sorted(reply.failed.items())
        ]
        return {
            "redriven": sum(int(reply.redriven) for _, reply in answers),
            "failed": failed,
            "unreachable": problems,
        }
