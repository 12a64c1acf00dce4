from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from prometheus_client.parser import text_string_to_metric_families

from etlrouter import __version__
from etlrouter.cli import apply_role_argument
from etlrouter.core.grpc import open_channel
from tests.conftest import free_port

ETLROUTER = [sys.executable, "-m", "etlrouter"]
ROLES = ["router", "sidecar", "operator", "ctl", "dev"]


def etlrouter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ETLROUTER, *args], capture_output=True, text=True, timeout=60, env=env)


def test_help_lists_every_role() -> None:
    result = etlrouter("--help")
    assert result.returncode == 0
    for role in ROLES:
        assert f"\n  {role} " in result.stdout


@pytest.mark.parametrize("role", ROLES)
def test_role_help(role: str) -> None:
    result = etlrouter(role, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: etlrouter {role}" in result.stdout


def test_version() -> None:
    assert etlrouter("--version").stdout.strip() == f"etlrouter, version {__version__}"


def test_role_flag_and_env_select_the_subcommand() -> None:
    assert apply_role_argument(["--role", "router", "--grpc-port", "1"], {}) == ["router", "--grpc-port", "1"]
    assert apply_role_argument(["--log-level", "debug", "--role=sidecar"], {}) == [
        "--log-level",
        "debug",
        "sidecar",
    ]
    assert apply_role_argument([], {"ETLROUTER_ROLE": "operator"}) == ["operator"]
    # An explicit subcommand wins over the environment.
    assert apply_role_argument(["ctl", "--help"], {"ETLROUTER_ROLE": "router"}) == ["ctl", "--help"]
    assert apply_role_argument(["--config", "router", "--help"], {"ETLROUTER_ROLE": "router"}) == [
        "--config",
        "router",
        "--help",
    ]


def test_malformed_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sidecar:\n  heartbeat_interval_ms: -5\n")
    result = etlrouter("--config", str(bad), "config", "show")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "$.sidecar.heartbeat_interval_ms" in lines[0]
    assert str(bad) in lines[0]


def test_malformed_env_var_is_one_line_and_exit_2() -> None:
    env = {"PATH": "/usr/bin:/bin", "ETLROUTER_TRANSPORT__MAX_FRAME_SIZE": "huge"}
    result = etlrouter("router", "--help", env=env)  # --help never reads config
    assert result.returncode == 0
    result = etlrouter("config", "show", "--role", "router", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: Expected `int`, got `str` - at `$.transport.max_frame_size` "
        "(from env ETLROUTER_TRANSPORT__MAX_FRAME_SIZE)"
    )


def test_config_show_reflects_flags_and_env() -> None:
    env = {"PATH": "/usr/bin:/bin", "ETLROUTER_SIDECAR__SCAN_PORTS": "6000-6001"}
    result = etlrouter("--log-level", "debug", "config", "show", "--role", "sidecar", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sidecar"]["scan_ports"] == "6000-6001"
    assert data["logging"]["level"] == "debug"
    assert "router" not in data


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_http(url: str, deadline_s: float = 20) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            http_get(url)
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


async def grpc_health(address: str) -> int:
    channel = open_channel(address)
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=5)
        return int(reply.status)
    finally:
        channel.close()


def wait_ready(url: str, deadline_s: float = 20) -> dict[str, object]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status, body = http_get(url)
        if status == 200:
            return dict(json.loads(body))
        time.sleep(0.1)
    raise TimeoutError(f"{url} never became ready: {body}")


def test_role_process_serves_health_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    ports = ["--grpc-port", str(grpc_port), "--http-port", str(http_port), "--data-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [*ETLROUTER, "--role", "router", "--log-format", "json", *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{http_port}/healthz")
        assert http_get(f"http://127.0.0.1:{http_port}/healthz") == (200, '{"status": "ok"}')
        # Without peers a router is a single-node cluster: it elects itself and becomes ready.
        assert wait_ready(f"http://127.0.0.1:{http_port}/readyz")["reason"] == "leader is router-0"
        _, text = http_get(f"http://127.0.0.1:{http_port}/metrics")
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"etlrouter_build_info", "process_resident_memory_bytes", "etlrouter_raft_term"} <= names
        assert asyncio.run(grpc_health(f"127.0.0.1:{grpc_port}")) == HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        logs = [json.loads(line) for line in proc.stderr.read().splitlines()]  # type: ignore[union-attr]
        messages = [entry["msg"] for entry in logs]
        assert "router started" in messages and "router stopped" in messages
        assert all(entry["role"] == "router" for entry in logs)
    finally:
        proc.kill()
        proc.wait()


def test_shell_completion_offers_subcommands() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "COMP_WORDS": "etlrouter ctl d",
        "COMP_CWORD": "2",
        "_ETLROUTER_COMPLETE": "bash_complete",
    }
    result = etlrouter(env=env)
    assert result.returncode == 0
    assert result.stdout.split() == ["plain,delete", "plain,describe", "plain,dlq"]


def test_connector_subcommand_runs_a_reference_connector() -> None:
    listing = etlrouter("connector")
    assert listing.returncode == 0 and "generator" in listing.stdout and "http-ingest" in listing.stdout
    unknown = etlrouter("connector", "nope")
    assert unknown.returncode == 2 and "no connector 'nope'" in unknown.stderr
    port = free_port()
    proc = subprocess.Popen(
        [*ETLROUTER, "connector", "generator", "--name", "gen", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and status != HealthCheckResponse.SERVING:
            try:
                status = asyncio.run(grpc_health(f"127.0.0.1:{port}"))
            except OSError:
                time.sleep(0.1)
        assert status == HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["router"],
            {"ETLROUTER_ROUTER__NOSUCH": "1"},
            "unknown field `nosuch` - at `$.router` (from env ETLROUTER_ROUTER__NOSUCH)",
        ),
        (
            ["router", "--node-id", "r0", "--peer", "r0=127.0.0.1:notaport"],
            {},
            "- at `$.router.peers[0]` (from flag --peer)",
        ),
        (["sidecar", "--scan-ports", "1-x"], {}, "(from flag --scan-ports)"),
    ],
)
def test_config_errors_name_the_env_var_or_flag(args: list[str], env: dict[str, str], expected: str) -> None:
    import os

    result = etlrouter(*args, env={**os.environ, **env})
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("config error: ")
    assert line.endswith(expected), line


def test_a_bad_key_in_a_config_file_names_the_file_and_key(tmp_path: Path) -> None:
    import os

    config = tmp_path / "c.toml"
    config.write_text("[router.raft]\nnosuch = 1\n")
    result = etlrouter("--config", str(config), "router", "--grpc-port", "1", env=dict(os.environ))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"(from file {config}, key router.raft.nosuch)")
