"""Placement: which sidecar runs each replica of each stage. The one place that rule lives.

`place` is a pure function of the merged DAGs, the live sidecars (the services each fronts, its
reported load) and the current assignment. It returns the full desired assignment and the diff per
sidecar; the leader proposes the diff as an `AssignStages` command, so the decision reaches every
replica of the state through the log.

Rules, in the order they are applied:

1. Keep. A current replica stays where it is when its stage still exists, its replica index is
   below the stage's parallelism, and its sidecar is still live and still fronts the stage's
   service. Nothing else moves unless a rule below says so: a sidecar leaving moves only its own
   replicas, a sidecar joining moves nothing.
2. Fill. Every unassigned replica goes to the best capable sidecar: fewest replicas of the same
   stage (spread: losing one sidecar should not stop a stage), then not overloaded, then fewest
   replicas overall, then lowest load, then id. Capable means live, accepting new work, and
   fronting the stage's service.
   Parallelism rule: every replica is placed as soon as one capable sidecar exists; replicas
   share a sidecar only when every capable sidecar already runs one (so a stage of parallelism
   `p` with `n` capable sidecars runs on `min(p, n)` distinct sidecars).
3. Shed. A sidecar whose reported load is at or above `overload_threshold` gives up at most
   `shed_per_sidecar` replicas, each only to a strictly better home: a live, accepting sidecar
   fronting the service that is not overloaded, reports a lower load, and runs fewer replicas of
   that stage. Shedding needs a report of what the sidecar holds now (its `running_stages` equals
   its replicas after keeping and filling), so one report sheds once: on the output the count no
   longer matches and nothing more is shed.
4. Rebalance (only when asked). Move replicas while a move strictly improves spread without
   worsening balance, or strictly improves balance (replica counts differing by two or more)
   without worsening spread. Each move lowers (spread, balance) lexicographically, so this stops,
   and stops at a fixed point: rebalancing the output again moves nothing.

Stages whose service no live sidecar fronts stay unassigned and are reported in `unplaced`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from etlrouter.control.commands import AssignStages
from etlrouter.control.model import ReplicaAssignment, ReplicaKey, parallelism_of
from etlrouter.dsl import MergedDag

DEFAULT_OVERLOAD_THRESHOLD = 0.85


class SidecarView(msgspec.Struct, frozen=True, kw_only=True):
    """What placement knows of one live sidecar."""

    id: str
    services: frozenset[str]
    # Reported utilisation, 0..1 (buffer use; a DEGRADED sidecar reports 1.0).
    load: float = 0.0
    # Replicas the sidecar was running when it reported `load`; None when it has not reported.
    running_stages: int | None = None
    # False for a sidecar that is not serving: it keeps what it has but gets nothing new.
    accepting: bool = True


class UnplacedStage(msgspec.Struct, frozen=True):
    dag_id: str
    stage_id: str
    service: str
    missing_replicas: int


@dataclass(frozen=True)
class PlacementPlan:
    """`desired` maps every assigned replica to its sidecar (unassigned replicas are absent)."""

    desired: dict[ReplicaKey, str]
    assign: dict[str, tuple[ReplicaKey, ...]]
    revoke: dict[str, tuple[ReplicaKey, ...]]
    unplaced: tuple[UnplacedStage, ...]
    changes: tuple[ReplicaAssignment, ...] = field(default=())

    @property
    def is_empty(self) -> bool:
        return not self.changes

    def to_command(self) -> AssignStages | None:
        """The command the leader proposes, or None when nothing changes."""
        return AssignStages(assignments=self.changes) if self.changes else None


@dataclass
class _Stage:
    dag_id: str
    stage_id: str
    service: str
    parallelism: int


class _Board:
    """Mutable working state of one placement run: who holds what, with counters kept in step."""

    def __init__(self, views: dict[str, SidecarView], threshold: float) -> None:
        self.views = views
        self.threshold = threshold
        self.holder: dict[ReplicaKey, str] = {}
        self.count: dict[str, int] = dict.fromkeys(views, 0)
        self.same: dict[tuple[str, str], dict[str, int]] = {}

    def overloaded(self, sidecar_id: str) -> bool:
        return self.views[sidecar_id].load >= self.threshold

    def same_count(self, key: ReplicaKey, sidecar_id: str) -> int:
        return self.same.get((key.dag_id, key.stage_id), {}).get(sidecar_id, 0)

    def put(self, key: ReplicaKey, sidecar_id: str) -> None:
        self.holder[key] = sidecar_id
        self.count[sidecar_id] += 1
        per_stage = self.same.setdefault((key.dag_id, key.stage_id), {})
        per_stage[sidecar_id] = per_stage.get(sidecar_id, 0) + 1

    def take(self, key: ReplicaKey) -> str:
        sidecar_id = self.holder.pop(key)
        self.count[sidecar_id] -= 1
        self.same[(key.dag_id, key.stage_id)][sidecar_id] -= 1
        return sidecar_id

    def fill_rank(self, key: ReplicaKey, sidecar_id: str) -> tuple[int, bool, int, float, str]:
        view = self.views[sidecar_id]
        return (
            self.same_count(key, sidecar_id),
            self.overloaded(sidecar_id),
            self.count[sidecar_id],
            view.load,
            sidecar_id,
        )


def place(
    dags: Sequence[MergedDag],
    sidecars: Iterable[SidecarView],
    current: Mapping[ReplicaKey, str],
    *,
    rebalance: bool = False,
    overload_threshold: float = DEFAULT_OVERLOAD_THRESHOLD,
    shed_per_sidecar: int = 1,
) -> PlacementPlan:
    """Decide where every stage replica runs; see the module docstring for the rules."""
    views = {view.id: view for view in sorted(sidecars, key=lambda view: view.id)}
    capable: dict[str, list[str]] = {}
    for view in views.values():
        if view.accepting:
            for service in view.services:
                capable.setdefault(service, []).append(view.id)
    stages = _stages(dags)
    board = _Board(views, overload_threshold)

    demand: list[tuple[ReplicaKey, _Stage]] = []
    for stage in stages:
        for replica in range(stage.parallelism):
            key = ReplicaKey(stage.dag_id, stage.stage_id, replica)
            demand.append((key, stage))
            holder = current.get(key)
            if holder is not None and holder in views and stage.service in views[holder].services:
                board.put(key, holder)

    missing: dict[tuple[str, str], int] = {}
    for key, stage in demand:
        if key in board.holder:
            continue
        candidates = capable.get(stage.service)
        if not candidates:
            missing[(stage.dag_id, stage.stage_id)] = missing.get((stage.dag_id, stage.stage_id), 0) + 1
            continue
        board.put(key, min(candidates, key=lambda sidecar_id: board.fill_rank(key, sidecar_id)))

    _shed(board, demand, capable, shed_per_sidecar)
    if rebalance:
        _rebalance(board, demand, capable)

    unplaced = tuple(
        UnplacedStage(stage.dag_id, stage.stage_id, stage.service, missing[(stage.dag_id, stage.stage_id)])
        for stage in stages
        if (stage.dag_id, stage.stage_id) in missing
    )
    return _plan(board.holder, current, unplaced)


def _stages(dags: Sequence[MergedDag]) -> list[_Stage]:
    """Every stage, in an order that depends only on the DAGs' content (root id, then DFS order)."""
    return [
        _Stage(dag.root, stage.id, stage.service, parallelism_of(stage))
        for dag in sorted(dags, key=lambda dag: dag.root)
        for stage in dag.stages
    ]


def _shed(
    board: _Board,
    demand: list[tuple[ReplicaKey, _Stage]],
    capable: dict[str, list[str]],
    per_sidecar: int,
) -> None:
    # The report must describe what the sidecar holds now, or it was taken before the last change.
    shedding = {
        sidecar_id
        for sidecar_id, view in board.views.items()
        if board.overloaded(sidecar_id) and view.running_stages == board.count[sidecar_id]
    }
    if not shedding or per_sidecar <= 0:
        return
    shed: dict[str, int] = {}
    # Latest replicas first: the most recently added work is the first to go.
    for key, stage in reversed(demand):
        source = board.holder.get(key)
        if source not in shedding or shed.get(source, 0) >= per_sidecar:
            continue
        source_load = board.views[source].load
        source_same = board.same_count(key, source)
        better = [
            sidecar_id
            for sidecar_id in capable.get(stage.service, ())
            if sidecar_id != source
            and not board.overloaded(sidecar_id)
            and board.views[sidecar_id].load < source_load
            and board.same_count(key, sidecar_id) < source_same
        ]
        if better:
            board.take(key)
            board.put(key, min(better, key=lambda sidecar_id: board.fill_rank(key, sidecar_id)))
            shed[source] = shed.get(source, 0) + 1


def _rebalance(board: _Board, demand: list[tuple[ReplicaKey, _Stage]], capable: dict[str, list[str]]) -> None:
    moved = True
    while moved:
        moved = False
        for key, stage in demand:
            source = board.holder.get(key)
            if source is None:
                continue
            source_same = board.same_count(key, source)
            source_count = board.count[source]
            targets = [
                sidecar_id
                for sidecar_id in capable.get(stage.service, ())
                if sidecar_id != source
                and not board.overloaded(sidecar_id)
                and _improves(
                    source_same, board.same_count(key, sidecar_id), source_count, board.count[sidecar_id]
                )
            ]
            if targets:
                board.take(key)
                board.put(key, min(targets, key=lambda sidecar_id: board.fill_rank(key, sidecar_id)))
                moved = True


def _improves(source_same: int, target_same: int, source_count: int, target_count: int) -> bool:
    """A move that lowers (spread, balance) lexicographically; see rule 4."""
    better_spread = source_same >= target_same + 2 and target_count < source_count
    better_balance = source_same >= target_same + 1 and source_count - target_count >= 2
    return better_spread or better_balance


def _plan(
    desired: dict[ReplicaKey, str], current: Mapping[ReplicaKey, str], unplaced: tuple[UnplacedStage, ...]
) -> PlacementPlan:
    assign: dict[str, list[ReplicaKey]] = {}
    revoke: dict[str, list[ReplicaKey]] = {}
    changes: list[ReplicaAssignment] = []
    for key in sorted(desired.keys() | current.keys()):
        before = current.get(key)
        after = desired.get(key)
        if before == after:
            continue
        changes.append(ReplicaAssignment(key.dag_id, key.stage_id, key.replica, after or ""))
        if after is not None:
            assign.setdefault(after, []).append(key)
        if before is not None:
            revoke.setdefault(before, []).append(key)
    return PlacementPlan(
        desired=dict(sorted(desired.items())),
        assign={sidecar_id: tuple(keys) for sidecar_id, keys in sorted(assign.items())},
        revoke={sidecar_id: tuple(keys) for sidecar_id, keys in sorted(revoke.items())},
        unplaced=unplaced,
        changes=tuple(changes),
    )
