"""The live view of `etlrouter dev`: what the processes' /metrics and the admin API say, once a second.

Collecting is I/O (HTTP scrapes, one ListPipelines call); everything else here is pure: `parse_metrics`
turns Prometheus text into a `Sample`, `render` turns the topology and two samples into lines of text.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from etlrouter._proto.v1 import admin_pb2, control_pb2

RECEIVED = "etlrouter_component_received_events"
ACKED = "etlrouter_source_acked_events"
DLQ = "etlrouter_dlq_written_events"
CREDITS = "etlrouter_edge_credits_available_records"
LAG = "etlrouter_watermark_lag_seconds"
IS_LEADER = "etlrouter_raft_is_leader"

KIND_NAMES = {
    control_pb2.SERVICE_KIND_SOURCE: "source",
    control_pb2.SERVICE_KIND_TRANSFORM: "transform",
    control_pb2.SERVICE_KIND_SINK: "sink",
    control_pb2.SERVICE_KIND_LOOKUP: "lookup",
}

StageKey = tuple[str, str]  # (dag id, stage id)


@dataclass
class Sample:
    """Counters and gauges summed over every scraped process, at one moment."""

    at: float = 0.0
    received: dict[StageKey, float] = field(default_factory=lambda: defaultdict(float))
    acked: dict[StageKey, float] = field(default_factory=lambda: defaultdict(float))
    dlq: dict[StageKey, float] = field(default_factory=lambda: defaultdict(float))
    lag: dict[StageKey, float] = field(default_factory=dict)
    credits: dict[StageKey, float] = field(default_factory=lambda: defaultdict(float))  # by target stage
    leaders: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)


def parse_metrics(text: str, sample: Sample, process: str = "") -> None:
    """Add what one process's /metrics says to `sample`."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == RECEIVED + "_total":
                sample.received[labels["dag"], labels["stage"]] += s.value
            elif s.name == ACKED + "_total":
                sample.acked[labels["dag"], labels["stage"]] += s.value
            elif s.name == DLQ + "_total":
                sample.dlq[labels["dag"], labels["stage"]] += s.value
            elif s.name == LAG:
                key = (labels["dag"], labels["stage"])
                sample.lag[key] = max(sample.lag.get(key, 0.0), s.value)
            elif s.name == CREDITS:
                target = labels["edge"].partition("->")[2].partition("#")[0]
                sample.credits[labels["dag"], target] += s.value
            elif s.name == IS_LEADER and s.value >= 1 and process:
                sample.leaders.append(process)


@dataclass(frozen=True)
class Stage:
    dag: str
    id: str
    kind: str
    service: str
    pipelines: tuple[str, ...]
    downstream: tuple[str, ...]
    depth: int
    last_child: bool
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Topology:
    stages: tuple[Stage, ...] = ()
    phases: tuple[tuple[str, str], ...] = ()  # (pipeline, phase)

    def sinks(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "sink"]

    def path_to(self, stage: Stage) -> list[Stage]:
        """The stages from the DAG's source down to `stage` (inclusive)."""
        parent = {child: s for s in self.stages if s.dag == stage.dag for child in s.downstream}
        by_id = {s.id: s for s in self.stages if s.dag == stage.dag}
        path = [stage]
        while path[-1].id in parent:
            path.append(parent[path[-1].id])
        return [by_id[s.id] for s in reversed(path)]


def topology_from(reply: admin_pb2.ListPipelinesResponse) -> Topology:
    """Depth-first order of every DAG's stages, for a tree view."""
    stages: list[Stage] = []

    def walk(
        dag: control_pb2.DagSpec,
        specs: dict[str, control_pb2.StageSpec],
        stage_id: str,
        depth: int,
        last: bool,
    ) -> None:
        spec = specs[stage_id]
        stages.append(
            Stage(
                dag.id,
                spec.id,
                KIND_NAMES.get(spec.kind, "?"),
                spec.service,
                tuple(sorted(spec.pipelines)),
                tuple(spec.downstream),
                depth,
                last,
                tuple(sorted(spec.options.items())),
            )
        )
        kids = [d for d in spec.downstream if d in specs]
        for i, kid in enumerate(kids):
            walk(dag, specs, kid, depth + 1, i == len(kids) - 1)

    for dag in reply.dags:
        specs = {s.id: s for s in dag.stages}
        children = {c for s in dag.stages for c in s.downstream}
        roots = [s.id for s in dag.stages if s.id not in children]
        for i, root in enumerate(roots):
            walk(dag, specs, root, 0, i == len(roots) - 1)
    phases = tuple(
        (p.name, admin_pb2.PipelinePhase.Name(p.phase).removeprefix("PIPELINE_PHASE_"))
        for p in reply.pipelines
    )
    return Topology(tuple(stages), phases)


def _rate(now: Sample, before: Sample | None, key: StageKey) -> float:
    if before is None or now.at <= before.at:
        return 0.0
    return max(0.0, now.received.get(key, 0.0) - before.received.get(key, 0.0)) / (now.at - before.at)


def _num(x: float) -> str:
    if x >= 10_000_000:
        return f"{x / 1e6:.0f}M"
    if x >= 100_000:
        return f"{x / 1e3:.0f}k"
    return f"{x:.0f}"


BOLD, DIM, GREEN, YELLOW, RED, RESET = "\x1b[1m", "\x1b[2m", "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[0m"


def render(
    topology: Topology,
    now: Sample,
    before: Sample | None,
    header: Sequence[str] = (),
    *,
    color: bool = True,
) -> list[str]:
    """The view as lines of text (ANSI colours when `color`)."""

    def c(code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if color else text

    lines = [c(BOLD, h) if i == 0 else h for i, h in enumerate(header)]
    if now.leaders:
        lines.append(f"raft leader: {', '.join(now.leaders)}")
    if now.unreachable:
        lines.append(c(YELLOW, f"no /metrics from: {', '.join(now.unreachable)}"))
    if topology.phases:
        lines.append("pipelines: " + ", ".join(f"{name} ({phase})" for name, phase in topology.phases))
    lines.append("")
    cols = (
        f"{'STAGE':<34} {'KIND':<9} {'REC/S':>8} {'RECEIVED':>9} {'ACKED':>9} {'DLQ':>6} {'CREDITS':>8} "
        f"{'BEHIND':>7}  PIPELINES"
    )
    lines.append(c(BOLD, cols))
    if not topology.stages:
        lines.append(c(DIM, "(no pipelines yet)"))
    sources = {s.dag: (s.dag, s.id) for s in topology.stages if s.depth == 0}
    for stage in topology.stages:
        key = (stage.dag, stage.id)
        branch = (
            "" if stage.depth == 0 else "   " * (stage.depth - 1) + ("└─ " if stage.last_child else "├─ ")
        )
        name = (branch + stage.service)[:34]
        received = now.received.get(key, 0.0)
        acked = _num(now.acked[key]) if stage.kind == "source" else "-"
        dlq = now.dlq.get(key, 0.0)
        credits = _num(now.credits[key]) if key in now.credits else "-"
        source = sources.get(stage.dag)
        lag = "-"
        if stage.depth and key in now.lag and source in now.lag:  # event time behind the DAG's source
            lag = f"{max(0.0, now.lag[key] - now.lag[source]):.1f}s"
        shared = len(stage.pipelines) > 1
        pipes = ", ".join(stage.pipelines) + (" (shared)" if shared else "")
        row = (
            f"{name:<34} {stage.kind:<9} {_num(_rate(now, before, key)):>8} {_num(received):>9} "
            f"{acked:>9} {c(RED, f'{_num(dlq):>6}') if dlq else f'{0:>6}'} {credits:>8} {lag:>7}  "
            f"{c(GREEN, pipes) if shared else pipes}"
        )
        lines.append(row)
    if topology.stages:
        lines += [
            "",
            c(
                DIM,
                "BEHIND: how far the stage's event-time watermark trails its source's "
                "(etlrouter_watermark_lag_seconds, stage minus source): ~0 when the stage keeps up",
            ),
        ]
    return lines


def summary_line(topology: Topology, now: Sample, before: Sample | None) -> str:
    """One line for a log or a pipe: records/s in and total at each sink, acked at each source."""
    parts: list[str] = []
    for stage in topology.stages:
        key = (stage.dag, stage.id)
        if stage.kind == "source":
            parts.append(f"{stage.service}: acked {now.acked.get(key, 0.0):.0f}")
        elif stage.kind == "sink":
            rate = _rate(now, before, key)
            parts.append(f"{stage.service}: {now.received.get(key, 0.0):.0f} ({rate:.0f}/s)")
        dlq = now.dlq.get(key, 0.0)
        if dlq:
            parts.append(f"{stage.service}: {dlq:.0f} dead-lettered")
    return time.strftime("%H:%M:%S ") + ("; ".join(parts) if parts else "no pipelines running yet")


def shared_stages(topology: Topology) -> Iterable[Stage]:
    return (s for s in topology.stages if len(s.pipelines) > 1)
