"""Placement rules: unit cases for each rule, hypothesis properties for the invariants."""

from __future__ import annotations

from collections import Counter

import msgspec
from hypothesis import event, given, settings
from hypothesis import strategies as st

from etlrouter.control import ReplicaKey, SidecarView, parallelism_of, place
from etlrouter.control.placement import PlacementPlan
from etlrouter.dsl import MergedDag, OptionValue, Pipeline, StageSpec, optimize

SOURCES = ("src-a", "src-b", "src-c")
TRANSFORMS = ("tr-a", "tr-b", "tr-c")
SINKS = ("snk-a", "snk-b", "snk-c")
ALL_SERVICES = SOURCES + TRANSFORMS + SINKS


def pipeline(name: str, source: str, transform: str | None, sink: str, parallelism: int = 1) -> Pipeline:
    options: dict[str, OptionValue] = {"parallelism": parallelism} if parallelism > 1 else {}
    middle = (StageSpec("transform", transform, options),) if transform else ()
    return Pipeline(
        name=name,
        source=StageSpec("source", source),
        branches=((*middle, StageSpec("sink", sink, options)),),
    )


def view(sidecar_id: str, *services: str, load: float = 0.0, running: int | None = None) -> SidecarView:
    return SidecarView(id=sidecar_id, services=frozenset(services), load=load, running_stages=running)


def capable_of(service: str, sidecars: list[SidecarView]) -> list[str]:
    return [s.id for s in sidecars if service in s.services and s.accepting]


def check_invariants(dags: list[MergedDag], sidecars: list[SidecarView], plan: PlacementPlan) -> None:
    by_id = {s.id: s for s in sidecars}
    stages = {(dag.root, stage.id): stage for dag in dags for stage in dag.stages}
    for key, holder in plan.desired.items():
        stage = stages[(key.dag_id, key.stage_id)]
        assert holder in by_id, f"{key} on unknown sidecar {holder}"
        assert stage.service in by_id[holder].services, f"{key} ({stage.service}) on {holder}"
        assert 0 <= key.replica < parallelism_of(stage)
    unplaced = {(u.dag_id, u.stage_id): u.missing_replicas for u in plan.unplaced}
    for (dag_id, stage_id), stage in stages.items():
        holders = [plan.desired.get(ReplicaKey(dag_id, stage_id, r)) for r in range(parallelism_of(stage))]
        capable = capable_of(stage.service, sidecars)
        if capable:
            assert None not in holders, f"{stage_id} ({stage.service}) has unassigned replicas"
            assert (dag_id, stage_id) not in unplaced
        else:
            assert unplaced[(dag_id, stage_id)] == parallelism_of(stage) - sum(h is not None for h in holders)


def check_spread(dags: list[MergedDag], sidecars: list[SidecarView], plan: PlacementPlan) -> None:
    for dag in dags:
        for stage in dag.stages:
            holders = {
                plan.desired[ReplicaKey(dag.root, stage.id, r)]
                for r in range(parallelism_of(stage))
                if ReplicaKey(dag.root, stage.id, r) in plan.desired
            }
            capable = capable_of(stage.service, sidecars)
            assert len(holders) == min(parallelism_of(stage), len(capable)), (stage.id, holders, capable)


def check_diff(current: dict[ReplicaKey, str], plan: PlacementPlan) -> None:
    rebuilt = dict(current)
    for sidecar_id, keys in plan.revoke.items():
        for key in keys:
            assert rebuilt.pop(key) == sidecar_id
    for sidecar_id, keys in plan.assign.items():
        for key in keys:
            rebuilt[key] = sidecar_id
    assert rebuilt == plan.desired
    assert {c.key for c in plan.changes} == {
        k for k in current.keys() | plan.desired.keys() if current.get(k) != plan.desired.get(k)
    }


# --- unit cases --------------------------------------------------------------------------------------


def test_stages_go_only_to_sidecars_fronting_their_service() -> None:
    dags = optimize([pipeline("p", "src-a", "tr-a", "snk-a", parallelism=2)])
    sidecars = [view("s1", "src-a"), view("t1", "tr-a"), view("t2", "tr-a"), view("k1", "snk-a")]
    plan = place(dags, sidecars, {})
    services = {stage.id: stage.service for stage in dags[0].stages}
    owners: dict[str, set[str]] = {services[key.stage_id]: set() for key in plan.desired}
    for key, holder in plan.desired.items():
        owners[services[key.stage_id]].add(holder)
    assert owners == {"src-a": {"s1"}, "tr-a": {"t1", "t2"}, "snk-a": {"k1"}}
    assert plan.unplaced == ()


def test_stages_without_a_capable_sidecar_are_reported_unplaced() -> None:
    dags = optimize([pipeline("p", "src-a", "tr-a", "snk-a", parallelism=3)])
    plan = place(dags, [view("s1", "src-a"), view("t1", "tr-a")], {})
    assert [(u.service, u.missing_replicas) for u in plan.unplaced] == [("snk-a", 3)]
    assert Counter(plan.desired.values()) == {"s1": 1, "t1": 3}  # doubled up: one capable sidecar


def test_new_replicas_prefer_the_least_busy_then_least_loaded_sidecar() -> None:
    dags = optimize([pipeline("p", "src-a", None, "snk-a")])
    sidecars = [view("busy", "src-a", "snk-a", load=0.1), view("idle", "src-a", "snk-a", load=0.5)]
    plan = place(dags, sidecars, {})
    # The source takes the lower load first; the sink then balances the count.
    source, sink = dags[0].stages[0], dags[0].stages[1]
    assert plan.desired[ReplicaKey(dags[0].root, source.id, 0)] == "busy"
    assert plan.desired[ReplicaKey(dags[0].root, sink.id, 0)] == "idle"


def test_overloaded_sidecars_get_new_work_only_when_nobody_else_can() -> None:
    dags = optimize([pipeline("p", "src-a", None, "snk-a")])
    plan = place(dags, [view("hot", "src-a", "snk-a", load=0.95), view("cool", "src-a", load=0.3)], {})
    holders = {dags[0].stage(k.stage_id).service: h for k, h in plan.desired.items()}
    assert holders == {"src-a": "cool", "snk-a": "hot"}


def test_an_overloaded_sidecar_sheds_one_replica_per_report_and_only_to_a_better_home() -> None:
    dags = optimize([pipeline(f"p{i}", "src-a", None, f"snk-{c}") for i, c in enumerate("abc")])
    start = place(dags, [view("hot", *ALL_SERVICES)], {})
    assert len(start.desired) == 4  # one shared source, three sinks

    # No strictly better home: another overloaded sidecar does not count.
    stay = place(
        dags,
        [view("hot", *ALL_SERVICES, load=0.9, running=4), view("also-hot", *ALL_SERVICES, load=0.95)],
        start.desired,
    )
    assert stay.is_empty

    sidecars = [view("hot", *ALL_SERVICES, load=0.9, running=4), view("cool", *ALL_SERVICES, load=0.2)]
    shed = place(dags, sidecars, start.desired)
    assert [len(v) for v in shed.revoke.values()] == [1] and list(shed.assign) == ["cool"]
    # The same report does not shed again: it described four replicas, the sidecar now holds three.
    assert place(dags, sidecars, shed.desired).is_empty
    # A stale report (taken before the last change) sheds nothing either.
    assert place(dags, [view("hot", *ALL_SERVICES, load=0.9, running=9), sidecars[1]], start.desired).is_empty


def test_joining_moves_nothing_and_rebalancing_evens_out() -> None:
    dags = optimize([pipeline(f"p{c}", f"src-{c}", None, f"snk-{c}") for c in "abc"])
    start = place(dags, [view("old", *ALL_SERVICES)], {})
    joined = [view("old", *ALL_SERVICES), view("new", *ALL_SERVICES)]
    assert place(dags, joined, start.desired).is_empty
    balanced = place(dags, joined, start.desired, rebalance=True)
    assert Counter(balanced.desired.values()) == {"old": 3, "new": 3}
    assert sum(len(keys) for keys in balanced.revoke.values()) == 3
    assert place(dags, joined, balanced.desired, rebalance=True).is_empty


def test_rebalancing_spreads_doubled_replicas() -> None:
    dags = optimize([pipeline("p", "src-a", "tr-a", "snk-a", parallelism=3)])
    alone = [view("a", *ALL_SERVICES)]
    start = place(dags, alone, {})
    crowd = [view(name, *ALL_SERVICES) for name in "abc"]
    plan = place(dags, crowd, start.desired, rebalance=True)
    check_spread(dags, crowd, plan)


def test_a_not_accepting_sidecar_keeps_its_work_but_gets_none() -> None:
    dags = optimize([pipeline("p", "src-a", None, "snk-a")])
    start = place(dags, [view("a", "src-a")], {})
    cordoned = [SidecarView(id="a", services=frozenset({"src-a", "snk-a"}), accepting=False)]
    plan = place(dags, cordoned, start.desired)
    assert plan.desired == start.desired and [u.service for u in plan.unplaced] == ["snk-a"]


def test_no_change_means_no_command() -> None:
    dags = optimize([pipeline("p", "src-a", None, "snk-a")])
    sidecars = [view("a", "src-a", "snk-a")]
    plan = place(dags, sidecars, {})
    command = plan.to_command()
    assert command is not None and len(command.assignments) == 2
    assert place(dags, sidecars, plan.desired).to_command() is None


def test_replicas_of_removed_stages_are_revoked() -> None:
    dags = optimize([pipeline("p", "src-a", None, "snk-a")])
    sidecars = [view("a", "src-a", "snk-a")]
    plan = place(dags, sidecars, {})
    empty = place([], sidecars, plan.desired)
    assert empty.desired == {} and set(empty.revoke["a"]) == set(plan.desired)
    assert all(change.sidecar_id == "" for change in empty.changes)


# --- properties --------------------------------------------------------------------------------------

pipeline_specs = st.lists(
    st.tuples(
        st.sampled_from(SOURCES),
        st.none() | st.sampled_from(TRANSFORMS),
        st.sampled_from(SINKS),
        st.integers(1, 4),
    ),
    min_size=0,
    max_size=8,
)
sidecar_specs = st.lists(
    st.tuples(st.sets(st.sampled_from(ALL_SERVICES), min_size=1, max_size=4), st.floats(0.0, 1.0)),
    min_size=0,
    max_size=10,
)


def build(
    specs: list[tuple[str, str | None, str, int]], sidecar_list: list[tuple[set[str], float]]
) -> tuple[list[MergedDag], list[SidecarView]]:
    dags = optimize([pipeline(f"p{i}", *spec) for i, spec in enumerate(specs)])
    sidecars = [
        SidecarView(id=f"sc{i:02d}", services=frozenset(services), load=load)
        for i, (services, load) in enumerate(sidecar_list)
    ]
    return dags, sidecars


@settings(max_examples=150, deadline=None)
@given(pipeline_specs, sidecar_specs, st.randoms(use_true_random=False))
def test_from_scratch_every_replica_lands_on_a_capable_sidecar_deterministically(
    specs: list[tuple[str, str | None, str, int]], sidecar_list: list[tuple[set[str], float]], rng: object
) -> None:
    dags, sidecars = build(specs, sidecar_list)
    plan = place(dags, sidecars, {})
    check_invariants(dags, sidecars, plan)
    check_spread(dags, sidecars, plan)
    check_diff({}, plan)
    shuffled = list(sidecars)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert place(list(reversed(dags)), shuffled, {}) == plan
    again = place(dags, sidecars, plan.desired)
    assert again.is_empty and again.desired == plan.desired


@settings(max_examples=150, deadline=None)
@given(pipeline_specs, sidecar_specs, st.data())
def test_removing_a_sidecar_moves_only_its_replicas(
    specs: list[tuple[str, str | None, str, int]],
    sidecar_list: list[tuple[set[str], float]],
    data: st.DataObject,
) -> None:
    dags, sidecars = build(specs, sidecar_list)
    if not sidecars:
        return
    plan = place(dags, sidecars, {})
    gone = data.draw(st.sampled_from(sidecars)).id
    rest = [s for s in sidecars if s.id != gone]
    after = place(dags, rest, plan.desired)
    check_invariants(dags, rest, after)
    check_spread(dags, rest, after)
    check_diff(plan.desired, after)
    for key, holder in plan.desired.items():
        if holder != gone:
            assert after.desired[key] == holder
    assert set(after.revoke) <= {gone}
    assert place(dags, rest, after.desired).is_empty


@settings(max_examples=100, deadline=None)
@given(pipeline_specs, sidecar_specs, st.sets(st.sampled_from(ALL_SERVICES), min_size=1))
def test_joining_moves_nothing_unless_rebalancing_which_then_settles(
    specs: list[tuple[str, str | None, str, int]],
    sidecar_list: list[tuple[set[str], float]],
    services: set[str],
) -> None:
    dags, sidecars = build(specs, sidecar_list)
    plan = place(dags, sidecars, {})
    joined = [*sidecars, SidecarView(id="zz-new", services=frozenset(services))]
    after = place(dags, joined, plan.desired)
    newly_capable = {u.stage_id for u in plan.unplaced if u.service in services}
    assert all(c.stage_id in newly_capable for c in after.changes)
    check_invariants(dags, joined, after)
    balanced = place(dags, joined, after.desired, rebalance=True)
    check_invariants(dags, joined, balanced)
    check_diff(after.desired, balanced)
    assert place(dags, joined, balanced.desired, rebalance=True).is_empty


@settings(max_examples=150, deadline=None)
@given(pipeline_specs, sidecar_specs, st.data())
def test_load_reports_shed_at_most_once_and_placement_stays_idempotent(
    specs: list[tuple[str, str | None, str, int]],
    sidecar_list: list[tuple[set[str], float]],
    data: st.DataObject,
) -> None:
    dags, quiet = build(specs, sidecar_list)
    start = place(dags, quiet, {})
    held = Counter(start.desired.values())
    # Some sidecars report exactly what they hold (a fresh report), some a stale count, some nothing.
    reported = [
        msgspec.structs.replace(
            view,
            running_stages=data.draw(st.sampled_from([None, held[view.id], held[view.id] + 1])),
        )
        for view in quiet
    ]
    first = place(dags, reported, start.desired)
    event("shed" if first.revoke else "nothing shed")
    check_invariants(dags, reported, first)
    check_diff(start.desired, first)
    by_id = {view.id: view for view in reported}
    for sidecar_id, keys in first.revoke.items():
        source = by_id[sidecar_id]
        assert source.load >= 0.85 and source.running_stages == held[sidecar_id] and len(keys) == 1
    for sidecar_id in first.assign:
        assert by_id[sidecar_id].load < 0.85
    assert place(dags, reported, first.desired).is_empty
