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
# A fourth branch through "the user's own" transform: a map the oracle does not know (chaos may kill it).
USER_MAP = f"{sys.executable} -m etlrouter connector map --program 'value.seen = 1' --port {{port}}"


def test_verify_with_chaos_loses_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "verify"
    report_file = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "etlrouter", "verify", "--chaos", "--duration", f"{DURATION_S}s",
        "--rate", str(RATE), "--chaos-interval", "3s", "--down", "1s", "--data-dir", str(data_dir),
        "--report", str(report_file), "--drain-timeout", "90s",
        "--transform-command", USER_MAP,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "VERIFIED: no record lost" in done.stdout
    report = json.loads(report_file.read_text())
    assert report["ok"] and report["complete"] and report["chaos"]
    assert report["records"] == DURATION_S * RATE == report["acknowledged"]
    assert report["early_acks"] == 0
    roles = {fault["role"] for fault in report["faults"]}
    # Every kind of fault happened; how many fit in the run depends on how fast victims come back (a loaded
    # machine fits fewer), so the count is not asserted beyond that.
    assert roles == {"sidecar", "service", "leader"}, report["faults"]
    assert all(f["victim"].startswith("router-") for f in report["faults"] if f["role"] == "leader")
    by_pipeline = {b["pipeline"]: b for b in report["branches"]}
    assert set(by_pipeline) == {"verify-direct", "verify-filtered", "verify-mapped", "verify-user"}
    for branch in report["branches"]:
        assert (branch["missing"], branch["corrupted"], branch["unexpected"]) == (0, 0, 0), branch
        assert branch["present"] == branch["expected"] > 0
    assert (
        by_pipeline["verify-direct"]["expected"]
        == report["records"]
        == by_pipeline["verify-user"]["expected"]
    )
    assert 0 < by_pipeline["verify-filtered"]["expected"] < report["records"]
    mapped = by_pipeline["verify-mapped"]
    assert mapped["dead_expected"] == report["records"] // 50  # every 50th id fails in the map program
    assert mapped["dead_found"] == mapped["dead_expected"] and mapped["dead_elsewhere"] == 0
    # The table says the same, and every process verify started is gone.
    assert "verify-mapped" in done.stdout and "faults injected:" in done.stdout
    assert processes_mentioning(data_dir) == []


def test_verify_finds_records_a_transform_loses(tmp_path: Path) -> None:
    # "The user's transform" is a filter: it drops records silently, which the oracle must call lost.
    report_file = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "etlrouter", "verify", "--duration", "5s", "--rate", "200",
        "--data-dir", str(tmp_path / "verify"), "--report", str(report_file), "--routers", "1",
        "--transform-command",
        f"{sys.executable} -m etlrouter connector filter --expr 'value.amount >= 500' --port {{port}}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    assert "NOT VERIFIED: verify-user:" in done.stdout
    report = json.loads(report_file.read_text())
    assert report["complete"] and not report["ok"]
    by_pipeline = {b["pipeline"]: b for b in report["branches"]}
    user = by_pipeline["verify-user"]
    assert 0 < user["missing"] < user["expected"] == report["records"] == 1000
    assert user["present"] + user["missing"] == user["expected"] and len(user["missing_ids"]) == 10
    for name in ("verify-direct", "verify-filtered", "verify-mapped"):
        assert by_pipeline[name]["missing"] == 0, by_pipeline[name]
