"""The sidecar's internal interfaces: what discovery finds, what the cluster client drives, what the DLQ
stores. Each part of the sidecar is written against these, so they can be built and tested apart."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec
from grpclib.client import Channel

from etlrouter._proto.v1 import control_pb2, dataplane_pb2, records_pb2
from etlrouter.core.config import SidecarConfig

ServiceKind = Literal["source", "transform", "sink", "lookup"]


class ServiceCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a user service declared through GetCapabilities (defaults when it answers UNIMPLEMENTED)."""

    name: str = ""
    version: str = ""
    max_batch_records: int = 0
    max_batch_bytes: int = 0
    max_concurrency: int = 1
    requires_flush: bool = False
    idempotent_writes: bool = False
    one_to_one: bool = False
    partitions: int = 1
    labels: dict[str, str] = {}


class LocalService(msgspec.Struct, frozen=True, kw_only=True):
    """A user service found on a local port.

    `name` is the logical name pipelines use: the service's declared Capabilities.name, else a name the
    sidecar's configuration gives the port, else "<sidecar id>-<port>".
    """

    name: str
    kind: ServiceKind
    endpoint: str  # HOST:PORT
    capabilities: ServiceCapabilities = ServiceCapabilities()
    # The encoded etlrouter.v1.Capabilities as the service sent it (registered opaque with the router).
    capabilities_proto: bytes = b""


class AssignmentTarget(Protocol):
    """What the cluster client drives: the data-plane engine. Commands arrive already fenced (a command
    whose token is below the highest applied for its DAG never reaches these methods)."""

    async def assign(self, fencing_token: int, command: control_pb2.Assign) -> None:
        """Start or update the local stages of a DAG (idempotent for the same token)."""

    async def revoke(self, fencing_token: int, command: control_pb2.Revoke) -> None:
        """Stop the given stages of a DAG (all when stage_ids is empty), draining in-flight batches."""

    def stage_reports(self) -> Sequence[control_pb2.StageReport]:
        """Per running stage: records in/out, errors, dead-lettered, watermark, health (for heartbeats)."""

    def load(self) -> control_pb2.SidecarLoad:
        """Records/s, buffer utilization, RSS, running stages (for heartbeats and placement)."""


class DeadLetterSink(Protocol):
    """Where the engine puts records that failed permanently. `put` returns only once the letters are
    durable: the engine acknowledges the source after that, and not before."""

    async def put(self, letters: Sequence[dataplane_pb2.DeadLetter]) -> None: ...


class Redriver(Protocol):
    """The engine's entry point for redriving dead letters into a stage."""

    async def redrive(self, dag_id: str, stage_id: str, letters: Sequence[dataplane_pb2.DeadLetter]) -> int:
        """Send the letters' records into the stage; returns how many were accepted (durably handled later
        with at-least-once semantics, like any batch)."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a hop reports upstream for one batch: done (written, or durably dead-lettered: how many), or
    not done (the sender retries, `error` says why)."""

    done: bool
    dead_lettered: int = 0
    error: str = ""

    @staticmethod
    def retry(error: str) -> BatchResult:
        return BatchResult(False, 0, error)


DONE = BatchResult(True)


class BranchShedError(Exception):
    """A branch lagged past its shed bound: the sending stage dead-letters its copy (reason "shed")."""


class StageHost(Protocol):
    """What a stage runner may ask of what hosts it (one assigned DAG on this sidecar). Runners depend on
    this, not on the engine, so the engine can import the runners without the runners importing it."""

    @property
    def dag_id(self) -> str: ...

    @property
    def config(self) -> SidecarConfig:
        """The sidecar's configuration (edge windows, watermark rules, drain timeout)."""

    def channel_for(self, endpoint: str) -> Channel:
        """The one shared channel to a local service."""

    def stage_spec(self, stage_id: str) -> control_pb2.StageSpec | None:
        """Another stage of the DAG (a child, whose shed policy and DLQ option the sender applies)."""

    def tap(self, stage_id: str, batch: records_pb2.RawRecordBatch) -> None:
        """Offer a batch entering a stage to the open taps."""

    async def put_dead_letters(self, letters: Sequence[dataplane_pb2.DeadLetter], dlq_sink: str = "") -> None:
        """Durably dead-letter (to the sink service `dlq_sink` when named, else the local store)."""

    async def deliver_to_branch(
        self,
        from_stage: str,
        child: str,
        batch: records_pb2.RawRecordBatch,
        rng: random.Random,
        may_shed: bool = True,
    ) -> BatchResult:
        """Deliver to one replica of a child stage, retrying (jitter from `rng`) until it is handled; raises
        BranchShedError when the child's shed bound passed first (never when not `may_shed`)."""
