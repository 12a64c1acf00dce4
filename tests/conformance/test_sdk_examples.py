"""The SDK's examples in docs/sdk.md, run as written (only the port changed), against the kit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conformance.test_services import conformance, wait_listening
from tests.conftest import ROOT, free_port
from tests.e2e.processes import Processes

BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def examples() -> dict[str, str]:
    """The runnable service examples of docs/sdk.md by class name (not the push source: needs a sidecar)."""
    out: dict[str, str] = {}
    for code in BLOCK.findall((ROOT / "docs" / "sdk.md").read_text()):
        match = re.search(r"^class (\w+)\(", code, re.M)
        if match and re.search(r"^\s*run\(", code, re.M) and "Pusher(" not in code:
            out[match.group(1)] = code
    return out


# What the kit finds in each example: every example users copy keeps the contract.
EXPECTED_FAILURES: dict[str, list[str]] = {
    "Counter": [],
    "Upper": [],
    "Collect": [],
    "Countries": [],
}
KIT_ARGS = {"Countries": ["--key", "DE", "--key", "FR"]}


def test_the_docs_have_the_examples() -> None:
    assert sorted(examples()) == sorted(EXPECTED_FAILURES)


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURES))
def test_sdk_example(name: str, tmp_path: Path) -> None:
    port = free_port()
    code = re.sub(r"port=\d+", f"port={port}", examples()[name])
    (tmp_path / f"{name.lower()}.py").write_text(code)
    procs = Processes(tmp_path)
    # In its own directory: the sink example keeps a file of batch ids in the working directory.
    log = (tmp_path / f"{name}.log").open("ab")
    procs.procs[name] = subprocess.Popen(
        [sys.executable, str(tmp_path / f"{name.lower()}.py")], stdout=log, stderr=log, cwd=tmp_path
    )
    try:
        wait_listening(procs, {name: port})
        done = conformance(f"127.0.0.1:{port}", *KIT_ARGS.get(name, []))
    finally:
        procs.stop_all()
        log.close()
    assert (tmp_path / "collect.batches").exists() == (name == "Collect")
    failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == EXPECTED_FAILURES[name], done.stdout
    assert done.returncode == (1 if failed else 0), done.stdout
