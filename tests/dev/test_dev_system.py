"""`etlrouter dev` as users and CI run it: a real subprocess that starts 11 more processes, moves records
and stops every one of them."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from etlrouter.connectors.expr import compile_predicate
from etlrouter.connectors.generator import GeneratorConfig, make_record
from etlrouter.sdk import Record
from tests.conftest import free_port

SAMPLE_EXPR = "value.amount >= 0 and value.id >= 0"


def dev_command(data_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "etlrouter",
        "dev",
        "--no-view",
        "--data-dir",
        str(data_dir),
        "--base-port",
        "0",
        *args,
    ]


def children(data_dir: Path) -> dict[str, int]:
    return dict(json.loads((data_dir / "dev.json").read_text())["children"])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(data_dir: Path) -> list[str]:
    """Command lines (or environments: the sidecars' data dir is an env var) of live processes that name
    `data_dir`."""
    found = []
    needle = str(data_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if (needle in cmdline or needle in environ) and alive(int(entry.name)):
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def assert_nothing_left(data_dir: Path, processes: int = 11) -> None:
    pids = children(data_dir)
    assert len(pids) == processes, pids  # the sample: 3 routers, 4 services, 4 sidecars
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert processes_mentioning(data_dir) == []


def sink_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_limit_run_delivers_every_record_to_both_sinks_and_stops_everything(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    started = time.monotonic()
    result = subprocess.run(
        dev_command(data, "--limit", "2000", "--timeout", "60"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "--limit 2000: done" in out
    assert f"data dir     {data}" in out
    assert "/graphql" in out
    assert len([line for line in out.splitlines() if line.startswith("/metrics")]) == 7
    assert "shared stage transform valid-orders: runs once for orders-archive, orders-warehouse" in out

    config = GeneratorConfig(seed=7, limit=2000)
    keep = compile_predicate(SAMPLE_EXPR)
    expected = {o: make_record(config, 0, o).value.decode() for o in range(2000)}
    assert all(keep(Record(b"", v.encode(), {}, 0, o)) for o, v in expected.items())  # all pass: valid
    for sink in ("archive", "warehouse"):
        lines = sink_lines(data / "sinks" / f"{sink}.jsonl")
        assert {line["offset"] for line in lines} == set(range(2000)), sink
        for line in lines:
            assert line["value"] == expected[line["offset"]]  # type: ignore[index]
    assert json.loads((data / "services" / "orders.state").read_text()) == {"0": 1999}
    assert_nothing_left(data)
    for log in (data / "logs").iterdir():
        assert "Traceback" not in log.read_text(), log
    print(f"dev --limit 2000 took {time.monotonic() - started:.1f} s")


def test_sigint_drains_stops_every_process_and_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    archive = data / "sinks" / "archive.jsonl"
    proc = subprocess.Popen(
        dev_command(data, "--rate", "2000"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 45
        while not (archive.exists() and archive.read_text().count("\n") > 1000):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no records reached the archive sink"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGINT: stopping" in out and "all 11 processes stopped" in out
    assert "killed after their deadline" not in out
    assert_nothing_left(data)
    acked = json.loads((data / "services" / "orders.state").read_text())["0"]
    assert acked >= 1000
    for sink in ("archive", "warehouse"):
        offsets = {line["offset"] for line in sink_lines(data / "sinks" / f"{sink}.jsonl")}
        assert set(range(acked + 1)) <= offsets, f"{sink} lacks acknowledged records"


def test_a_pipeline_file_declares_its_own_services(tmp_path: Path) -> None:
    pipelines = tmp_path / "mine.etl"
    pipelines.write_text(
        "# dev: service numbers generator --seed 3 --record-size 80\n"
        "# dev: service big filter\n"
        "# dev: service doubled map --program 'value.twice = value.amount * 2'\n"
        "# dev: service out jsonl_file_sink\n"
        "# dev: service rest jsonl_file_sink\n"
        'pipeline big { source numbers | transform big (config.expr = "value.amount >= 500") | sink out }\n'
        "pipeline all { source numbers | transform doubled | sink rest }\n"
    )
    data = tmp_path / "dev"
    result = subprocess.run(
        [*dev_command(data, "--limit", "600", "--timeout", "60"), str(pipelines)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = GeneratorConfig(seed=3, limit=600, record_size=80)
    records = [make_record(config, 0, o) for o in range(600)]
    big = {r.offset for r in records if json.loads(r.value)["amount"] >= 500}
    assert 0 < len(big) < 600
    assert {line["offset"] for line in sink_lines(data / "sinks" / "out.jsonl")} == big
    rest = sink_lines(data / "sinks" / "rest.jsonl")
    assert {line["offset"] for line in rest} == set(range(600))
    for line in rest:
        value = json.loads(line["value"])  # type: ignore[arg-type]
        assert value["twice"] == value["amount"] * 2
    pids = children(data)
    assert len(pids) == 3 + 5 + 5 and not [p for p in pids.values() if alive(p)]


def test_a_pipeline_naming_a_service_dev_does_not_run_fails_with_the_diagnostic(tmp_path: Path) -> None:
    pipelines = tmp_path / "bad.etl"
    pipelines.write_text("pipeline p { source orders | sink nowhere }\n")  # no `# dev:` lines: the sample's
    data = tmp_path / "dev"
    result = subprocess.run(
        [*dev_command(data, "--limit", "10"), str(pipelines)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "the pipelines were not applied" in result.stderr
    assert "nowhere" in result.stderr
    assert "(dev runs: orders, valid-orders, archive, warehouse)" in result.stderr
    assert_nothing_left(data)


def test_on_a_terminal_the_live_view_shows_the_shared_stages(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    controller, terminal = pty.openpty()
    cmd = [arg for arg in dev_command(data, "--limit", "3000", "--rate", "1000") if arg != "--no-view"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        assert proc.wait(timeout=60) == 0, screen[-3000:].decode(errors="replace")
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = screen.decode(errors="replace")
    assert "\x1b[?1049h" in text and "\x1b[?1049l" in text  # alternate screen entered and left
    assert "REC/S" in text and "raft leader: router-" in text
    assert "valid-orders" in text and "orders-archive, orders-warehouse (shared)" in text
    assert "--limit 3000: done" in text
    assert_nothing_left(data)


def test_an_http_ingest_service_pushes_through_its_own_sidecar(tmp_path: Path) -> None:
    http_port = free_port()
    pipelines = tmp_path / "ingest.etl"
    pipelines.write_text(
        f"# dev: service clicks http_ingest --http-port {http_port}\n"
        "# dev: service out jsonl_file_sink\n"
        "pipeline clicks-out { source clicks | sink out }\n"
    )
    data = tmp_path / "dev"
    proc = subprocess.Popen(
        [*dev_command(data), str(pipelines)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        body = b"".join(json.dumps({"n": n}).encode() + b"\n" for n in range(50))
        deadline = time.monotonic() + 60
        while True:  # 503 until the pipeline is placed; the default answer waits for delivery
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            request = urllib.request.Request(f"http://127.0.0.1:{http_port}/ingest", data=body)
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    assert reply.status == 200 and json.loads(reply.read())["delivered"] == 50
                    break
            except (urllib.error.HTTPError, urllib.error.URLError, ConnectionError) as e:
                assert time.monotonic() < deadline, f"http_ingest never took the records: {e}"
                time.sleep(0.3)
        values = [json.loads(line["value"]) for line in sink_lines(data / "sinks" / "out.jsonl")]  # type: ignore[arg-type]
        assert {v["n"] for v in values} == set(range(50))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert_nothing_left(data, processes=3 + 2 + 2)
