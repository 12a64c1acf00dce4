"""Each role exports only its own metric families (#22): a sidecar process has no `etlrouter_raft_*` or
registry series stuck at zero, a router has them."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import etlrouter.cli  # what `python -m etlrouter ROLE` imports before the role runs
for module in sys.argv[1:]:
    __import__(module)
from etlrouter.core.metrics import REGISTRY
print(json.dumps(sorted({m.name for m in REGISTRY.collect()})))
"""
ROUTER_ONLY = ("etlrouter_raft_", "etlrouter_registry_")


def families(*modules: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=60, check=True
    )
    return list(json.loads(out.stdout))


def test_a_sidecar_exports_no_router_families() -> None:
    names = families("etlrouter.sidecar.role", "etlrouter.sidecar.engine")
    assert [n for n in names if n.startswith(ROUTER_ONLY)] == []
    assert "etlrouter_watermark_lag_seconds" in names


def test_a_router_exports_its_raft_and_registry_families() -> None:
    names = families("etlrouter.router.role")
    assert "etlrouter_raft_term" in names and "etlrouter_registry_objects" in names
