"""A sink service as the dead-letter queue of a stage (the DSL's `dlq = "SINK"` option).

The engine hands a stage's dead letters to `DlqSinkForwarder.send`; when the sink does not confirm them it
stores them in the sidecar's local `DeadLetterStore` (sidecar/dlq.py) instead. Kept apart from the store:
this is a client of the router cluster and of another sidecar's data plane, the store is files on local disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client import Counter

from etlrouter._proto.v1 import admin_grpc, admin_pb2, dataplane_grpc, dataplane_pb2, records_pb2
from etlrouter.client.router import RouterClient
from etlrouter.core.config import SidecarConfig, TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.core.metrics import REGISTRY
from etlrouter.security.context import Security
from etlrouter.security.identity import SIDECAR
from etlrouter.sidecar.dlq import new_letter_id

__all__ = [
    "PROVENANCE_PREFIX",
    "DlqSinkForwarder",
    "DlqSinkUnavailableError",
    "letter_to_record",
]

log = logging.getLogger(__name__)

PROVENANCE_PREFIX: Final = "etlrouter.dlq."

DLQ_SINK_WRITTEN = Counter(
    "etlrouter_dlq_sink_written_events_total",
    "Dead letters written to the sink service a stage names as its DLQ.",
    ["sink"],
    registry=REGISTRY,
)
DLQ_SINK_FALLBACK = Counter(
    "etlrouter_dlq_sink_fallback_events_total",
    "Dead letters meant for a DLQ sink service that went to the local store because the sink failed.",
    ["sink"],
    registry=REGISTRY,
)


def letter_to_record(letter: dataplane_pb2.DeadLetter) -> records_pb2.Record:
    """The letter's original record with its provenance added as `etlrouter.dlq.*` headers."""
    record = records_pb2.Record()
    record.CopyFrom(letter.record)
    provenance = {
        "id": letter.id,
        "pipeline": letter.pipeline,
        "dag": letter.dag_id,
        "stage": letter.stage_id,
        "service": letter.service,
        "reason": letter.reason or "error",
        "error": letter.error,
        "error_class": records_pb2.ErrorClass.Name(letter.error_class),
        "attempts": str(letter.attempts),
        "failed_at_ms": str(letter.failed_at_ms),
        "source": letter.source_id,
        "partition": str(letter.partition),
        "batch": letter.batch_id,
    }
    for name, value in provenance.items():
        record.headers[PROVENANCE_PREFIX + name] = value
    return record


class DlqSinkUnavailableError(Exception):
    """The DLQ sink service could not take the letters (not registered, unreachable, or it failed)."""


class DlqSinkForwarder:
    """Sends dead letters to a sink service through the data plane of the sidecar that fronts it.

    The sink's sidecar is found in the router cluster's registry (cached for `lookup_ttl_s`); the letters
    travel as one batch on a `ReceiveRecords` stream whose EdgeOpen names the sink (`dlq_sink`). `send`
    returns False, counted and logged, when the sink does not confirm the write within `timeout_s`: the
    caller then stores the letters locally, so they are never lost (a write that the sink finished after
    all is then held twice).
    """

    def __init__(
        self,
        sidecar_id: str,
        config: SidecarConfig,
        transport_config: TransportConfig,
        *,
        timeout_s: float = 10.0,
        lookup_ttl_s: float = 10.0,
        security: Security | None = None,
    ) -> None:
        self.sidecar_id = sidecar_id
        self.transport_config = transport_config
        self.security = security
        self.timeout_s = timeout_s
        self.lookup_ttl_s = lookup_ttl_s
        self.routers = RouterClient(
            list(config.routers), timeout=timeout_s / 2, transport_config=transport_config, security=security
        )
        self._addresses: dict[str, tuple[float, list[str]]] = {}
        self._channels: dict[str, Any] = {}

    async def send(self, sink: str, letters: Sequence[dataplane_pb2.DeadLetter]) -> bool:
        for letter in letters:
            if not letter.id:
                letter.id = new_letter_id()  # the same id in the sink and, on fallback, in the local store
        try:
            await asyncio.wait_for(self._send(sink, letters), self.timeout_s)
        except Exception as exc:  # whatever went wrong, the local store takes them
            self._addresses.pop(sink, None)
            DLQ_SINK_FALLBACK.labels(sink).inc(len(letters))
            log.warning(
                "DLQ sink %s did not take %d dead letters (%s); they go to the local dead-letter store",
                sink,
                len(letters),
                exc if str(exc) else type(exc).__name__,
            )
            return False
        DLQ_SINK_WRITTEN.labels(sink).inc(len(letters))
        return True

    async def _locate(self, sink: str) -> list[str]:
        cached = self._addresses.get(sink)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        reply = await self.routers.call(
            admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest()
        )
        addresses = [
            sidecar.data_address
            for sidecar in reply.sidecars
            if sidecar.data_address
            and any(s.name == sink and s.kind == 3 for s in sidecar.services)  # SERVICE_KIND_SINK
        ]
        if not addresses:
            raise DlqSinkUnavailableError(f"no sidecar fronts a sink service named {sink!r}")
        self._addresses[sink] = (time.monotonic() + self.lookup_ttl_s, addresses)
        return addresses

    async def _send(self, sink: str, letters: Sequence[dataplane_pb2.DeadLetter]) -> None:
        errors = []
        for address in await self._locate(sink):
            try:
                await self._send_to(address, sink, letters)
                return
            except (DlqSinkUnavailableError, GRPCError, StreamTerminatedError, OSError) as exc:
                errors.append(f"{address}: {exc}")
        raise DlqSinkUnavailableError("; ".join(errors))

    async def _send_to(self, address: str, sink: str, letters: Sequence[dataplane_pb2.DeadLetter]) -> None:
        records = records_pb2.RecordList(records=[letter_to_record(letter) for letter in letters])
        batch = records_pb2.RawRecordBatch(records=records.SerializeToString())
        first = letters[0]
        header = batch.header
        header.batch_id = f"dlq/{first.id}/{len(letters)}"
        header.record_count = len(letters)
        header.byte_size = len(batch.records)
        header.source_id, header.partition, header.attempt = first.source_id, first.partition, 1
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(
                address, self.transport_config, self.security, SIDECAR
            )
        open_frame = dataplane_pb2.EdgeOpen(dlq_sink=sink, sender_sidecar_id=self.sidecar_id)
        async with dataplane_grpc.SidecarDataPlaneStub(channel).ReceiveRecords.open() as stream:
            await stream.send_message(dataplane_pb2.DataFrame(open=open_frame))
            # A fresh window is entirely free, so one batch of any size is within the credits.
            if await stream.recv_message() is None:
                raise DlqSinkUnavailableError(f"{address} closed the DLQ edge without a grant")
            await stream.send_message(dataplane_pb2.DataFrame(batch=batch))
            while (reply := await stream.recv_message()) is not None:
                for outcome in reply.outcomes:
                    if outcome.batch_id != header.batch_id:
                        continue
                    if outcome.status != dataplane_pb2.BATCH_STATUS_DONE:
                        raise DlqSinkUnavailableError(outcome.error or "the DLQ sink did not write them")
                    await stream.send_message(dataplane_pb2.DataFrame(close=True), end=True)
                    return
        raise DlqSinkUnavailableError(f"{address} closed the DLQ edge before writing")

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self.routers.close()
