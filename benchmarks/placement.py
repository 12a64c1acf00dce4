"""Placement and control-state cost at cluster scale, against trivial baselines from the same run.

    .venv/bin/python benchmarks/placement.py [--sidecars 1000] [--pipelines 500] [--repeat 3]

The cluster: `--sidecars` sidecars, each fronting one service (one service per pod, as deployed),
spread over 20 sources, 40 transforms and 40 sinks (so ten sidecars per service at 1000).
Pipeline i reads source i % 20 and runs two transforms and a sink picked by a seeded generator, so
many pipelines share a source and a prefix and the optimizer merges them; transforms run with
parallelism 1-4.

Rows:
* place from scratch: `place()` on an empty assignment, vs round-robin over the capable sidecars
* reassign after one sidecar dies: `place()` with the busiest sidecar gone, vs round-robin of its
  replicas alone
* apply(): RegisterSidecar, one-pipeline ApplyPipelines, a one-replica AssignStages, the full
  initial AssignStages, DeregisterSidecar, and commands_for_sidecar (a heartbeat's answer), vs
  decoding the same entry without applying it

Every row is timed `--repeat` times; the best run counts (the least disturbed by the machine).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from etlrouter.control import (
    ApplyPipelines,
    AssignStages,
    ControlState,
    DeregisterSidecar,
    RegisterSidecar,
    ReplicaAssignment,
    ReplicaKey,
    ServiceInstance,
    SidecarView,
    decode_command,
    encode_command,
    parallelism_of,
    place,
)
from etlrouter.dsl import MergedDag, StageKind


def service_kinds(count: int) -> dict[str, StageKind]:
    """`count` services: a fifth sources, two fifths transforms, two fifths sinks."""
    sources = max(1, count // 5)
    transforms = max(2, (count - sources) // 2)
    sinks = max(1, count - sources - transforms)
    return {
        **{f"source-{i:03d}": "source" for i in range(sources)},
        **{f"transform-{i:03d}": "transform" for i in range(transforms)},
        **{f"sink-{i:03d}": "sink" for i in range(sinks)},
    }


def pipeline_texts(count: int, kinds: dict[str, StageKind]) -> list[str]:
    rng = random.Random(20261126)
    sources = [name for name, kind in kinds.items() if kind == "source"]
    transforms = [name for name, kind in kinds.items() if kind == "transform"][:8]  # long shared prefixes
    sinks = [name for name, kind in kinds.items() if kind == "sink"]
    texts = []
    for i in range(count):
        first, second = rng.sample(transforms, 2)
        texts.append(
            f"pipeline p{i:04d} {{\n"
            f"  source {sources[i % len(sources)]}\n"
            f"  | transform {first} (parallelism = {1 + i % 4})\n"
            f"  | transform {second}\n"
            f"  | sink {rng.choice(sinks)}\n"
            "}\n"
        )
    return texts


def sidecar_commands(count: int, kinds: dict[str, StageKind], offset: int = 0) -> list[RegisterSidecar]:
    """One service per sidecar, round-robin over the services."""
    services = list(kinds)
    commands = []
    for i in range(offset, offset + count):
        name = services[i % len(services)]
        commands.append(
            RegisterSidecar(
                sidecar_id=f"sc-{i:04d}",
                data_address=f"10.{i // 250}.{i % 250}.1:7000",
                services=(ServiceInstance(name=name, kind=kinds[name]),),
            )
        )
    return commands


def round_robin(
    dags: list[MergedDag], sidecars: list[SidecarView], current: dict[ReplicaKey, str]
) -> dict[ReplicaKey, str]:
    """The least any placement must do: walk the replicas, keep what is on a live sidecar, hand the
    rest to the capable sidecars in turn. No spread, no load, no diff."""
    capable: dict[str, list[str]] = {}
    for view in sidecars:
        for service in view.services:
            capable.setdefault(service, []).append(view.id)
    live = {view.id for view in sidecars}
    turn: dict[str, int] = {}
    desired: dict[ReplicaKey, str] = {}
    for dag in dags:
        for stage in dag.stages:
            for replica in range(parallelism_of(stage)):
                key = ReplicaKey(dag.root, stage.id, replica)
                holder = current.get(key)
                if holder is not None and holder in live:
                    desired[key] = holder
                    continue
                candidates = capable.get(stage.service)
                if candidates:
                    n = turn.get(stage.service, 0)
                    desired[key] = candidates[n % len(candidates)]
                    turn[stage.service] = n + 1
    return desired


def best_of(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def best_apply(repeat: int, make_state: Callable[[], ControlState], entries: list[bytes]) -> float:
    """Best time to apply `entries` to a fresh state from `make_state` (built outside the timing)."""
    best = float("inf")
    for _ in range(repeat):
        target = make_state()
        first = target.applied_index + 1
        start = time.perf_counter()
        for index, data in enumerate(entries, start=first):
            target.apply(index, data)
        best = min(best, time.perf_counter() - start)
    return best


class Row:
    def __init__(self, name: str, count: int, seconds: float, baseline: float) -> None:
        self.name, self.count, self.seconds, self.baseline = name, count, seconds, baseline

    def render(self) -> str:
        per_op = self.seconds / self.count * 1e6
        base_per_op = self.baseline / self.count * 1e6
        ratio = self.seconds / self.baseline if self.baseline else float("inf")
        rate = self.count / self.seconds
        return (
            f"| {self.name:<58} | {self.count:>6} | {self.seconds * 1e3:>9.1f} | {per_op:>10.1f} |"
            f" {rate:>10.0f} | {base_per_op:>10.2f} | {ratio:>7.1f}x |"
        )


def fresh_state(registers: list[bytes], pipelines: list[bytes]) -> ControlState:
    state = ControlState()
    for index, data in enumerate([*registers, *pipelines], start=1):
        result = state.apply(index, data)
        assert result.error is None, result.error
    return state


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sidecars", type=int, default=1000)
    parser.add_argument("--pipelines", type=int, default=500)
    parser.add_argument("--services", type=int, default=100, help="distinct services (sidecars share them)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    kinds = service_kinds(args.services)
    registers = [encode_command(command) for command in sidecar_commands(args.sidecars, kinds)]
    texts = pipeline_texts(args.pipelines, kinds)
    applies = [
        encode_command(ApplyPipelines(definition=text, filename=f"p{i}.etl")) for i, text in enumerate(texts)
    ]
    state = fresh_state(registers, applies)
    dags = state.dags()
    views = [SidecarView(id=k, services=v) for k, v in state.sidecar_services().items()]
    replicas = sum(parallelism_of(stage) for dag in dags for stage in dag.stages)
    stages = sum(len(dag.stages) for dag in dags)
    print(
        f"{args.sidecars} sidecars over {len(kinds)} services, {args.pipelines} pipelines"
        f" -> {len(dags)} merged DAGs,"
        f" {stages} stages, {replicas} replicas (unmerged pipelines would run {4 * args.pipelines} stages)"
    )
    rows: list[Row] = []

    # --- placement -----------------------------------------------------------------------------
    plan = place(dags, views, {})
    assert not plan.unplaced and len(plan.desired) == replicas
    rows.append(
        Row(
            "place from scratch (per replica)",
            replicas,
            best_of(args.repeat, lambda: place(dags, views, {})),
            best_of(args.repeat, lambda: round_robin(dags, views, {})),
        )
    )
    busiest = max(
        sorted(views, key=lambda v: v.id), key=lambda v: sum(h == v.id for h in plan.desired.values())
    )
    survivors = [view for view in views if view.id != busiest.id]
    orphaned = sum(holder == busiest.id for holder in plan.desired.values())
    after = place(dags, survivors, plan.desired)
    assert len(after.changes) == orphaned, (len(after.changes), orphaned)
    rows.append(
        Row(
            f"reassign after one sidecar dies ({orphaned} replicas, per replica)",
            replicas,
            best_of(args.repeat, lambda: place(dags, survivors, plan.desired)),
            best_of(args.repeat, lambda: round_robin(dags, survivors, plan.desired)),
        )
    )

    joined = views + [
        SidecarView(id=command.sidecar_id, services=frozenset(s.name for s in command.services))
        for command in sidecar_commands(max(1, args.sidecars // 10), kinds, offset=args.sidecars)
    ]
    assert place(dags, joined, plan.desired).is_empty  # joining moves nothing by itself
    rebalanced = place(dags, joined, plan.desired, rebalance=True)
    rows.append(
        Row(
            f"rebalance after {len(joined) - len(views)} sidecars join ({len(rebalanced.changes)} moves)",
            replicas,
            best_of(args.repeat, lambda: place(dags, joined, plan.desired, rebalance=True)),
            best_of(args.repeat, lambda: place(dags, joined, plan.desired)),
        )
    )

    # --- apply() -----------------------------------------------------------------------------------
    def decode_all(entries: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            for data in entries:
                decode_command(data)

        return run

    snapshot_with_pipelines = state.snapshot()
    snapshot_without = fresh_state(registers, []).snapshot()
    rows.append(
        Row(
            "apply RegisterSidecar",
            len(registers),
            best_apply(args.repeat, ControlState, registers),
            best_of(args.repeat, decode_all(registers)),
        )
    )
    rows.append(
        Row(
            "apply ApplyPipelines (1 pipeline each, growing)",
            len(applies),
            best_apply(args.repeat, lambda: ControlState.from_snapshot(snapshot_without), applies),
            best_of(args.repeat, decode_all(applies)),
        )
    )
    full = [encode_command(AssignStages(assignments=plan.changes))]
    rows.append(
        Row(
            f"apply AssignStages, initial plan ({len(plan.changes)} replicas)",
            1,
            best_apply(args.repeat, lambda: ControlState.from_snapshot(snapshot_with_pipelines), full),
            best_of(args.repeat, decode_all(full)),
        )
    )
    placed = fresh_state(registers, applies)
    placed.apply(placed.applied_index + 1, full[0])
    snapshot_placed = placed.snapshot()
    # One-replica moves back and forth between two capable sidecars, as rebalancing would propose.
    moves: list[bytes] = []
    for i, (key, holder) in enumerate(sorted(plan.desired.items())[: args.sidecars]):
        service = next(dag for dag in dags if dag.root == key.dag_id).stage(key.stage_id).service
        other = next(view.id for view in views if service in view.services and view.id != holder)
        target = other if i % 2 == 0 else holder
        moves.append(encode_command(AssignStages(assignments=(ReplicaAssignment(*key, target),))))
    rows.append(
        Row(
            "apply AssignStages (1 replica each)",
            len(moves),
            best_apply(args.repeat, lambda: ControlState.from_snapshot(snapshot_placed), moves),
            best_of(args.repeat, decode_all(moves)),
        )
    )
    leaves = [
        encode_command(DeregisterSidecar(sidecar_id=view.id)) for view in views[:: max(1, len(views) // 100)]
    ]
    rows.append(
        Row(
            "apply DeregisterSidecar (frees its replicas)",
            len(leaves),
            best_apply(args.repeat, lambda: ControlState.from_snapshot(snapshot_placed), leaves),
            best_of(args.repeat, decode_all(leaves)),
        )
    )
    restored_placed = ControlState.from_snapshot(snapshot_placed)
    holders = sorted({holder for holder in plan.desired.values()})

    def heartbeats() -> None:
        for sidecar_id in holders:
            restored_placed.commands_for_sidecar(sidecar_id, {})

    def lookups() -> None:
        for sidecar_id in holders:
            restored_placed.replicas_of(sidecar_id)

    rows.append(
        Row(
            "commands_for_sidecar, full answer (vs replicas_of)",
            len(holders),
            best_of(args.repeat, heartbeats),
            best_of(args.repeat, lookups),
        )
    )
    rows.append(
        Row(
            "snapshot + restore (whole state)",
            1,
            best_of(args.repeat, lambda: ControlState.from_snapshot(restored_placed.snapshot())),
            best_of(args.repeat, restored_placed.snapshot),
        )
    )

    print(f"snapshot size: {len(snapshot_placed) / 1024:.0f} KiB\n")
    print(
        f"| {'operation':<58} | {'count':>6} | {'total ms':>9} | {'µs / op':>10} | {'ops / s':>10} |"
        f" {'base µs/op':>10} | {'ratio':>8} |"
    )
    print(f"|{'-' * 60}|{'-' * 8}|{'-' * 11}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 10}|")
    for row in rows:
        print(row.render())
    print(
        "\nbaselines: placement rows = round-robin over capable sidecars (rebalance: place() without"
        " rebalancing); apply rows = decoding the"
        " same entries; commands_for_sidecar = replicas_of; snapshot + restore = snapshot alone."
    )


if __name__ == "__main__":
    main()
