"""The whole data plane, every part its own process: 3 routers, 3 sidecars, a source, a transform and two
sinks. Records flow source -> transform -> both sinks through the optimizer's merged DAG."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from tests.e2e.processes import Processes, connector, jsonl_offsets, ready, sidecar, wait_until
from tests.integration.cluster import RouterProcesses

TOTAL = 5000
PIPELINES = """
pipeline to-left  { source orders | transform clean (config.expr = "true") | sink left }
pipeline to-right { source orders | transform clean (config.expr = "true") | sink right }
"""


def apply(routers: RouterProcesses, text: str) -> None:
    async def go() -> None:
        client = RouterClient(routers.addresses, timeout=20)
        try:
            reply = await client.call(
                admin_grpc.PipelineAdminStub,
                "ApplyPipelines",
                admin_pb2.ApplyPipelinesRequest(definition=text, filename="e2e.etl"),
                write=True,
            )
            assert not reply.diagnostics, [d.message for d in reply.diagnostics]
        finally:
            client.close()

    asyncio.run(go())


def start_sample(
    routers: RouterProcesses, procs: Processes, tmp: Path, *generator_args: str
) -> tuple[Path, Path, Path]:
    """Source, transform and two sinks, each with its own sidecar; the two pipelines applied.
    Returns the generator's state file (its acknowledged offsets) and the two sink files."""
    state, left, right = tmp / "generator.state", tmp / "left.jsonl", tmp / "right.jsonl"
    src = connector(procs, "orders", "generator", *generator_args, "--state-file", str(state))
    mid = connector(procs, "clean", "filter")
    sink_l = connector(procs, "left", "jsonl_file_sink", "--path", str(left))
    sink_r = connector(procs, "right", "jsonl_file_sink", "--path", str(right))
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [sink_l, sink_r]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, PIPELINES)
    return state, left, right


def test_records_flow_to_both_sinks_and_the_source_is_acked_in_order(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    state, left, right = start_sample(routers, procs, tmp, "--limit", str(TOTAL), "--seed", "7")

    wait_until(
        lambda: len(set(jsonl_offsets(left))) == TOTAL and len(set(jsonl_offsets(right))) == TOTAL,
        60,
        f"{TOTAL} records in both sinks",
    )
    wait_until(
        lambda: state.exists() and json.loads(state.read_text()).get("0") == TOTAL - 1,
        30,
        "the source acknowledged up to its last offset",
    )
    assert set(jsonl_offsets(left)) == set(range(TOTAL))
    assert set(jsonl_offsets(right)) == set(range(TOTAL))
    for name in ("sc-src", "sc-mid", "sc-sink"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]


def contiguous_prefix(offsets: list[int]) -> int:
    """Highest n such that every offset 0..n is present (-1 if 0 is missing)."""
    present, n = set(offsets), -1
    while n + 1 in present:
        n += 1
    return n


def test_zero_loss_when_a_sidecar_a_sink_and_the_leader_are_killed(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    total = 20_000
    state, left, right = start_sample(routers, procs, tmp, "--limit", str(total), "--rate", "4000")

    violations: list[str] = []

    def acked() -> int:
        try:
            return int(json.loads(state.read_text()).get("0", -1))
        except (OSError, ValueError):
            return -1

    def check_acks() -> None:
        # Read the ack first, then the sinks: whatever was acknowledged must already be in both.
        ack = acked()
        for sink in (left, right):
            prefix = contiguous_prefix(jsonl_offsets(sink))
            if prefix < ack:
                violations.append(f"offset {ack} acknowledged but {sink.name} has only 0..{prefix}")

    def run_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            check_acks()
            time.sleep(0.1)

    wait_until(lambda: len(jsonl_offsets(left)) > 1000, 30, "records flowing")
    procs.kill("right")  # a sink service dies mid-run ...
    run_for(1.0)
    procs.restart("right")  # ... and comes back on the same port and file
    procs.kill("sc-src")  # the sidecar holding the ack ledger dies ...
    run_for(1.0)
    procs.restart("sc-src")  # ... its next session rewinds the source to the last acknowledged offset
    leader = next(n for n in routers.ids if (r := routers.readyz(n)) and r.get("reason") == f"leader is {n}")
    routers.kill(leader)  # and the router leader dies
    run_for(2.0)
    routers.start(leader)

    def all_acked() -> bool:
        check_acks()
        return acked() == total - 1

    wait_until(all_acked, 120, "the source acknowledged every record")
    check_acks()
    assert not violations, violations[:5]
    for sink in (left, right):
        offsets = jsonl_offsets(sink)
        assert set(offsets) == set(range(total)), f"{sink.name} lost records"
        duplicates = len(offsets) - len(set(offsets))
        print(f"{sink.name}: {len(offsets)} lines, {duplicates} duplicates (at-least-once redelivery)")
