"""`etlrouter ctl validate` and `explain` work offline, with the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "pipelines.etl"


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etlrouter", "ctl", *args], capture_output=True, text=True, timeout=60
    )


def test_validate_accepts_the_example() -> None:
    result = ctl("validate", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{EXAMPLE}: valid"


def test_validate_reports_file_line_col_caret_and_hint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.etl"
    bad.write_text("pipeline p {\n  source a | transfrom b | sink c\n}\n")
    result = ctl("validate", str(bad))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{bad}:2:14: error: ")
    assert lines[2].index("^") == lines[1].index("transfrom")
    assert "did you mean `transform`?" in result.stderr


def test_validate_json_output(tmp_path: Path) -> None:
    bad = tmp_path / "bad.etl"
    bad.write_text("pipeline p { source a | sink b (parallelism = 0) }\n")
    result = ctl("-o", "json", "validate", str(bad))
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["valid"] is False
    (error,) = report["errors"]
    assert (error["line"], error["file"]) == (1, str(bad))
    assert "parallelism" in error["message"]


def test_unreadable_file_is_invalid_input(tmp_path: Path) -> None:
    result = ctl("validate", str(tmp_path / "missing.etl"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_explain_shows_the_shared_prefix() -> None:
    result = ctl("explain", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "# 2 pipelines, 5 stages (7 if run separately)" in result.stdout
    assert "[orders-to-ch, orders-to-s3]" in result.stdout
    mermaid = ctl("explain", "--format", "mermaid", str(EXAMPLE))
    assert mermaid.returncode == 0 and mermaid.stdout.startswith("flowchart")


def test_explain_of_invalid_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.etl"
    bad.write_text("pipeline {")
    result = ctl("explain", str(bad))
    assert result.returncode == 2
    assert f"{bad}:1:" in result.stderr
