"""A pipeline of services written with grpcio (Google's C-core gRPC) instead of etlrouter's SDK.

Each service runs in its own process (tests/e2e/grpcio_services.py: generic handlers over the contract's
message classes, grpcio server reflection, names declared through GetCapabilities); three sidecars
discover them by reflection and register them, and records flow source -> transform -> sink through the
router cluster's pipeline, with the grpcio source acknowledged up to its last offset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.processes import Processes, ready, sidecar, wait_until
from tests.e2e.test_pipeline import apply
from tests.integration.cluster import RouterProcesses

SCRIPT = Path(__file__).with_name("grpcio_services.py")
TOTAL = 5000


def grpcio_service(procs: Processes, kind: str, name: str, *args: str) -> int:
    port = free_port()
    procs.start(name, [str(SCRIPT), kind, "--name", name, "--port", str(port), *args])
    return port


def sink_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def source_state(path: Path) -> dict[str, int]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def test_grpcio_source_transform_and_sink_are_discovered_and_used(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    state, out = tmp / "source.json", tmp / "sink.jsonl"
    src = grpcio_service(procs, "source", "g-orders", "--limit", str(TOTAL), "--state", str(state))
    mid = grpcio_service(procs, "transform", "g-upper")
    dst = grpcio_service(procs, "sink", "g-store", "--path", str(out))
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [dst]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    # The names come from the services' GetCapabilities: the pipeline only resolves if they were declared.
    apply(routers, "pipeline interop { source g-orders | transform g-upper | sink g-store }")

    wait_until(
        lambda: len({r["offset"] for r in sink_lines(out)}) == TOTAL, 60, f"{TOTAL} records in the sink"
    )
    wait_until(
        lambda: source_state(state).get("acked") == TOTAL - 1, 30, "the source acknowledged to the end"
    )

    records = sink_lines(out)
    assert {r["offset"] for r in records} == set(range(TOTAL))
    for r in records:
        assert r["value"] == f"RECORD-{r['offset']}", r  # went through the grpcio transform
        assert r["headers"] == {"origin": "grpcio", "via-grpcio": "g-upper"}, r
    seen = source_state(state)
    print(f"\nsink: {len(records)} lines for {TOTAL} records; source: {seen}")
    assert seen["acks"] >= 1
    for name in ("sc-src", "sc-mid", "sc-sink"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]
    for name in ("g-orders", "g-upper", "g-store"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]


def test_records_of_a_pull_that_timed_out_are_not_lost(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    state, out = tmp / "source.json", tmp / "sink.jsonl"
    slow = ["--slow-pull-at", "2000", "--slow-pull-ms", "3000"]
    src = grpcio_service(procs, "source", "g-orders", "--limit", str(TOTAL), "--state", str(state), *slow)
    dst = grpcio_service(procs, "sink", "g-store", "--path", str(out))
    http = [sidecar(procs, "sc-src", routers, [src]), sidecar(procs, "sc-sink", routers, [dst])]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    # The source's calls time out after 1 s; the pull starting at offset 2000 answers after 3 s.
    apply(routers, "pipeline slow { source g-orders (timeout = 1s) | sink g-store }")
    wait_until(
        lambda: source_state(state).get("acked") == TOTAL - 1, 60, "the source acknowledged to the end"
    )
    offsets = {int(str(r["offset"])) for r in sink_lines(out)}
    missing = sorted(set(range(TOTAL)) - offsets)
    print(
        f"\nacknowledged to {TOTAL - 1}; {len(missing)} offsets never written: {missing[:3]}..{missing[-3:]}"
    )
    assert not missing, f"{len(missing)} acknowledged offsets never reached the sink"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
