"""ControlState.apply: pipelines, services, sidecars, sessions, errors that change nothing."""

from __future__ import annotations

import msgspec
import pytest

from etlrouter.control import (
    ApplyPipelines,
    AssignStages,
    ClientSession,
    ControlState,
    DeletePipeline,
    DeregisterService,
    DeregisterSidecar,
    RegisterService,
    RegisterSidecar,
    ReplicaAssignment,
    ReplicaKey,
    RevokeStages,
    ServiceInstance,
    SidecarView,
    encode_command,
    place,
)
from etlrouter.control import state as state_module
from etlrouter.control.commands import COMMAND_FORMAT_VERSION, CommandEnvelope
from etlrouter.dsl import Registry

from .helpers import CLICKS, ORDERS, SERVICES, Driver, register_all, sidecar


def placed(driver: Driver) -> None:
    """Run placement over the state's live sidecars and apply its decision."""
    views = [SidecarView(id=k, services=v) for k, v in driver.state.sidecar_services().items()]
    command = place(driver.state.dags(), views, driver.state.assignment()).to_command()
    if command is not None:
        driver.ok(command)


@pytest.fixture
def driver() -> Driver:
    d = Driver()
    register_all(d)
    return d


def assert_rejected_unchanged(driver: Driver, command: object, code: str, *needles: str) -> None:
    before = driver.state.canonical_dump()
    revision = driver.state.revision
    result = driver.run(command)  # type: ignore[arg-type]
    assert result.error is not None, "expected an error"
    assert result.error.code == code, result.error
    for needle in needles:
        assert needle in result.error.message, (needle, result.error.message)
    assert driver.state.revision == revision
    after = driver.state.canonical_dump()
    # Only the applied index moves; nothing a reader sees does.
    assert _without_index(after) == _without_index(before)


def _without_index(dump: str) -> object:
    data = msgspec.json.decode(dump)
    data["state"].pop("applied_index")
    return data


def test_unknown_service_is_reported_with_position_and_changes_nothing() -> None:
    d = Driver()
    d.ok(sidecar("kafka-orders-0", "kafka-orders"))
    before = _without_index(d.state.canonical_dump())
    result = d.run(ApplyPipelines(definition=ORDERS, filename="orders.etl"))
    assert result.error is not None and result.error.code == "invalid_argument"
    assert "orders.etl:4:15: unknown transform `filter-valid`" in result.error.message
    first = result.error.diagnostics[0]
    assert (first.file, first.line, first.column) == ("orders.etl", 4, 15)
    assert "filter-valid" in first.excerpt and first.excerpt.endswith("^")
    assert {diag.message for diag in result.error.diagnostics} >= {"unknown sink `clickhouse`"}
    assert d.state.pipelines() == []
    assert _without_index(d.state.canonical_dump()) == before


def test_apply_creates_then_reports_unchanged_then_updates_only_what_changed(driver: Driver) -> None:
    first = driver.ok(ApplyPipelines(definition=ORDERS, filename="orders.etl"))
    assert [(c.name, c.action, c.generation) for c in first.changes] == [
        ("orders-to-s3", "created", 1),
        ("orders-to-ch", "created", 1),
    ]
    assert driver.state.revision == first.index

    again = driver.ok(ApplyPipelines(definition=ORDERS, filename="orders.etl"))
    assert {c.action for c in again.changes} == {"unchanged"}
    assert again.revision == first.index and driver.state.revision == first.index

    # Comments and layout are not changes; a different sink option is.
    edited = ORDERS.replace("| sink clickhouse", "| sink clickhouse (batch_size = 10)")
    update = driver.ok(ApplyPipelines(definition="# new\n" + edited, filename="orders.etl"))
    assert [(c.name, c.action, c.generation) for c in update.changes] == [
        ("orders-to-s3", "unchanged", 1),
        ("orders-to-ch", "updated", 2),
    ]
    ch = driver.state.pipeline("orders-to-ch")
    s3 = driver.state.pipeline("orders-to-s3")
    assert ch is not None and s3 is not None
    assert ch.revision == update.index and s3.revision == first.index


def test_definition_holds_only_the_pipelines_own_text(driver: Driver) -> None:
    driver.ok(ApplyPipelines(definition=ORDERS, filename="orders.etl"))
    s3 = driver.state.pipeline("orders-to-s3")
    assert s3 is not None
    assert s3.definition.startswith("pipeline orders-to-s3 {")
    assert s3.definition.rstrip().endswith("}")
    assert "orders-to-ch" not in s3.definition and "the orders feed" not in s3.definition
    # The cut text is itself a valid document with the same pipeline.
    again = ControlState.from_snapshot(driver.state.snapshot())
    result = Driver(again, driver.index + 1).run(
        ApplyPipelines(definition=s3.definition, filename="orders.etl")
    )
    assert [(c.name, c.action) for c in result.changes] == [("orders-to-s3", "unchanged")]


def test_prune_deletes_only_pipelines_of_the_same_file(driver: Driver) -> None:
    driver.ok(ApplyPipelines(definition=ORDERS, filename="orders.etl"))
    driver.ok(ApplyPipelines(definition=CLICKS, filename="clicks.etl"))
    only_s3 = ORDERS.split("pipeline orders-to-ch")[0]
    result = driver.ok(ApplyPipelines(definition=only_s3, filename="orders.etl", prune=True))
    assert ("orders-to-ch", "deleted") in [(c.name, c.action) for c in result.changes]
    assert [p.name for p in driver.state.pipelines()] == ["clicks", "orders-to-s3"]
    # Without prune nothing is deleted.
    driver.ok(ApplyPipelines(definition="", filename="clicks.etl"))
    assert [p.name for p in driver.state.pipelines()] == ["clicks", "orders-to-s3"]


def test_create_update_and_generation_preconditions(driver: Driver) -> None:
    driver.ok(ApplyPipelines(definition=CLICKS, filename="clicks.etl"))
    assert_rejected_unchanged(
        driver, ApplyPipelines(definition=CLICKS, filename="c.etl", mode="create"), "already_exists", "clicks"
    )
    assert_rejected_unchanged(
        driver,
        ApplyPipelines(definition=ORDERS, filename="o.etl", mode="update"),
        "not_found",
        "orders-to-s3",
    )
    changed = CLICKS.replace("source kafka-clicks", "source kafka-clicks (batch_size = 7)")
    assert_rejected_unchanged(
        driver,
        ApplyPipelines(definition=changed, filename="clicks.etl", expected_generation=5),
        "failed_precondition",
        "generation 1, expected generation 5",
    )
    result = driver.ok(ApplyPipelines(definition=changed, filename="clicks.etl", expected_generation=1))
    assert [(c.action, c.generation) for c in result.changes] == [("updated", 2)]
    assert_rejected_unchanged(
        driver, DeletePipeline(name="clicks", expected_generation=1), "failed_precondition", "generation 2"
    )
    assert_rejected_unchanged(driver, DeletePipeline(name="nope"), "not_found", "`nope`")
    driver.ok(DeletePipeline(name="clicks", expected_generation=2))
    assert driver.state.pipelines() == []


def test_duplicate_pipeline_names_are_rejected(driver: Driver) -> None:
    assert_rejected_unchanged(
        driver,
        ApplyPipelines(definition=CLICKS + CLICKS, filename="dup.etl"),
        "invalid_argument",
        "dup.etl:",
        "duplicate pipeline name `clicks`",
    )


def test_preview_reports_changes_without_making_them(driver: Driver) -> None:
    before = driver.state.canonical_dump()
    result = driver.state.preview(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    assert result.error is None and {c.action for c in result.changes} == {"created"}
    assert driver.state.canonical_dump() == before
    bad = driver.state.preview(ApplyPipelines(definition="pipeline x { source nope | sink clickhouse }"))
    assert bad.error is not None and "unknown source `nope`" in bad.error.message


def test_a_service_name_has_one_kind(driver: Driver) -> None:
    clash = RegisterSidecar(
        sidecar_id="evil",
        data_address="evil:1",
        services=(ServiceInstance(name="clickhouse", kind="source"),),
    )
    assert_rejected_unchanged(driver, clash, "failed_precondition", "`clickhouse`", "registered as a sink")
    inner = RegisterSidecar(
        sidecar_id="odd",
        data_address="odd:1",
        services=(ServiceInstance(name="x", kind="source"), ServiceInstance(name="x", kind="sink")),
    )
    assert_rejected_unchanged(driver, inner, "invalid_argument", "services[1] `x`")
    # The only holder of a name may change its kind by re-registering.
    driver.ok(sidecar("solo", "clickhouse"))
    driver.ok(DeregisterSidecar(sidecar_id="clickhouse-0"))
    driver.ok(
        RegisterSidecar(
            sidecar_id="solo",
            data_address="s:1",
            services=(ServiceInstance(name="clickhouse", kind="source"),),
        )
    )
    assert driver.state.kind_of("clickhouse") == "source"


def test_direct_services_get_an_id_from_the_log_and_count_for_the_registry() -> None:
    d = Driver()
    result = d.ok(
        RegisterService(instance=ServiceInstance(name="geo", kind="lookup", endpoint="10.1.1.1:50051"))
    )
    assert result.instance_id == f"geo@{result.index}"
    assert isinstance(d.state, Registry)
    assert d.state.kind_of("geo") == "lookup" and d.state.service_names() == ["geo"]
    assert [s.endpoint for s in d.state.services()] == ["10.1.1.1:50051"]
    assert_rejected_unchanged(d, DeregisterService(instance_id="geo@999"), "not_found", "geo@999")
    assert_rejected_unchanged(
        d,
        RegisterService(instance=ServiceInstance(name="geo", kind="lookup", sidecar_id="sc")),
        "invalid_argument",
        "no sidecar_id",
    )
    d.ok(DeregisterService(instance_id=result.instance_id))
    assert d.state.kind_of("geo") is None


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (RegisterSidecar(sidecar_id="", data_address="a:1"), "sidecar_id is empty"),
        (RegisterSidecar(sidecar_id="s", data_address=""), "data_address is empty"),
        (
            RegisterSidecar(
                sidecar_id="s", data_address="a:1", services=(ServiceInstance(name="", kind="sink"),)
            ),
            "services[0] has an empty name",
        ),
        (DeregisterSidecar(sidecar_id="ghost"), "no sidecar 'ghost'"),
    ],
)
def test_bad_sidecar_commands_name_the_problem(driver: Driver, command: object, needle: str) -> None:
    code = "not_found" if isinstance(command, DeregisterSidecar) else "invalid_argument"
    assert_rejected_unchanged(driver, command, code, needle)


def test_undecodable_entries_are_errors_not_exceptions(driver: Driver) -> None:
    revision = driver.state.revision
    garbage = driver.raw(b"\xc1not msgpack")
    assert garbage.error is not None and garbage.error.code == "invalid_argument"
    assert f"entry {garbage.index}" in garbage.error.message
    wrong_shape = driver.raw(msgspec.msgpack.encode({"format_version": 1, "command": {"type": "bogus"}}))
    assert wrong_shape.error is not None and "malformed command" in wrong_shape.error.message
    future = msgspec.structs.replace(
        CommandEnvelope(command=DeletePipeline(name="x")), format_version=COMMAND_FORMAT_VERSION + 1
    )
    newer = driver.raw(msgspec.msgpack.encode(future))
    assert newer.error is not None and f"version {COMMAND_FORMAT_VERSION + 1}" in newer.error.message
    assert driver.state.revision == revision


def test_an_index_at_or_below_the_applied_one_is_refused(driver: Driver) -> None:
    applied = driver.state.applied_index
    dump = driver.state.canonical_dump()
    result = driver.state.apply(applied, encode_command(ApplyPipelines(definition=CLICKS)))
    assert result.error is not None and result.error.code == "stale_index"
    assert driver.state.canonical_dump() == dump


def test_a_retried_request_returns_the_cached_result_and_changes_nothing(driver: Driver) -> None:
    session = ClientSession("ctl-1", 7)
    first = driver.ok(ApplyPipelines(definition=CLICKS, filename="c.etl", mode="create"), session)
    dump = driver.state.canonical_dump()
    # Applied again it would fail (already exists); as a retry it returns the original answer.
    retry = driver.run(ApplyPipelines(definition=CLICKS, filename="c.etl", mode="create"), session)
    assert retry.duplicate and retry.error is None
    assert retry.changes == first.changes and retry.index == first.index
    assert _without_index(driver.state.canonical_dump()) == _without_index(dump)
    older = driver.run(DeletePipeline(name="clicks"), ClientSession("ctl-1", 6))
    assert older.duplicate and older.error is not None and "superseded by request 7" in older.error.message
    assert driver.state.pipeline("clicks") is not None
    # A new seq is applied; an error result is cached like any other.
    failed = driver.run(DeletePipeline(name="nope"), ClientSession("ctl-1", 8))
    driver.ok(sidecar("late", "clickhouse"))
    again = driver.run(DeletePipeline(name="nope"), ClientSession("ctl-1", 8))
    assert again.duplicate and again.error == failed.error and again.index == failed.index
    # Other clients have their own numbering.
    assert not driver.ok(DeletePipeline(name="clicks"), ClientSession("ctl-2", 1)).duplicate


def test_sessions_beyond_the_limit_forget_the_least_recent(
    monkeypatch: pytest.MonkeyPatch, driver: Driver
) -> None:
    monkeypatch.setattr(state_module, "MAX_SESSIONS", 2)
    for client in ("a", "b", "c"):
        driver.ok(
            RegisterService(instance=ServiceInstance(name=f"svc-{client}", kind="sink")),
            ClientSession(client, 1),
        )
    assert [s.client_id for s in driver.state.to_snapshot().sessions] == ["b", "c"]
    # "a" was forgotten, so its retry is applied again (a new registration id).
    retry = driver.ok(
        RegisterService(instance=ServiceInstance(name="svc-a", kind="sink")), ClientSession("a", 1)
    )
    assert not retry.duplicate


def test_assign_stages_is_validated_as_a_whole(driver: Driver) -> None:
    driver.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    dag = driver.state.dags()[0]
    source, transform = dag.stages[0], dag.stages[1]
    good = ReplicaAssignment(dag.root, source.id, 0, "kafka-orders-0")
    cases = [
        (
            ReplicaAssignment(dag.root, transform.id, 0, "kafka-orders-0"),
            "failed_precondition",
            "does not front service `filter-valid`",
        ),
        (
            ReplicaAssignment(dag.root, transform.id, 2, "filter-valid-0"),
            "invalid_argument",
            "replica 2 is out of range (parallelism 2)",
        ),
        (ReplicaAssignment(dag.root, "st-missing", 0, "filter-valid-0"), "not_found", "no such stage"),
        (ReplicaAssignment("st-nodag", source.id, 0, "kafka-orders-0"), "not_found", "no such DAG"),
        (ReplicaAssignment(dag.root, transform.id, 1, "ghost"), "not_found", "no sidecar 'ghost'"),
        (good, "invalid_argument", "appears twice"),
    ]
    for bad, code, needle in cases:
        assert_rejected_unchanged(
            driver, AssignStages(assignments=(good, bad)), code, "AssignStages[1]", needle
        )
    assert driver.state.assignment() == {}
    driver.ok(AssignStages(assignments=(good,)))
    assert driver.state.assignment() == {ReplicaKey(dag.root, source.id, 0): "kafka-orders-0"}
    # Re-assigning to the same holder is not a change; revoking is, and revoking twice is not.
    revision = driver.state.revision
    assert driver.ok(AssignStages(assignments=(good,))).revision == revision
    driver.ok(RevokeStages(replicas=(good.key,)))
    assert driver.state.assignment() == {}
    assert driver.ok(RevokeStages(replicas=(good.key,))).revision == driver.state.revision


def test_phase_and_conditions_follow_placement(driver: Driver) -> None:
    driver.ok(ApplyPipelines(definition=ORDERS + CLICKS, filename="all.etl"))
    assert {p.phase for p in driver.state.pipelines()} == {"pending"}
    # The DSL checked `clickhouse` against the registry; its only sidecar then leaves.
    driver.ok(DeregisterSidecar(sidecar_id="clickhouse-0"))
    placed(driver)
    statuses = {p.name: p for p in driver.state.pipelines()}
    assert statuses["orders-to-s3"].phase == "running" and statuses["orders-to-s3"].conditions == ()
    assert statuses["orders-to-ch"].phase == "degraded"
    assert statuses["orders-to-ch"].conditions == ("no sidecar offers service `clickhouse`",)
    assert statuses["clicks"].phase == "degraded"
    driver.ok(DeregisterSidecar(sidecar_id="kafka-clicks-0"))
    clicks = driver.state.pipeline("clicks")
    assert clicks is not None and clicks.phase == "pending"
    assert set(clicks.conditions) == {
        "no sidecar offers service `kafka-clicks`",
        "no sidecar offers service `clickhouse`",
    }
    # A capable sidecar joins: the stage waits for the leader's placement, then runs.
    driver.ok(sidecar("clickhouse-9", "clickhouse"))
    ch = driver.state.pipeline("orders-to-ch")
    assert ch is not None and ch.phase == "degraded" and "0 of 1 replicas placed" in ch.conditions[0]
    placed(driver)
    ch = driver.state.pipeline("orders-to-ch")
    assert ch is not None and ch.phase == "running"
    assert set(ch.stage_ids) <= {stage.id for dag in driver.state.dags() for stage in dag.stages}


def test_leaving_sidecars_free_their_replicas_and_only_theirs(driver: Driver) -> None:
    driver.ok(sidecar("filter-valid-1", "filter-valid"))
    driver.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    placed(driver)
    before = driver.state.assignment()
    driver.ok(DeregisterSidecar(sidecar_id="filter-valid-1", reason="expired"))
    after = driver.state.assignment()
    assert after == {key: holder for key, holder in before.items() if holder != "filter-valid-1"}
    assert driver.state.replicas_of("filter-valid-1") == []


def test_re_registering_keeps_what_the_sidecar_still_fronts(driver: Driver) -> None:
    driver.ok(sidecar("combo", "filter-valid", "s3-archive"))
    driver.ok(DeregisterSidecar(sidecar_id="filter-valid-0"))
    driver.ok(DeregisterSidecar(sidecar_id="s3-archive-0"))
    driver.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    placed(driver)
    held = driver.state.replicas_of("combo")
    assert len(held) == 3  # two filter replicas and the s3 sink
    dag_id = held[0].dag_id
    token = driver.state.fencing_token(dag_id)
    # The same registration again changes nothing.
    revision = driver.state.revision
    assert driver.ok(sidecar("combo", "filter-valid", "s3-archive")).revision == revision
    # A new address keeps the replicas, moves the token (peers must re-route) and shows in placements.
    moved = driver.ok(sidecar("combo", "filter-valid", "s3-archive", address="new:1"))
    assert driver.state.replicas_of("combo") == held
    assert driver.state.fencing_token(dag_id) == moved.index and moved.index > (token or 0)
    assert {p.data_address for p in driver.state.placements(dag_id) if p.sidecar_id == "combo"} == {"new:1"}
    # Dropping a service frees exactly the replicas of that service.
    driver.ok(sidecar("combo", "filter-valid", address="new:1"))
    remaining = driver.state.replicas_of("combo")
    dag = driver.state.dags()[0]
    assert remaining and {dag.stage(key.stage_id).service for key in remaining} == {"filter-valid"}
    assert len(remaining) == 2


def test_sidecar_services_and_sizes_follow_every_change_and_a_snapshot(driver: Driver) -> None:
    """sidecar_services() is kept between changes (the control loop reads it every pass): each way a
    sidecar comes, changes or goes, and a restored snapshot, shows in it at once; sizes() counts."""
    before = dict(driver.state.sidecar_services())
    assert driver.state.sizes() == {"sidecars": len(before), "pipelines": 0, "direct_services": 0}
    driver.ok(sidecar("b", "filter-valid"))
    driver.ok(sidecar("a", "s3-archive"))
    services = driver.state.sidecar_services()
    assert list(services) == sorted(services)  # by id, as placement reads them
    assert services["a"] == {"s3-archive"} and services["b"] == {"filter-valid"}
    driver.ok(sidecar("a", "s3-archive", "filter-valid"))
    assert driver.state.sidecar_services()["a"] == {"s3-archive", "filter-valid"}
    driver.ok(DeregisterSidecar(sidecar_id="b"))
    assert dict(driver.state.sidecar_services()) == {**before, "a": frozenset({"s3-archive", "filter-valid"})}
    driver.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    assert driver.state.sizes() == {"sidecars": len(before) + 1, "pipelines": 2, "direct_services": 0}
    snapshot = driver.state.snapshot()
    driver.ok(sidecar("c", "filter-valid"))
    assert "c" in driver.state.sidecar_services()
    driver.state.restore(snapshot)
    assert "c" not in driver.state.sidecar_services() and "a" in driver.state.sidecar_services()
    assert driver.state.sizes()["sidecars"] == len(before) + 1


def test_fencing_tokens_grow_with_every_placement_change(driver: Driver) -> None:
    driver.ok(sidecar("filter-valid-1", "filter-valid"))
    driver.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    dag_id = driver.state.dags()[0].root
    tokens = [driver.state.fencing_token(dag_id)]
    placed(driver)
    tokens.append(driver.state.fencing_token(dag_id))
    driver.ok(DeregisterSidecar(sidecar_id="filter-valid-1"))
    tokens.append(driver.state.fencing_token(dag_id))
    placed(driver)
    tokens.append(driver.state.fencing_token(dag_id))
    driver.ok(
        ApplyPipelines(
            definition=ORDERS.replace("| sink clickhouse", "| sink clickhouse (batch_size = 9)"),
            filename="o.etl",
        )
    )
    tokens.append(driver.state.fencing_token(dag_id))
    known = [token for token in tokens if token is not None]
    assert len(known) == len(tokens) and known == sorted(set(known)), tokens  # strictly increasing
    assert tokens[-1] == driver.index
    # A change elsewhere leaves this DAG's token alone.
    driver.ok(ApplyPipelines(definition=CLICKS, filename="c.etl"))
    assert driver.state.fencing_token(dag_id) == tokens[-1]


def test_service_registry_lists_direct_and_sidecar_services() -> None:
    d = Driver()
    d.ok(sidecar("sc", "kafka-orders", "clickhouse"))
    d.ok(RegisterService(instance=ServiceInstance(name="geo", kind="lookup")))
    names = [(s.name, s.sidecar_id) for s in d.state.services()]
    assert names == [("clickhouse", "sc"), ("geo", ""), ("kafka-orders", "sc")]
    assert d.state.service_names() == ["clickhouse", "geo", "kafka-orders"]
    assert all(d.state.kind_of(name) == SERVICES.get(name, "lookup") for name in d.state.service_names())


def test_a_pipeline_moving_to_another_source_leaves_its_old_dag(driver: Driver) -> None:
    driver.ok(ApplyPipelines(definition=ORDERS + CLICKS, filename="all.etl"))
    placed(driver)
    old_root = driver.state.pipeline("clicks")
    assert old_root is not None
    held_before = driver.state.replicas_of("kafka-clicks-0")
    assert held_before and held_before[0].dag_id == old_root.dag_id
    moved = ORDERS + CLICKS.replace("source kafka-clicks", "source kafka-orders (batch_size = 500)")
    driver.ok(ApplyPipelines(definition=moved, filename="all.etl"))
    clicks = driver.state.pipeline("clicks")
    orders = driver.state.pipeline("orders-to-s3")
    assert clicks is not None and orders is not None and clicks.dag_id == orders.dag_id
    assert driver.state.fencing_token(old_root.dag_id) is None
    assert driver.state.replicas_of("kafka-clicks-0") == []
    assert [dag.root for dag in driver.state.dags()] == [orders.dag_id]


def test_moving_a_pipeline_to_another_file_is_an_update_that_prune_respects(driver: Driver) -> None:
    driver.ok(ApplyPipelines(definition=CLICKS, filename="old.etl"))
    moved = driver.ok(ApplyPipelines(definition=CLICKS, filename="new.etl"))
    assert [(c.action, c.generation) for c in moved.changes] == [("updated", 2)]
    driver.ok(ApplyPipelines(definition="", filename="old.etl", prune=True))
    clicks = driver.state.pipeline("clicks")
    assert clicks is not None and clicks.filename == "new.etl"
