"""Determinism, snapshots and restore: what Raft relies on."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from etlrouter.control import (
    ApplyPipelines,
    CommandDecodeError,
    ControlState,
    DeletePipeline,
    DeregisterSidecar,
    RegisterService,
    Restore,
    ServiceInstance,
    SidecarView,
    SnapshotError,
    decode_command,
    place,
)
from etlrouter.control.state import STATE_FORMAT_VERSION

from .helpers import CLICKS, ORDERS, SERVICES, Driver, register_all, sidecar

DOCUMENTS = (
    ORDERS,
    CLICKS,
    ORDERS.replace("parallelism = 2", "parallelism = 3"),
    ORDERS + CLICKS,
    "pipeline broken { source nope | sink clickhouse }",
)
FILES = ("a.etl", "b.etl")
PIPELINE_NAMES = ("orders-to-s3", "orders-to-ch", "clicks")

registers = st.tuples(
    st.just("register"), st.integers(0, 4), st.sets(st.sampled_from(sorted(SERVICES)), min_size=1, max_size=3)
)
applies = st.tuples(
    st.just("apply"), st.integers(0, len(DOCUMENTS) - 1), st.sampled_from(FILES), st.booleans()
)
placements = st.tuples(st.just("place"), st.booleans())
operations = st.lists(
    st.one_of(
        # Repeated so that most runs build up pipelines and assignments before tearing them down.
        registers,
        registers,
        applies,
        placements,
        placements,
        st.tuples(st.just("deregister"), st.integers(0, 4)),
        st.tuples(st.just("delete"), st.sampled_from(PIPELINE_NAMES)),
        st.tuples(st.just("garbage")),
    ),
    min_size=8,
    max_size=40,
)


def run_operation(driver: Driver, operation: tuple[object, ...]) -> None:
    match operation:
        case ("register", int(n), set(services)):
            driver.run(sidecar(f"sc{n}", *sorted(services)))
        case ("deregister", int(n)):
            driver.run(DeregisterSidecar(sidecar_id=f"sc{n}"))
        case ("apply", int(doc), str(filename), bool(prune)):
            driver.run(ApplyPipelines(definition=DOCUMENTS[doc], filename=filename, prune=prune))
        case ("delete", str(name)):
            driver.run(DeletePipeline(name=name))
        case ("place", bool(rebalance)):
            views = [SidecarView(id=k, services=v) for k, v in driver.state.sidecar_services().items()]
            plan = place(driver.state.dags(), views, driver.state.assignment(), rebalance=rebalance)
            if (command := plan.to_command()) is not None:
                result = driver.run(command)
                assert result.error is None, result.error  # a fresh plan is always valid
        case ("garbage",):
            driver.raw(b"\x93\x01\x02")
        case _:
            raise AssertionError(operation)


def check_consistency(state: ControlState) -> None:
    sidecars = state.sidecar_services()
    assignment = state.assignment()
    for key, holder in assignment.items():
        dag = next(dag for dag in state.dags() if dag.root == key.dag_id)
        assert dag.stage(key.stage_id).service in sidecars[holder]
    for sidecar_id in sidecars:
        assert state.replicas_of(sidecar_id) == sorted(k for k, h in assignment.items() if h == sidecar_id)


def seeded() -> Driver:
    driver = Driver()
    for name, kind in SERVICES.items():  # direct registrations keep every name known to the DSL
        driver.ok(
            RegisterService(instance=ServiceInstance(name=name, kind=kind), instance_id=f"direct-{name}")
        )
    return driver


@settings(max_examples=100, deadline=None)
@given(operations, st.data())
def test_replicas_fed_the_same_log_agree_and_snapshots_resume_exactly(
    ops: list[tuple[object, ...]], data: st.DataObject
) -> None:
    driver = seeded()
    for operation in ops:
        run_operation(driver, operation)
        check_consistency(driver.state)
    expected = driver.state.canonical_dump()
    event(f"pipelines: {len(driver.state.pipelines())}, assigned: {bool(driver.state.assignment())}")

    replica = ControlState()
    for index, entry in driver.log:
        replica.apply(index, entry)
    assert replica.canonical_dump() == expected

    cut = data.draw(st.integers(0, len(driver.log)))
    partial = ControlState()
    for index, entry in driver.log[:cut]:
        partial.apply(index, entry)
    resumed = ControlState.from_snapshot(partial.snapshot())
    assert resumed.canonical_dump() == partial.canonical_dump()
    for index, entry in driver.log[cut:]:
        resumed.apply(index, entry)
    assert resumed.canonical_dump() == expected
    assert resumed.snapshot() == driver.state.snapshot()


def test_snapshot_round_trip_keeps_everything() -> None:
    driver = Driver()
    register_all(driver, per_service=2)
    driver.ok(ApplyPipelines(definition=ORDERS + CLICKS, filename="all.etl"))
    run_operation(driver, ("place", False))
    run_operation(driver, ("deregister", 0))
    restored = ControlState.from_snapshot(driver.state.snapshot())
    assert restored.canonical_dump() == driver.state.canonical_dump()
    assert restored.pipelines() == driver.state.pipelines()
    assert restored.dag_specs() == driver.state.dag_specs()
    for sidecar_id in driver.state.sidecar_services():
        assert restored.commands_for_sidecar(sidecar_id, {}) == driver.state.commands_for_sidecar(
            sidecar_id, {}
        )


def test_bad_snapshots_are_refused_with_the_reason() -> None:
    state = ControlState()
    with pytest.raises(SnapshotError, match="not a control-state snapshot"):
        state.restore(b"\xc1")
    newer = msgspec.msgpack.encode({"format_version": STATE_FORMAT_VERSION + 1})
    with pytest.raises(SnapshotError, match=f"version {STATE_FORMAT_VERSION + 1} is not supported"):
        state.restore(newer)
    with pytest.raises(SnapshotError, match="malformed snapshot"):
        state.restore(msgspec.msgpack.encode({"format_version": STATE_FORMAT_VERSION, "revision": "x"}))


def test_restore_command_rebuilds_a_backup_in_a_fresh_cluster() -> None:
    source = seeded()
    register_all(source)
    source.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    source.ok(
        ApplyPipelines(definition=ORDERS.replace("parallelism = 2", "parallelism = 3"), filename="o.etl")
    )
    source.ok(ApplyPipelines(definition=CLICKS, filename="c.etl"))
    run_operation(source, ("place", False))
    backup = source.state.snapshot()

    target = Driver()
    target.ok(sidecar("early", "clickhouse"))
    restored = target.ok(Restore(snapshot=backup))
    assert target.state.canonical_dump(portable=True) == source.state.canonical_dump(portable=True)
    # Sidecars and assignments belonged to the old cluster; revisions are the new cluster's.
    assert target.state.sidecars() == [] and target.state.assignment() == {}
    assert {p.revision for p in target.state.pipelines()} == {restored.index}
    assert [p.generation for p in target.state.pipelines()] == [
        p.generation for p in source.state.pipelines()
    ]
    assert {p.phase for p in target.state.pipelines()} == {"pending"}

    refused = target.run(Restore(snapshot=backup))
    assert refused.error is not None and refused.error.code == "failed_precondition"
    assert "already has 3 pipeline(s)" in refused.error.message
    garbage = Driver().run(Restore(snapshot=b"nope"))
    assert garbage.error is not None and garbage.error.message.startswith(
        "Restore: not a control-state snapshot"
    )


def test_canonical_dump_is_stable_json() -> None:
    driver = seeded()
    driver.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    dump = driver.state.canonical_dump()
    assert dump == driver.state.canonical_dump()
    decoded = msgspec.json.decode(dump)
    assert decoded["state"]["revision"] == driver.index
    assert [p["name"] for p in decoded["status"]] == ["orders-to-ch", "orders-to-s3"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.binary(max_size=64))
def test_apply_never_raises_on_arbitrary_text_or_bytes(text: str, data: bytes) -> None:
    driver = seeded()
    before = driver.state.canonical_dump(portable=True)
    result = driver.run(ApplyPipelines(definition=text, filename="fuzz.etl"))
    if result.error is not None:
        assert result.error.message and driver.state.canonical_dump(portable=True) == before
    garbage = driver.raw(data)
    try:
        decode_command(data)
    except CommandDecodeError:
        assert garbage.error is not None and garbage.error.code == "invalid_argument"
