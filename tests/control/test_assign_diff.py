"""An Assign of a DAG generation the sidecar already holds goes without its DagSpec, and the sidecar
completes it from the one it holds (issue #13: a moved replica must not re-send whole DAGs)."""

from __future__ import annotations

from etlrouter._proto.v1 import control_pb2
from etlrouter.control import ApplyPipelines, Assign, SidecarView, place
from etlrouter.router.convert import command_to_proto
from etlrouter.sidecar.cluster import command_dag, with_spec
from tests.control.helpers import ORDERS, Driver, register_all


def assigned() -> tuple[Driver, str]:
    driver = Driver()
    register_all(driver)
    driver.ok(ApplyPipelines(definition=ORDERS, filename="orders.etl"))
    state = driver.state
    views = [SidecarView(id=sid, services=services) for sid, services in state.sidecar_services().items()]
    command = place(state.dags(), views, state.assignment()).to_command()
    assert command is not None
    driver.ok(command)
    return driver, "filter-valid-0"


def test_the_spec_is_left_out_only_for_the_generation_the_sidecar_holds() -> None:
    driver, sidecar = assigned()
    (command,) = driver.state.commands_for_sidecar(sidecar, {})
    assert isinstance(command.command, Assign)
    dag = command.command.dag
    full = command_to_proto(command)
    same = command_to_proto(command, {dag.id: dag.generation})
    older = command_to_proto(command, {dag.id: dag.generation - 1})
    assert full.assign.HasField("dag") and older.assign.HasField("dag")
    assert not same.assign.HasField("dag")
    assert same.assign.dag_id == dag.id == command_dag(same)[1]
    assert list(same.assign.placements) == list(full.assign.placements)
    assert same.ByteSize() <= full.ByteSize() - full.assign.dag.ByteSize()  # the whole spec is saved


def test_the_sidecar_completes_a_spec_less_assign_from_the_spec_it_holds() -> None:
    driver, sidecar = assigned()
    (command,) = driver.state.commands_for_sidecar(sidecar, {})
    assert isinstance(command.command, Assign)
    dag = command.command.dag
    full = command_to_proto(command)
    held = {dag.id: full.assign.dag}
    bare = command_to_proto(command, {dag.id: dag.generation})
    assert with_spec(bare.assign, held)
    assert bare == full
    # Nothing held (the sidecar reports nothing then, and the router sends the spec): refused, not guessed.
    lone = command_to_proto(command, {dag.id: dag.generation})
    assert not with_spec(lone.assign, {})
    assert with_spec(control_pb2.Assign(dag=full.assign.dag), {})  # a full Assign needs nothing held
