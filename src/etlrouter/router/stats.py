"""Leader-local live statistics from the sidecars' heartbeats: per stage, per edge, per sidecar.

Soft state like liveness (control/liveness.py), never replicated: a new leader starts empty and has rates
again after two heartbeats. The store keeps the last two reports of every (sidecar, dag, stage) and turns
them into counts and rates; every rule the dashboard shows (what counts as backpressure, when a sidecar is
silent) lives here, pure: callers pass the time in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from etlrouter.control.liveness import Health, Liveness, LoadReport

# An edge is backpressured when its sender waited for credits at least this share of the last interval, or
# when a batch on it has waited this long for its answer (the child stopped finishing batches: with small
# batches the source's in-flight bound is reached before the credit window runs out).
BACKPRESSURE_RATIO = 0.5
STALLED_AFTER_S = 2.0
# A sidecar is silent (probably dead) when not heard from for this many of its own heartbeat intervals...
SILENT_INTERVALS = 3
# ...and never sooner than this, so one late heartbeat on a busy machine does not flap the dashboard.
SILENT_MIN_MS = 1_500
# Reports (and sidecars that left the registry) are forgotten after this long without a heartbeat.
RETENTION_MS = 10 * 60_000
# At most this many stage reports per sidecar and edges per stage are kept: heartbeats are network input.
MAX_STAGES_PER_SIDECAR = 1_024
MAX_EDGES_PER_STAGE = 256
# Sidecars past the retention are looked for at most this often (a heartbeat must not scan the registry).
PRUNE_EVERY_MS = 1_000


@dataclass(frozen=True, slots=True)
class EdgeSample:
    to_stage: str
    records_sent: int
    credits_available: int
    starved_s: float
    in_flight: int
    oldest_in_flight_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StageSample:
    """One StageReport as received, stamped with the router's clock (rates never mix two clocks)."""

    at_ms: int
    records_in: int = 0
    records_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    dead_lettered: int = 0
    watermark_ms: int = 0
    acked_records: int = 0
    acked_offsets: Mapping[int, int] = field(default_factory=dict)
    last_error: str = ""
    edges: tuple[EdgeSample, ...] = ()


@dataclass(slots=True)
class StageStats:
    dag_id: str
    stage_id: str
    replicas: int = 0
    records_in: int = 0
    records_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    records_in_per_s: float = 0.0
    records_out_per_s: float = 0.0
    bytes_in_per_s: float = 0.0
    bytes_out_per_s: float = 0.0
    errors: int = 0
    dead_lettered: int = 0
    watermark_ms: int = 0  # the minimum over replicas that have one; 0 = none yet
    watermark_lag_ms: int | None = None
    acked_records: int = 0
    acked_offsets: dict[int, int] = field(default_factory=dict)  # lowest over replicas, per partition
    last_error: str = ""
    sidecars: list[str] = field(default_factory=list)


@dataclass(slots=True)
class EdgeStats:
    dag_id: str
    from_stage: str
    to_stage: str
    records_sent: int = 0
    records_per_s: float = 0.0
    credits_available: int = 0
    starved_s: float = 0.0
    starved_ratio: float = 0.0  # share of the last interval a sender waited for credits (worst replica)
    in_flight: int = 0
    oldest_in_flight_s: float = 0.0
    # Backpressured, and nothing below its child is: the child is where the pipeline is held back.
    origin: bool = False

    @property
    def backpressure(self) -> bool:
        return self.starved_ratio >= BACKPRESSURE_RATIO or self.oldest_in_flight_s >= STALLED_AFTER_S


@dataclass(frozen=True, slots=True)
class SidecarSeen:
    last_ms: int
    interval_ms: int | None  # the gap between its last two heartbeats


@dataclass(slots=True)
class StatsSnapshot:
    stages: list[StageStats]
    edges: list[EdgeStats]


def _rate(new: float, old: float, seconds: float) -> float:
    """Per second; 0 across a counter reset (a replica restarted or moved) or without elapsed time."""
    return (new - old) / seconds if seconds > 0 and new >= old else 0.0


def silent(age_ms: int | None, interval_ms: int | None, default_interval_ms: int) -> bool:
    """Whether a sidecar last heard from `age_ms` ago counts as silent (probably dead)."""
    if age_ms is None:
        return False
    return age_ms > max(SILENT_MIN_MS, SILENT_INTERVALS * (interval_ms or default_interval_ms))


class StatsStore:
    def __init__(self, *, retention_ms: int = RETENTION_MS) -> None:
        self.retention_ms = retention_ms
        # sidecar -> (dag, stage) -> (previous, latest). Per sidecar, so that a heartbeat costs the size of
        # its own report, not of the whole registry (10,000 sidecars heartbeat 2,000 times a second).
        self._samples: dict[str, dict[tuple[str, str], tuple[StageSample | None, StageSample]]] = {}
        self._seen: dict[str, SidecarSeen] = {}
        self._pruned_ms: int | None = None

    def record(self, sidecar_id: str, now_ms: int, reports: Iterable[tuple[str, str, StageSample]]) -> None:
        """One heartbeat's stage reports: (dag, stage, sample). Stages it no longer reports are dropped."""
        seen = self._seen.get(sidecar_id)
        interval = now_ms - seen.last_ms if seen is not None and now_ms > seen.last_ms else None
        self._seen[sidecar_id] = SidecarSeen(now_ms, interval)
        before = self._samples.get(sidecar_id, {})
        fresh: dict[tuple[str, str], tuple[StageSample | None, StageSample]] = {}
        for dag_id, stage_id, sample in reports:
            if len(fresh) >= MAX_STAGES_PER_SIDECAR:
                break
            old = before.get((dag_id, stage_id))
            fresh[(dag_id, stage_id)] = (old[1] if old is not None else None, sample)
        self._samples[sidecar_id] = fresh
        self._prune(now_ms)

    def forget(self, sidecar_id: str) -> None:
        self._seen.pop(sidecar_id, None)
        self._samples.pop(sidecar_id, None)

    def seen(self) -> dict[str, SidecarSeen]:
        return dict(self._seen)

    def _prune(self, now_ms: int) -> None:
        """Forget sidecars silent past the retention; a full pass at most once per PRUNE_EVERY_MS."""
        if self._pruned_ms is not None and 0 <= now_ms - self._pruned_ms < PRUNE_EVERY_MS:
            return
        self._pruned_ms = now_ms
        gone = [s for s, seen in self._seen.items() if now_ms - seen.last_ms > self.retention_ms]
        for sidecar_id in gone:
            self.forget(sidecar_id)

    def _sorted_samples(
        self,
    ) -> Iterable[tuple[str, tuple[str, str], tuple[StageSample | None, StageSample]]]:
        for sidecar_id in sorted(self._samples):
            for key, pair in sorted(self._samples[sidecar_id].items()):
                yield sidecar_id, key, pair

    def snapshot(self, now_ms: int, *, stale_after_ms: int, wall_ms: int | None = None) -> StatsSnapshot:
        """Stages and edges summed over replicas, from sidecars heard within `stale_after_ms` (the stages of a
        dead sidecar run elsewhere once the leader moved them; its last counts would be counted twice).

        `now_ms` is the clock the reports were stamped with (monotonic in the router); `wall_ms` the Unix time
        watermarks are compared with (event time is wall-clock time); it defaults to `now_ms`."""
        stages: dict[tuple[str, str], StageStats] = {}
        edges: dict[tuple[str, str, str], EdgeStats] = {}
        for sidecar_id, (dag_id, stage_id), (old, new) in self._sorted_samples():
            seen = self._seen.get(sidecar_id)
            if seen is None or now_ms - seen.last_ms > stale_after_ms:
                continue
            seconds = (new.at_ms - old.at_ms) / 1000 if old is not None else 0.0
            stage = stages.setdefault((dag_id, stage_id), StageStats(dag_id, stage_id))
            stage.replicas += 1
            stage.sidecars.append(sidecar_id)
            stage.records_in += new.records_in
            stage.records_out += new.records_out
            stage.bytes_in += new.bytes_in
            stage.bytes_out += new.bytes_out
            stage.errors += new.errors
            stage.dead_lettered += new.dead_lettered
            stage.acked_records += new.acked_records
            if old is not None:
                stage.records_in_per_s += _rate(new.records_in, old.records_in, seconds)
                stage.records_out_per_s += _rate(new.records_out, old.records_out, seconds)
                stage.bytes_in_per_s += _rate(new.bytes_in, old.bytes_in, seconds)
                stage.bytes_out_per_s += _rate(new.bytes_out, old.bytes_out, seconds)
            if new.watermark_ms and (not stage.watermark_ms or new.watermark_ms < stage.watermark_ms):
                stage.watermark_ms = new.watermark_ms
            for partition, offset in new.acked_offsets.items():
                held = stage.acked_offsets.get(partition)
                stage.acked_offsets[partition] = offset if held is None else min(held, offset)
            if new.last_error and not stage.last_error:
                stage.last_error = new.last_error
            previous = {e.to_stage: e for e in old.edges} if old is not None else {}
            for sample in new.edges:
                edge = edges.setdefault(
                    (dag_id, stage_id, sample.to_stage), EdgeStats(dag_id, stage_id, sample.to_stage)
                )
                edge.records_sent += sample.records_sent
                edge.credits_available += sample.credits_available
                edge.starved_s += sample.starved_s
                edge.in_flight += sample.in_flight
                edge.oldest_in_flight_s = max(edge.oldest_in_flight_s, sample.oldest_in_flight_s)
                before = previous.get(sample.to_stage)
                if before is not None and seconds > 0:
                    edge.records_per_s += _rate(sample.records_sent, before.records_sent, seconds)
                    ratio = min(1.0, _rate(sample.starved_s, before.starved_s, seconds))
                    edge.starved_ratio = max(edge.starved_ratio, ratio)
        pressed = {(e.dag_id, e.from_stage) for e in edges.values() if e.backpressure}
        for e in edges.values():
            e.origin = e.backpressure and (e.dag_id, e.to_stage) not in pressed
        wall = now_ms if wall_ms is None else wall_ms
        for stage in stages.values():
            if stage.watermark_ms:
                stage.watermark_lag_ms = max(0, wall - stage.watermark_ms)
        return StatsSnapshot(
            stages=[stages[k] for k in sorted(stages)], edges=[edges[k] for k in sorted(edges)]
        )


# --- the live snapshot: what GraphQL `stats` shows, built on the leader, sent to followers (GetLiveStats;
# the proto conversions are in router/convert.py) ---


@dataclass(frozen=True, slots=True)
class SidecarLive:
    """One sidecar as the leader hears it."""

    sidecar_id: str
    health: Health = "unknown"
    load: LoadReport | None = None
    age_ms: int | None = None  # since the leader last heard from it; None = not heard by this leader
    silent: bool = False
    registered: bool = True


@dataclass(slots=True)
class LiveStats:
    at_ms: int  # Unix ms, the leader's clock
    leader_id: str
    stages: list[StageStats]
    edges: list[EdgeStats]
    sidecars: list[SidecarLive]  # registered ones in registry order, then those gone recently


def live_stats(
    store: StatsStore,
    liveness: Liveness,
    registered: Sequence[str],
    *,
    now_ms: int,
    wall_ms: int,
    leader_id: str,
    stale_after_ms: int,
    default_interval_ms: int,
) -> LiveStats:
    """The leader's snapshot. A sidecar silent past `stale_after_ms` (the heartbeat timeout) has had its
    stages moved: its last counts are left out. Pure: both clocks are passed in."""
    snapshot = store.snapshot(now_ms, stale_after_ms=stale_after_ms, wall_ms=wall_ms)
    seen = store.seen()
    sidecars: list[SidecarLive] = []
    for sidecar_id in registered:
        pulse = liveness.pulse(sidecar_id)
        age = max(0, now_ms - pulse.last_heartbeat_ms) if pulse is not None else None
        heard = seen.get(sidecar_id)
        sidecars.append(
            SidecarLive(
                sidecar_id,
                health=pulse.health if pulse is not None else "unknown",
                load=pulse.load if pulse is not None else None,
                age_ms=age,
                silent=silent(age, heard.interval_ms if heard is not None else None, default_interval_ms),
            )
        )
    known = set(registered)
    for sidecar_id, heard in sorted(seen.items()):
        if sidecar_id not in known:  # left the registry recently: the dashboard shows it as gone
            age = max(0, now_ms - heard.last_ms)
            sidecars.append(SidecarLive(sidecar_id, "not_serving", None, age, silent=True, registered=False))
    return LiveStats(wall_ms, leader_id, snapshot.stages, snapshot.edges, sidecars)
