"""Pipeline churn leaves no trace (issue #13): apply and delete 1,000 pipelines while their sidecars
heartbeat, and both the replicated state and each sidecar's fencing-token table return to the size they
started at.

The router side is the real ControlState driven like Raft would (tests.control.helpers.Driver) plus the
leader's rule for confirmed revocations (ForgetReleased); the sidecar side applies its commands with the
sidecar's own pure rules (`is_stale`, `tokens_to_forget`), as sidecar/cluster.py does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from etlrouter.control import (
    ApplyPipelines,
    Assign,
    DeletePipeline,
    ForgetReleased,
    Revoke,
    SidecarView,
    place,
)
from etlrouter.sidecar.cluster import is_stale, tokens_to_forget
from tests.control.helpers import SERVICES, Driver, register_all

CHURN = 1000


@dataclass
class SimSidecar:
    """A sidecar's command bookkeeping: applied tokens per DAG and what it runs."""

    id: str
    applied: dict[str, int] = field(default_factory=dict)
    running: dict[str, set[str]] = field(default_factory=dict)

    def heartbeat(self, driver: Driver) -> None:
        state = driver.state
        # Router, on the heartbeat: the commands still due, then what the sidecar may forget.
        for command in state.commands_for_sidecar(self.id, self.applied):
            inner = command.command
            dag_id = inner.dag.id if isinstance(inner, Assign) else inner.dag_id
            if is_stale(self.applied, dag_id, command.fencing_token):
                continue
            if isinstance(inner, Assign):
                local = {p.stage_id for p in inner.local}
                if local:
                    self.running[dag_id] = local
                else:
                    self.running.pop(dag_id, None)
            else:
                lost = set(inner.stage_ids)
                left = self.running.get(dag_id, set()) - lost if lost else set()
                if left:
                    self.running[dag_id] = left
                else:
                    self.running.pop(dag_id, None)
            self.applied[dag_id] = max(self.applied.get(dag_id, 0), command.fencing_token)
        confirmed = state.confirmed_releases(self.id, self.applied)
        forget = state.forgettable_dags(self.id, self.applied)
        for dag_id in tokens_to_forget(forget, self.running):
            del self.applied[dag_id]
        if confirmed:  # the leader's control loop replicates these
            driver.ok(ForgetReleased(confirmed={self.id: confirmed}))


def placement_round(driver: Driver) -> None:
    state = driver.state
    views = [SidecarView(id=sid, services=services) for sid, services in state.sidecar_services().items()]
    command = place(state.dags(), views, state.assignment()).to_command()
    if command is not None:
        driver.ok(command)


def state_size(driver: Driver) -> int:
    """Bytes of the replicated state, without the client-session table (bounded by MAX_SESSIONS anyway)."""
    snapshot = driver.state.to_snapshot()
    return len(
        msgspec.msgpack.encode(msgspec.structs.replace(snapshot, sessions=(), applied_index=0, revision=0))
    )


def pipeline(n: int) -> str:
    # Distinct options make distinct stages, so every apply creates a new DAG (a new fencing history).
    return f"""
pipeline churn-{n} {{
  source kafka-orders (batch_size = {100 + n})
  | transform filter-valid
  | sink clickhouse
}}
"""


def test_apply_delete_churn_returns_state_and_token_tables_to_their_start() -> None:
    driver = Driver()
    register_all(driver)
    sidecars = [SimSidecar(f"{name}-0") for name in SERVICES]
    for sc in sidecars:
        sc.heartbeat(driver)
    start_state = state_size(driver)
    start_tables = [len(sc.applied) for sc in sidecars]

    peak_state = peak_tables = 0
    for n in range(CHURN):
        driver.ok(ApplyPipelines(definition=pipeline(n), filename=f"churn-{n}.etl"))
        placement_round(driver)
        for sc in sidecars:
            sc.heartbeat(driver)
        assert any(sc.running for sc in sidecars)  # the pipeline really ran somewhere
        driver.ok(DeletePipeline(name=f"churn-{n}"))
        peak_state = max(peak_state, state_size(driver))  # the releases the sidecars still have to apply
        for sc in sidecars:
            sc.heartbeat(driver)
        peak_tables = max(peak_tables, max(len(sc.applied) for sc in sidecars))
    for _ in range(2):  # a revocation is confirmed on one heartbeat, forgotten on the next
        for sc in sidecars:
            sc.heartbeat(driver)

    assert not any(sc.running for sc in sidecars)
    assert state_size(driver) == start_state, (start_state, peak_state, state_size(driver))
    assert [len(sc.applied) for sc in sidecars] == start_tables
    assert peak_state > start_state  # the bookkeeping was there, and went
    assert peak_tables <= 2  # never more than the DAG in flight and the one just deleted
    print(f"churn {CHURN}: state {start_state} B at start, peak {peak_state} B, end {state_size(driver)} B")


def test_without_confirmation_the_release_is_kept_and_the_token_too() -> None:
    """The bound comes from the confirmation round trip, not from forgetting early: a sidecar that has not
    applied the revocation keeps getting it, and keeps its token."""
    driver = Driver()
    register_all(driver)
    sc = SimSidecar("clickhouse-0")
    driver.ok(ApplyPipelines(definition=pipeline(1), filename="one.etl"))
    placement_round(driver)
    sc.heartbeat(driver)
    (dag_id,) = sc.running
    driver.ok(DeletePipeline(name="churn-1"))
    # The sidecar has not heard of the deletion: the router still owes it a Revoke, and keeps the record.
    assert driver.state.confirmed_releases(sc.id, sc.applied) == {}
    assert dag_id not in driver.state.forgettable_dags(sc.id, sc.applied)
    due = driver.state.commands_for_sidecar(sc.id, sc.applied)
    assert [type(c.command) for c in due] == [Revoke]
    sc.heartbeat(driver)  # applies the Revoke, confirms it
    assert not sc.running and dag_id in sc.applied
    sc.heartbeat(driver)  # the confirmation was replicated: now it may forget
    assert dag_id not in sc.applied
