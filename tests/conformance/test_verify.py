"""`etlrouter verify --chaos`, as users run it: a local cluster of 15 processes, kill -9 of sidecars, services
and the Raft leader every few seconds, and a verdict of zero lost records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.dev.test_dev_system import processes_mentioning

DURATION_S = 20
RATE = 300


def test_verify_with_chaos_loses_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "verify"
    report_file = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "etlrouter", "verify", "--chaos", "--duration", f"{DURATION_S}s",
        "--rate", str(RATE), "--chaos-interval", "3s", "--down", "1s", "--data-dir", str(data_dir),
        "--report", str(report_file), "--drain-timeout", "90s",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "VERIFIED: no record lost" in done.stdout
    report = json.loads(report_file.read_text())
    assert report["ok"] and report["complete"] and report["chaos"]
    assert report["records"] == DURATION_S * RATE == report["acknowledged"]
    assert report["early_acks"] == 0
    roles = {fault["role"] for fault in report["faults"]}
    assert roles == {"sidecar", "service", "leader"}, report["faults"]
    assert len(report["faults"]) >= 5
    assert all(f["victim"].startswith("router-") for f in report["faults"] if f["role"] == "leader")
    by_pipeline = {b["pipeline"]: b for b in report["branches"]}
    assert set(by_pipeline) == {"verify-direct", "verify-filtered", "verify-mapped"}
    for branch in report["branches"]:
        assert (branch["missing"], branch["corrupted"], branch["unexpected"]) == (0, 0, 0), branch
        assert branch["present"] == branch["expected"] > 0
    assert by_pipeline["verify-direct"]["expected"] == report["records"]
    assert 0 < by_pipeline["verify-filtered"]["expected"] < report["records"]
    mapped = by_pipeline["verify-mapped"]
    assert mapped["dead_expected"] == report["records"] // 50  # every 50th id fails in the map program
    assert mapped["dead_found"] == mapped["dead_expected"] and mapped["dead_elsewhere"] == 0
    # The table says the same, and every process verify started is gone.
    assert "verify-mapped" in done.stdout and "faults injected:" in done.stdout
    assert processes_mentioning(data_dir) == []
