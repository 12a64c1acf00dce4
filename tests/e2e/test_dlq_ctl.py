"""Poison records go to the DLQ with provenance, `ctl dlq` lists and shows them, and after the fix
`ctl dlq redrive` sends them through; `ctl tap` shows records passing a stage. All real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.processes import Processes, connector, jsonl_offsets, ready, sidecar, wait_until
from tests.e2e.test_pipeline import apply
from tests.integration.cluster import RouterProcesses

TOTAL = 1000
POISON = "1 / (offset % 100) > 0"  # offsets 0, 100, 200, ... divide by zero: a permanent per-record error


def ctl(routers: RouterProcesses, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etlrouter", "ctl", "--router", routers.addresses[0], *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_poison_records_dlq_redrive_and_tap(system: tuple[RouterProcesses, Processes, Path]) -> None:
    routers, procs, tmp = system
    state, out = tmp / "generator.state", tmp / "out.jsonl"
    # 100/s: the records flow for 10 s, so `ctl tap` (a new process, started after the apply) sees some
    # even on a loaded machine (at 400/s all 1000 had passed in 1.6 s, before the tap attached: a CI flake).
    src = connector(
        procs, "orders", "generator", "--limit", str(TOTAL), "--rate", "100", "--state-file", str(state)
    )
    mid = connector(procs, "guard", "filter", "--expr", POISON)
    sink = connector(procs, "out", "jsonl_file_sink", "--path", str(out))
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [sink]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, "pipeline guarded { source orders (batch_size = 50) | transform guard | sink out }\n")

    tapped = ctl(routers, "tap", "guarded", "orders", "--limit", "3")
    assert tapped.returncode == 0, tapped.stderr
    assert len(tapped.stdout.splitlines()) == 3 and tapped.stdout.startswith("offset=")

    poison = {n for n in range(TOTAL) if n % 100 == 0}
    wait_until(
        lambda: len(set(jsonl_offsets(out))) == TOTAL - len(poison), 60, "the good records in the sink"
    )
    wait_until(lambda: json.loads(state.read_text()).get("0") == TOTAL - 1, 30, "every offset acknowledged")
    assert poison.isdisjoint(jsonl_offsets(out))

    listed = ctl(routers, "-o", "json", "dlq", "list", "--pipeline", "guarded")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert len(letters) == len(poison)
    assert {(x["sidecar"], x["pipeline"], x["service"], x["class"], x["reason"]) for x in letters} == {
        ("sc-mid", "guarded", "guard", "PERMANENT", "error")
    }
    shown = json.loads(ctl(routers, "-o", "json", "dlq", "show", letters[0]["id"]).stdout)
    assert shown["record"]["offset"] in poison and "division" in shown["error"].lower()
    assert shown["source"] == "orders/0" and shown["batch_id"]

    procs.kill("guard")  # the fix: the transform comes back with a safe expression, same port
    procs.start(
        "guard",
        ["-m", "etlrouter.connectors.filter", "--name", "guard", "--port", str(mid), "--expr", "true"],
    )
    wait_until(
        lambda: ctl(routers, "dlq", "redrive", "--pipeline", "guarded").returncode == 0, 30, "a redrive"
    )
    wait_until(lambda: set(jsonl_offsets(out)) == set(range(TOTAL)), 30, "the redriven records in the sink")
    remaining = json.loads(ctl(routers, "-o", "json", "dlq", "list").stdout)
    assert remaining == []
