"""Chaos schedules: routers and sidecars in their own network namespaces, faults injected with iptables.

Every schedule runs concurrent clients (linearizable register ops, acknowledged registry writes) and a
status poller through the fault and after its heal, while records flow source → sink. Checks on every
schedule: at most one leader per term; every acknowledged registry write present after the heal; the
register history linearizable (etlrouter.testing.linearizability); no stage replica run by two sidecars
once the cluster settles, and no sidecar applying a lower fencing token after a higher one; every record
the source had acknowledged is in a sink file. The sidecar-cut schedules also check records keep moving.

By default each schedule class runs once (seed PARTITION_SEED, default 1). PARTITION_SCHEDULES=N runs N
schedules: the classes in order, then random classes with random parameters, all from the seed.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import admin_grpc, admin_pb2, control_grpc, control_pb2
from etlrouter.client.router import RouterClient
from etlrouter.testing.linearizability import check_kv_history
from tests.partition.clients import Workload, leaders_by_term
from tests.partition.system import ROUTERS, SIDECAR_HEARTBEAT_TIMEOUT_MS, SINKS, NetnsSystem

pytestmark = pytest.mark.partition

SEED = int(os.environ.get("PARTITION_SEED", "1"))
Measures = dict[str, object]


def current_leader(workload: Workload, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recent = [s for s in workload.obs.status[-12:] if s[3]]
        if recent:
            return recent[-1][3]
        time.sleep(0.1)
    raise TimeoutError("no leader reported")


def followers(leader: str) -> list[str]:
    return [r for r in ROUTERS if r != leader]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def hold(seconds: float) -> None:
    time.sleep(seconds)


# -- the schedule classes: each injects its fault, holds it, and returns what it measured ----------------


def probe(s: NetnsSystem, node: str) -> dict[str, str]:
    """Ask one router directly (no retries elsewhere): a linearizable read, a stale read, a write."""

    async def go() -> dict[str, str]:
        host, port = s.router_address(node).rsplit(":", 1)
        channel = Channel(host, int(port))
        admin, registry = admin_grpc.PipelineAdminStub(channel), control_grpc.ServiceRegistryStub(channel)
        instance = control_pb2.ServiceInstance(
            name=f"probe-{node}", kind=control_pb2.SERVICE_KIND_SINK, endpoint="10.213.7.252:1"
        )
        calls = {
            "linearizable_read": admin.GetPipeline(admin_pb2.GetPipelineRequest(name="flow"), timeout=2),
            "stale_read": admin.GetPipeline(
                admin_pb2.GetPipelineRequest(name="flow", consistency=admin_pb2.READ_CONSISTENCY_STALE),
                timeout=2,
            ),
            "write": registry.Register(
                control_pb2.RegisterServiceRequest(instance=instance, ttl_ms=1000), timeout=2
            ),
        }
        out = {}
        for what, call in calls.items():
            try:
                await call
                out[what] = "ok"
            except GRPCError as e:
                out[what] = e.status.name
            except (TimeoutError, OSError) as e:
                out[what] = type(e).__name__
        channel.close()
        return out

    return s.net.run_in("client", lambda: asyncio.run(go()))


def leader_isolated(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """The leader loses its followers; clients and sidecars still reach it."""
    leader = current_leader(w)
    s.net.cut(leader, followers(leader))
    time.sleep(1.5)  # past one election timeout
    answers = probe(s, leader)
    hold(rng.uniform(1.5, 3.5))
    return {f"old_leader_{k}": v for k, v in answers.items()}


def minority_isolated(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """A follower loses the other routers; clients and sidecars still reach it."""
    node = rng.choice(followers(current_leader(w)))
    s.net.cut(node, [r for r in ROUTERS if r != node])
    time.sleep(1.5)
    answers = probe(s, node)
    hold(rng.uniform(1.5, 3.5))
    return {f"minority_{k}": v for k, v in answers.items()}


def follower_unplugged(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """A follower loses everyone (routers, clients, sidecars)."""
    s.net.isolate(rng.choice(followers(current_leader(w))))
    hold(rng.uniform(3, 5))
    return {}


def leader_deaf(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """One-way: the leader hears nothing from its followers, they still hear it."""
    leader = current_leader(w)
    for f in followers(leader):
        s.net.drop_one_way(f, leader)
    hold(rng.uniform(3, 5))
    return {}


def follower_deaf(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """One-way: one follower hears nothing from the leader; the leader still hears it."""
    leader = current_leader(w)
    s.net.drop_one_way(leader, rng.choice(followers(leader)))
    hold(rng.uniform(3, 5))
    return {}


def flapping(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """For ~8 s a random router's links to the other routers go down and up every 0.3-1.5 s."""
    end = time.monotonic() + 8
    flaps = 0
    while time.monotonic() < end:
        victim = rng.choice(ROUTERS)
        s.net.cut(victim, [r for r in ROUTERS if r != victim])
        time.sleep(rng.uniform(0.3, 1.5))
        s.net.heal(ROUTERS)
        time.sleep(rng.uniform(0.3, 1.5))
        flaps += 1
    return {"flaps": flaps}


def loss30(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """30 % of the packets arriving at every router and sidecar are dropped, for ~8 s."""
    for node in [*ROUTERS, "sc-src", *SINKS]:
        s.net.loss(node, 0.3)
    hold(rng.uniform(6, 9))
    return {}


def _moved_while(s: NetnsSystem, seconds: float) -> int:
    time.sleep(1.0)  # let batches in flight when the cut began settle
    before = len(s.all_sink_offsets())
    time.sleep(seconds)
    return len(s.all_sink_offsets()) - before


def records_flowing(s: NetnsSystem) -> bool:
    """Records reach a sink now: the data plane has a working assignment (not one in mid-change)."""
    before = len(s.all_sink_offsets())
    time.sleep(1.0)
    return len(s.all_sink_offsets()) > before


def source_sidecar_cut(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """The source's sidecar loses the routers (longer than the heartbeat timeout) but not its peers."""
    s.net.cut("sc-src", ROUTERS)
    moved = _moved_while(s, SIDECAR_HEARTBEAT_TIMEOUT_MS / 1000 + rng.uniform(2, 3))
    assert moved > 0, "records stopped while the source sidecar was cut off"
    return {"records_moved_while_cut": moved}


def sink_sidecar_cut(s: NetnsSystem, w: Workload, rng: random.Random) -> Measures:
    """The sidecar running the sink loses the routers: the leader moves the replica to the other sink
    sidecar after the heartbeat timeout; after the heal the old holder must give it up."""
    holder = next((n for n in SINKS if s.running(n)[0]), SINKS[0])
    other = next(n for n in SINKS if n != holder)
    s.net.cut(holder, ROUTERS)
    moved = _moved_while(s, SIDECAR_HEARTBEAT_TIMEOUT_MS / 1000 + rng.uniform(2, 3))
    assert moved > 0, "records stopped while a sink sidecar was cut off"
    m: Measures = {"records_moved_while_cut": moved}
    # The cut-off holder still runs its replica (it heard of no newer assignment); the other may run it too.
    m["moved_to_other_sidecar"] = float(bool(s.running(other)[0]))
    m["cut_holder_still_running"] = float(bool(s.running(holder)[0]))
    return m


CLASSES: dict[str, Callable[[NetnsSystem, Workload, random.Random], Measures]] = {
    f.__name__: f
    for f in (
        leader_isolated,
        minority_isolated,
        follower_unplugged,
        source_sidecar_cut,
        sink_sidecar_cut,
        leader_deaf,
        follower_deaf,
        flapping,
        loss30,
    )
}


@dataclass(frozen=True)
class Schedule:
    index: int
    name: str
    seed: int


def plan(seed: int, count: int) -> list[Schedule]:
    rng = random.Random(seed)
    names = list(CLASSES)
    chosen = [names[i] if i < len(names) else rng.choice(names) for i in range(count)]
    return [Schedule(i, name, rng.randrange(1 << 30)) for i, name in enumerate(chosen)]


SCHEDULES = plan(SEED, int(os.environ.get("PARTITION_SCHEDULES", str(len(CLASSES)))))


def list_services(s: NetnsSystem) -> set[str]:
    async def go() -> set[str]:
        client = RouterClient(s.router_addresses, timeout=30)
        try:
            reply = await client.call(
                admin_grpc.PipelineAdminStub, "ListServices", admin_pb2.ListServicesRequest()
            )
            return {i.name for i in reply.services}
        finally:
            client.close()

    return s.net.run_in("client", lambda: asyncio.run(go()))


@pytest.mark.parametrize(
    "schedule", SCHEDULES, ids=[f"{x.index:02d}-{x.name}-seed{x.seed}" for x in SCHEDULES]
)
def test_schedule(
    system: NetnsSystem, schedule: Schedule, record_property: Callable[[str, object], None]
) -> None:
    s = system
    print(f"\nschedule {schedule.index} {schedule.name}: PARTITION_SEED={SEED} schedule seed {schedule.seed}")
    if schedule.index == 0:
        s.net.run_in("client", lambda: None)  # the namespace works from this process
        apply_flow(s)
    rng = random.Random(schedule.seed)
    workload = Workload(s.router_addresses, schedule.seed, prefix=f"lin{schedule.index}")
    thread = s.net.start_thread("client", workload.run)
    try:
        wait_for(lambda: len(workload.obs.write_acks) >= 3, 60, "writes acknowledged before the fault")
        wait_for(lambda: s.acked_offset() >= 0, 60, "records acknowledged before the fault")
        term_at_fault = max((x[2] for x in workload.obs.status), default=0)
        wait_for(lambda: records_flowing(s), 60, "records reaching a sink before the fault")
        faulted, faulted_wall = time.monotonic(), time.time()
        print(f"fault at {faulted_wall:.3f} (wall clock, as in the JSON logs)")
        try:
            measures = CLASSES[schedule.name](s, workload, rng)
        finally:
            s.net.heal()  # a failed schedule must not leave its rules for the next one
            print(f"healed at {time.time():.3f}")
        healed = time.monotonic()
        ready_s = s.wait_routers_ready(60)
        write_s = wait_for(
            lambda: any(t > healed for t in workload.obs.write_acks),
            60,
            "an acknowledged write after the heal",
        )
        acked_at_heal = s.acked_offset()
        records_s = wait_for(
            lambda: s.acked_offset() > acked_at_heal + 20, 60, "the source acknowledging again after the heal"
        )
        time.sleep(0.5)
    finally:
        workload.stop.set()
        thread.join(30)
    obs = workload.obs

    in_fault = [o for o in obs.operations if faulted <= o.invoke <= healed and o.kind.value == "write"]
    acked_in_fault = [o.response - o.invoke for o in in_fault if o.response != float("inf")]

    # At most one leader per term: the status polls of every router, and every router's own log of its
    # role changes (which misses no term, however short).
    window = [x for x in obs.status if x[0] >= faulted]
    claims = s.leadership_claims()
    for source, seen in (("status polls", obs.status), ("router logs", claims)):
        double = {t: ls for t, ls in leaders_by_term(seen).items() if len(ls) > 1}
        assert not double, f"two leaders in one term ({source}): {double}"
    term_before = max((t for ts, _, t, _ in claims if ts < faulted_wall), default=0)
    elections = len({t for ts, _, t, _ in claims if ts >= faulted_wall and t > term_before})
    new_terms = [x[0] - faulted for x in window if x[2] > term_at_fault and x[3]]

    # No acknowledged write lost.
    present = list_services(s)
    lost = [n for n in obs.durable_acked if n not in present]
    assert not lost, f"acknowledged registry writes lost: {lost[:10]} (of {len(obs.durable_acked)})"

    # The register history is linearizable.
    result = check_kv_history(obs.operations)
    assert result.ok, result.explain()

    # No acknowledged record lost.
    acked = s.acked_offset()
    missing = sorted(set(range(acked + 1)) - s.all_sink_offsets())
    assert not missing, f"{len(missing)} acknowledged records missing from the sinks, first {missing[:10]}"

    # Fencing: tokens never go backwards on a sidecar; once settled, each replica runs on one sidecar.
    for sidecar in ["sc-src", *SINKS]:
        _, tokens = s.running(sidecar)
        highest: dict[str, int] = {}
        for dag, token in tokens:
            assert token >= highest.get(dag, 0), f"{sidecar} applied token {token} after {highest[dag]}"
            highest[dag] = token

    def single_holders() -> bool:
        runs = [r for n in SINKS for r in s.running(n)[0]]
        return len(runs) == len(set(runs)) == 1

    wait_for(single_holders, 30, "one sink sidecar running the sink replica")
    fence_s = time.monotonic() - healed  # an upper bound: checked only after the waits above

    figures = {
        "elections": float(elections),
        "new_leader_after_fault_s": round(new_terms[0], 2) if new_terms else -1.0,
        "routers_ready_after_heal_s": round(ready_s, 2),
        "first_write_after_heal_s": round(write_s, 2),
        "records_acked_again_after_heal_s": round(records_s, 2),
        "single_sink_holder_by_s_after_heal": round(fence_s, 2),
        "ops": float(len(obs.operations)),
        "writes_acked_during_fault": float(len(acked_in_fault)),
        "max_write_latency_during_fault_s": round(max(acked_in_fault, default=0.0), 2),
        "unknown_writes": float(sum(1 for o in obs.operations if o.response == float("inf"))),
        "durable_acked": float(len(obs.durable_acked)),
        "records_acked": float(acked + 1),
        **measures,
    }
    print(f"schedule {schedule.index} {schedule.name} figures: {figures}")
    for key, value in figures.items():
        record_property(key, value)
    assert not [e for e in obs.errors if e.startswith("task failed")], obs.errors


def apply_flow(s: NetnsSystem) -> None:
    from tests.partition.system import PIPELINE

    async def go() -> None:
        client = RouterClient(s.router_addresses, timeout=30)
        try:
            reply = await client.call(
                admin_grpc.PipelineAdminStub,
                "ApplyPipelines",
                admin_pb2.ApplyPipelinesRequest(definition=PIPELINE, filename="flow.etl"),
                write=True,
            )
            assert not reply.diagnostics, [d.message for d in reply.diagnostics]
        finally:
            client.close()

    s.net.run_in("client", lambda: asyncio.run(go()))
