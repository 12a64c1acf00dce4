"""The kit, as users run it (`etlrouter conformance ADDRESS`, a real process), against the project's reference
connectors (each started with `etlrouter connector NAME`) and against a service written with grpcio: all
conformant."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tests.conformance import contract
from tests.conftest import free_port
from tests.e2e.processes import Processes


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_listening(procs: Processes, ports: dict[str, int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    waiting = dict(ports)
    while waiting:
        for name, port in list(waiting.items()):
            proc = procs.procs[name]
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{procs.log(name)[-2000:]}")
            if listening(port):
                del waiting[name]
        if time.monotonic() > deadline:
            raise TimeoutError(f"not listening after {timeout} s: {sorted(waiting)}")
        time.sleep(0.1)


def conformance(address: str, *args: str, junit: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--junit", str(junit)] if junit else []
    return subprocess.run(
        [sys.executable, "-m", "etlrouter", "conformance", address, *extra, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


class Reference:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports: dict[str, int] = {}
        self.args: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    workdir = tmp_path_factory.mktemp("reference")
    lines = [json.dumps({"id": n, "amount": n % 50}) for n in range(400)]
    (workdir / "in.jsonl").write_text("\n".join(lines) + "\n")
    (workdir / "lookup.csv").write_text("id,name\n1,alice\n2,bob\n3,carol\n")
    sink = workdir / "out.jsonl"
    count = f'grep -c \'"batch_id":"{{batch_id}}"\' {sink} || true'
    connectors: dict[str, tuple[list[str], list[str]]] = {
        # name: (connector arguments, conformance arguments)
        "generator": (["--partitions", "3"], []),
        "jsonl-file-source": (["--path", str(workdir / "in.jsonl")], []),
        "filter": (["--expr", "value.amount >= 10"], []),
        "map": (["--program", "value.total = value.amount * 2"], []),
        "jsonl-file-sink": (["--path", str(sink)], ["--verify-command", count]),
        "stdout": (["--format", "json"], []),
        "lookup-file": (
            ["--path", str(workdir / "lookup.csv"), "--key-column", "id"],
            ["--key", "1", "--key", "3"],
        ),
        "http-ingest": (["--sidecar", f"127.0.0.1:{free_port()}", "--http-port", str(free_port())], []),
    }
    ref = Reference(workdir)
    procs = Processes(workdir)
    try:
        for name, (args, kit_args) in connectors.items():
            port = free_port()
            procs.start(name, ["-m", "etlrouter", "connector", name, "--port", str(port), *args])
            ref.ports[name] = port
            ref.args[name] = kit_args
        wait_listening(procs, ref.ports)
        yield ref
    finally:
        procs.stop_all()


KINDS = {
    "generator": "source",
    "jsonl-file-source": "source",
    "filter": "transform",
    "map": "transform",
    "jsonl-file-sink": "sink",
    "stdout": "sink",
    "lookup-file": "lookup",
    "http-ingest": "source",
}


@pytest.mark.parametrize("name", list(KINDS))
def test_reference_connector_is_conformant(reference: Reference, name: str) -> None:
    junit = reference.workdir / f"{name}.xml"
    done = conformance(f"127.0.0.1:{reference.ports[name]}", *reference.args[name], junit=junit)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(f": {KINDS[name]}")
    assert not [line for line in lines if line.startswith("FAIL")], done.stdout
    assert lines[-1].startswith("conformant:")
    suite = ET.parse(junit).getroot()
    cases = {case.get("name") for case in suite.iter("testcase")}
    assert {"reflection", "health", f"{KINDS[name]}.capabilities", "deadlines"} <= cases
    assert suite.get("failures") == "0"
    if name == "http-ingest":  # a push source: the pull checks do not apply
        assert any(line.startswith("PASS  source.push") for line in lines), done.stdout


def test_a_grpcio_service_of_every_kind_is_conformant(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    script = Path(__file__).with_name("grpcio_service.py")
    procs.start("grpcio", [str(script), "--port", str(port), "--sink-path", str(sink)])
    try:
        wait_listening(procs, {"grpcio": port})
        keys = [arg for key in contract.TABLE for arg in ("--key", key.decode())]
        junit = tmp_path / "grpcio.xml"
        done = conformance(
            f"127.0.0.1:{port}", "--verify-command", contract.verify_command(sink), *keys, junit=junit
        )
    finally:
        procs.stop_all()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].endswith(": source, transform, sink, lookup")
    not_passed = [line for line in done.stdout.splitlines()[1:-1] if not line.startswith("PASS")]
    assert not_passed == [], done.stdout
    suite = ET.parse(junit).getroot()
    assert int(suite.get("tests") or 0) >= 30 and suite.get("failures") == "0"


def test_a_failing_service_exits_1_and_says_so_in_junit(reference: Reference, tmp_path: Path) -> None:
    # A stage option whose expression does not compile: every ProcessBatch answers INVALID_ARGUMENT.
    junit = tmp_path / "bad.xml"
    done = conformance(
        f"127.0.0.1:{reference.ports['filter']}", "--option", "expr=value.amount >", junit=junit
    )
    assert done.returncode == 1, done.stdout
    assert "FAIL  transform.results" in done.stdout
    assert "INVALID_ARGUMENT" in done.stdout and "--option" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("NOT conformant")
    suite = ET.parse(junit).getroot()
    failures = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert "transform.results" in failures


def test_nothing_listening_fails_reflection_and_health(tmp_path: Path) -> None:
    done = conformance(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert done.returncode == 1
    assert "FAIL  reflection" in done.stdout and "FAIL  health" in done.stdout


def test_records_and_options_come_from_the_command_line(reference: Reference, tmp_path: Path) -> None:
    # Three records of the jsonl-file sink's own format, written to the sink and counted back.
    lines = [{"key": f"k{n}", "value": json.dumps({"amount": n * 20}), "event_time_ms": n} for n in range(3)]
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = conformance(
        f"127.0.0.1:{reference.ports['jsonl-file-sink']}",
        "--records",
        str(records),
        *reference.args["jsonl-file-sink"],
    )
    assert done.returncode == 0, done.stdout
    assert "WriteBatch of 3 records" in done.stdout and "(3 records)" in done.stdout
    # The filter keeps amount >= 10 by its --expr; the stage option overrides it: nothing passes.
    done = conformance(
        f"127.0.0.1:{reference.ports['filter']}",
        "--records",
        str(records),
        "--option",
        "expr=value.amount > 1000",
    )
    assert done.returncode == 0, done.stdout
    assert "(0 out, 0 errors for 3 in)" in done.stdout


def test_verify_refuses_a_bad_duration() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "etlrouter", "verify", "--duration", "soon"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "'soon'" in done.stderr
