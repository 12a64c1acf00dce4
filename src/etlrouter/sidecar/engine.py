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

The parts: edges.py (Edge, LocalEdge, RemoteEdge: credit-controlled delivery to one child replica),
stages.py (the runners of transforms, lookups and sinks, written against `StageHost` in model.py),
source.py (the source runner: pulls, pushes, the ack ledger), and here the DAG runtime (the runners' host:
placements, edges, branch delivery) and the Engine (assignments, receiving, redrive, reports).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence

from grpclib.client import Channel

from etlrouter._proto.v1 import control_pb2, dataplane_pb2, records_pb2
from etlrouter.core import tracing
from etlrouter.core.config import SidecarConfig, TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.flow.credits import Credits
from etlrouter.flow.retry import Backoff
from etlrouter.security.context import Security
from etlrouter.sidecar.dlq_sink import DlqSinkForwarder
from etlrouter.sidecar.edges import Edge, EdgeBrokenError, LocalEdge, RemoteEdge
from etlrouter.sidecar.model import BatchResult, BranchShedError, DeadLetterSink, LocalService
from etlrouter.sidecar.source import SourceRunner
from etlrouter.sidecar.stages import ERRORS, LookupRunner, SinkRunner, StageRunner, TransformRunner
from etlrouter.sidecar.wire import UndecodableBatchError, encode_records

log = logging.getLogger(__name__)

# Between attempts to deliver to a branch (stream broken, target sidecar gone): 0.1, 0.2, ... 2 s, each
# jittered down by up to half so that the senders of a restarted sidecar do not all come back at once.
BRANCH_RETRY = Backoff(base=0.1, cap=2.0, jitter=0.5)

RUNNERS: dict[int, type[StageRunner]] = {
    control_pb2.SERVICE_KIND_SOURCE: SourceRunner,
    control_pb2.SERVICE_KIND_TRANSFORM: TransformRunner,
    control_pb2.SERVICE_KIND_LOOKUP: LookupRunner,
    control_pb2.SERVICE_KIND_SINK: SinkRunner,
}


class DagRuntime:
    """One assigned DAG on this sidecar: its spec, where every stage replica runs, and the local runners.
    The `StageHost` of its runners: what they need of the engine goes through here."""

    def __init__(self, engine: Engine, dag_id: str) -> None:
        self.engine = engine
        self._dag_id = dag_id
        self.spec = control_pb2.DagSpec()
        self.token = 0
        self.stages: dict[str, control_pb2.StageSpec] = {}
        self.placements: dict[str, list[control_pb2.StagePlacement]] = {}
        self.runners: dict[tuple[str, int], StageRunner] = {}
        self.edges: dict[tuple[str, str, int], Edge] = {}
        self._round_robin = itertools.count()

    # -- StageHost -------------------------------------------------------------------------------------

    @property
    def dag_id(self) -> str:
        return self._dag_id

    @property
    def config(self) -> SidecarConfig:
        return self.engine.config

    def channel_for(self, endpoint: str) -> Channel:
        return self.engine.channel_for(endpoint)

    def stage_spec(self, stage_id: str) -> control_pb2.StageSpec | None:
        return self.stages.get(stage_id)

    def tap(self, stage_id: str, batch: records_pb2.RawRecordBatch) -> None:
        self.engine.tap(self._dag_id, stage_id, batch)

    async def put_dead_letters(self, letters: Sequence[dataplane_pb2.DeadLetter], dlq_sink: str = "") -> None:
        await self.engine.put_dead_letters(letters, dlq_sink)

    # ---------------------------------------------------------------------------------------------------

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
                    self.dag_id,
                    name,
                    placement.data_address,
                    open_frame,
                    engine.transport_config,
                    engine.security,
                )
            edge.sidecar_id = placement.sidecar_id
            self.edges[key] = edge
        return edge

    async def deliver_to_branch(
        self,
        from_stage: str,
        child: str,
        batch: records_pb2.RawRecordBatch,
        rng: random.Random,
        may_shed: bool = True,
    ) -> BatchResult:
        """Deliver a batch to one child stage (any replica), retrying until it is handled. Raises
        BranchShedError when the child's shed bound passed first (unless not `may_shed`)."""
        shed_after = _shed_after(self.stages.get(child)) if may_shed else None
        attempt = 0
        while True:
            targets = self.placements.get(child, [])
            if not targets:
                await asyncio.sleep(0.2)  # not placed yet (or its sidecar left): wait for the router
                continue
            target = targets[next(self._round_robin) % len(targets)]
            edge = self.edge_to(from_stage, target)
            try:
                if shed_after is None:
                    result = await edge.deliver(batch)
                else:
                    result = await asyncio.wait_for(edge.deliver(batch), shed_after)
            except TimeoutError:
                # The branch lagged past its shed bound, waiting for credits or for its outcome.
                raise BranchShedError(f"branch {child} lagged past its shed bound") from None
            except EdgeBrokenError as e:
                result = BatchResult.retry(str(e))
            if result.done:
                return result
            attempt += 1
            ERRORS.labels(self.dag_id, from_stage, "delivery_retry").inc()
            tracing.add_event("delivery.retry", {"etlrouter.attempt": attempt, "error": result.error})
            await asyncio.sleep(BRANCH_RETRY.delay(attempt, rng))


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
        security: Security | None = None,
    ) -> None:
        self.sidecar_id = sidecar_id
        self.config = config
        self.transport_config = transport_config
        # Edges to other sidecars use it; the local services are reached in plaintext on loopback.
        self.security = security
        self.dlq = dlq
        self._tap = tap
        self.services: dict[str, LocalService] = {}
        self.dags: dict[str, DagRuntime] = {}
        self._dlq_sinks: DlqSinkForwarder | None = None  # opened on the first letter for a DLQ sink
        self._channels: dict[str, Channel] = {}
        self._started = time.monotonic()
        self._lock = asyncio.Lock()

    def set_services(self, services: Sequence[LocalService]) -> None:
        self.services = {s.name: s for s in services}

    def channel_for(self, endpoint: str) -> Channel:
        """A channel to a local user service (same pod, loopback: plaintext, as Dapr's app channel)."""
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
                self._dlq_sinks = DlqSinkForwarder(
                    self.sidecar_id, self.config, self.transport_config, security=self.security
                )
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
                runner = RUNNERS[spec.kind](dag, spec, replica, service)
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
            return await runner.receive(batch)
        except UndecodableBatchError as e:  # garbage records: a retry would fail the same way, forever
            log.warning(
                "stage %s: dead-lettering an undecodable batch from %s: %s", stage_id, sender or "?", e
            )
            return BatchResult(True, await runner.dead_letter_undecodable(batch, str(e)))
        except Exception as e:  # a bug or an unexpected failure: the sender retries, nothing is lost
            log.exception("stage %s failed on batch %s", stage_id, batch.header.batch_id)
            return BatchResult.retry(f"{type(e).__name__}: {e}")

    def runs(self, dag_id: str, stage_id: str) -> bool:
        dag = self.dags.get(dag_id)
        return dag is not None and dag.local_runner(stage_id) is not None

    def feeds(self, sender_sidecar_id: str, first: dataplane_pb2.DataFrame) -> bool | None:
        """Whether `sender_sidecar_id` may open this edge (security/authz.py, rule "upstream"): dead letters
        for a local sink come from any sidecar sending as itself; batches for a stage only from a sidecar
        placed on a stage whose downstream is that stage, in the DAG as this sidecar knows it. None when
        this sidecar cannot tell yet: it has not got the DAG, or the sender acts on a newer assignment (its
        fencing token) than the one here — the sender retries, as for a stage not started yet."""
        if not first.HasField("open"):
            return False
        edge = first.open
        if edge.dlq_sink:
            return True
        dag = self.dags.get(edge.dag_id)
        if dag is None or edge.fencing_token > dag.token:
            return None
        parents = {s.id for s in dag.spec.stages if edge.stage_id in s.downstream}
        return any(
            p.sidecar_id == sender_sidecar_id for stage in parents for p in dag.placements.get(stage, ())
        )

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

        async def send(batch: records_pb2.RawRecordBatch) -> BatchResult:
            if runner is not None:
                return await runner.receive(batch)
            assert parent is not None
            return await parent.deliver_to_branch(stage_id, batch, may_shed=False)

        if tracing.TRACER is not None:
            from etlrouter.sidecar import tracing as traced

            attributes = {"etlrouter.dag": dag_id, "etlrouter.stage": stage_id}
            service = dag.stages[stage_id].service
            result = await traced.traced_redrive(attributes, stage_id, service, letters, batch, send)
        else:
            result = await send(batch)
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
