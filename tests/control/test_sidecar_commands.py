"""commands_for_sidecar: what a Heartbeat or RegisterSidecar answer carries."""

from __future__ import annotations

from etlrouter.control import (
    ApplyPipelines,
    Assign,
    AssignmentCommand,
    AssignStages,
    DeletePipeline,
    ReplicaAssignment,
    Revoke,
)

from .helpers import CLICKS, ORDERS, Driver, register_all, sidecar


def setup() -> tuple[Driver, str, list[str]]:
    """orders DAG with source, filter (2 replicas), two sinks; `both` runs both filter replicas."""
    d = Driver()
    register_all(d)
    d.ok(sidecar("both", "filter-valid", "clickhouse"))
    d.ok(ApplyPipelines(definition=ORDERS, filename="o.etl"))
    dag = d.state.dags()[0]
    ids = [stage.id for stage in dag.stages]  # source, filter, clickhouse sink, s3 sink (DFS order)
    d.ok(
        AssignStages(
            assignments=(
                ReplicaAssignment(dag.root, ids[0], 0, "kafka-orders-0"),
                ReplicaAssignment(dag.root, ids[1], 0, "both"),
                ReplicaAssignment(dag.root, ids[1], 1, "filter-valid-0"),
                ReplicaAssignment(dag.root, ids[2], 0, "both"),
                ReplicaAssignment(dag.root, ids[3], 0, "s3-archive-0"),
            )
        )
    )
    return d, dag.root, ids


def tokens_applied(commands: list[AssignmentCommand]) -> dict[str, int]:
    """What a sidecar would report after running `commands`."""
    applied: dict[str, int] = {}
    for command in commands:
        dag_id = command.command.dag.id if isinstance(command.command, Assign) else command.command.dag_id
        applied[dag_id] = max(applied.get(dag_id, 0), command.fencing_token)
    return applied


def test_a_fresh_sidecar_gets_its_dag_with_every_placement() -> None:
    d, dag_id, ids = setup()
    commands = d.state.commands_for_sidecar("both", {})
    assert len(commands) == 1
    command = commands[0]
    assert command.fencing_token == d.state.fencing_token(dag_id) == d.index
    assert isinstance(command.command, Assign)
    assign = command.command
    assert assign.dag.id == dag_id and [s.id for s in assign.dag.stages] == ids
    assert assign.dag.stages[1].parallelism == 2 and assign.dag.stages[1].options["parallelism"] == "2"
    assert {(p.stage_id, p.replica) for p in assign.local} == {(ids[1], 0), (ids[2], 0)}
    assert {p.sidecar_id for p in assign.placements} == {
        "kafka-orders-0",
        "both",
        "filter-valid-0",
        "s3-archive-0",
    }
    assert all(p.data_address == f"{p.sidecar_id}.pods:7000" for p in assign.placements)


def test_an_up_to_date_or_newer_token_gets_nothing() -> None:
    d, dag_id, _ = setup()
    token = d.state.fencing_token(dag_id)
    assert token is not None
    assert d.state.commands_for_sidecar("both", {dag_id: token}) == []
    assert d.state.commands_for_sidecar("both", {dag_id: token + 10}) == []
    assert d.state.commands_for_sidecar("unknown-sidecar", {}) == []
    assert d.state.commands_for_sidecar("kafka-clicks-0", {}) == []  # registered, runs nothing


def test_losing_one_stage_sends_a_revoke_then_the_new_assign() -> None:
    d, dag_id, ids = setup()
    applied = tokens_applied(d.state.commands_for_sidecar("both", {}))
    moved = d.ok(AssignStages(assignments=(ReplicaAssignment(dag_id, ids[2], 0, "clickhouse-0"),)))
    commands = d.state.commands_for_sidecar("both", applied)
    assert [type(c.command) for c in commands] == [Revoke, Assign]
    assert all(c.fencing_token == moved.index for c in commands)
    assert commands[0].command == Revoke(dag_id, (ids[2],))
    assign = commands[1].command
    assert isinstance(assign, Assign)
    assert {(p.stage_id, p.replica) for p in assign.local} == {(ids[1], 0)}
    # Once applied, nothing more; and the new holder is told to start it.
    assert d.state.commands_for_sidecar("both", tokens_applied(commands)) == []
    gained = d.state.commands_for_sidecar("clickhouse-0", {})
    assert isinstance(gained[0].command, Assign) and gained[0].command.local[0].stage_id == ids[2]


def test_peers_are_told_when_the_dags_routing_changes() -> None:
    d, dag_id, ids = setup()
    applied = tokens_applied(d.state.commands_for_sidecar("kafka-orders-0", {}))
    d.ok(AssignStages(assignments=(ReplicaAssignment(dag_id, ids[1], 1, "both"),)))
    commands = d.state.commands_for_sidecar("kafka-orders-0", applied)
    assert len(commands) == 1 and isinstance(commands[0].command, Assign)
    assert {p.sidecar_id for p in commands[0].command.placements if p.stage_id == ids[1]} == {"both"}


def test_losing_everything_revokes_the_whole_dag() -> None:
    d, dag_id, ids = setup()
    applied = tokens_applied(d.state.commands_for_sidecar("s3-archive-0", {}))
    d.ok(AssignStages(assignments=(ReplicaAssignment(dag_id, ids[3], 0, ""),)))
    commands = d.state.commands_for_sidecar("s3-archive-0", applied)
    assert commands == [AssignmentCommand(d.index, Revoke(dag_id))]
    assert d.state.commands_for_sidecar("s3-archive-0", tokens_applied(commands)) == []


def test_a_deleted_dag_is_revoked_with_the_deleting_index() -> None:
    d, dag_id, _ = setup()
    applied = tokens_applied(d.state.commands_for_sidecar("both", {}))
    d.ok(ApplyPipelines(definition=CLICKS, filename="c.etl"))
    d.ok(DeletePipeline(name="orders-to-s3"))
    deleted = d.ok(DeletePipeline(name="orders-to-ch"))
    assert d.state.fencing_token(dag_id) is None
    commands = d.state.commands_for_sidecar("both", applied)
    assert commands == [AssignmentCommand(deleted.index, Revoke(dag_id))]
    assert d.state.commands_for_sidecar("both", {dag_id: deleted.index}) == []


def test_a_stage_lost_and_regained_is_not_revoked() -> None:
    d, dag_id, ids = setup()
    applied = tokens_applied(d.state.commands_for_sidecar("both", {}))
    d.ok(AssignStages(assignments=(ReplicaAssignment(dag_id, ids[2], 0, "clickhouse-0"),)))
    d.ok(AssignStages(assignments=(ReplicaAssignment(dag_id, ids[2], 0, "both"),)))
    commands = d.state.commands_for_sidecar("both", applied)
    assert [type(c.command) for c in commands] == [Assign]
    assert commands[0].fencing_token == d.index


def test_tokens_only_ever_grow_across_a_history() -> None:
    d, dag_id, ids = setup()
    seen: list[int] = []
    applied: dict[str, int] = {}
    for holder in ("clickhouse-0", "both", "clickhouse-0", ""):
        d.ok(AssignStages(assignments=(ReplicaAssignment(dag_id, ids[2], 0, holder),)))
        commands = d.state.commands_for_sidecar("both", applied)
        assert commands, f"no command after moving the sink to {holder!r}"
        seen.extend(c.fencing_token for c in commands)
        applied = tokens_applied(commands)
    assert seen == sorted(seen) and len(set(seen)) == 4
