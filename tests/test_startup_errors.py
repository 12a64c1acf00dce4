"""A role that cannot start says why in one line naming the setting, exits 2, and shows no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etlrouter", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # JSON log lines
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        yield s.getsockname()[1]


def router_args(tmp_path: Path, grpc_port: int = 0, http_port: int = 0) -> list[str]:
    ports = ["--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    return ["router", *ports, "--data-dir", str(tmp_path / "data")]


def test_router_grpc_port_in_use(tmp_path: Path, taken_port: int) -> None:
    result = run(*router_args(tmp_path, grpc_port=taken_port), cwd=tmp_path)
    assert_one_line_failure(result, f"127.0.0.1:{taken_port}", "address already in use", "--grpc-port")


def test_router_http_port_in_use(tmp_path: Path, taken_port: int) -> None:
    result = run(*router_args(tmp_path, http_port=taken_port), cwd=tmp_path)
    assert_one_line_failure(result, f"127.0.0.1:{taken_port}", "router.http", "--http-port")


def test_sidecar_grpc_port_in_use(tmp_path: Path, taken_port: int) -> None:
    args = ["sidecar", "--id", "s", "--grpc-port", str(taken_port), "--http-port", "0", "--scan-ports", "1"]
    result = run(*args, cwd=tmp_path, env={"ETLROUTER_SIDECAR__DATA_DIR": str(tmp_path / "sc")})
    assert_one_line_failure(result, f"127.0.0.1:{taken_port}", "sidecar.grpc", "--grpc-port")


def test_data_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    args = ["router", "--grpc-port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "file" / "r0")]
    result = run(*args, cwd=tmp_path)
    assert_one_line_failure(result, "cannot use data directory", str(tmp_path / "file" / "r0"), "--data-dir")


def test_data_dir_that_is_a_file_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(f"router:\n  data_dir: {tmp_path / 'file'}\n")
    result = run("--config", str(config), "router", "--grpc-port", "0", "--http-port", "0", cwd=tmp_path)
    assert_one_line_failure(result, "exists and is not a directory", "router.data_dir")


def test_binary_config_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 30)
    result = run("--config", str(config), *router_args(tmp_path), cwd=tmp_path)
    assert_one_line_failure(result, f"config error: {config}", "not UTF-8")


def test_config_file_with_nul_bytes(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(b"router:\n  node_id: a\x00b\n")
    result = run("--config", str(config), *router_args(tmp_path), cwd=tmp_path)
    assert_one_line_failure(result, f"config error: {config}", "binary")


def test_unreadable_config_file(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "missing.yaml"), *router_args(tmp_path), cwd=tmp_path)
    assert_one_line_failure(result, f"cannot read {tmp_path / 'missing.yaml'}")


@pytest.mark.parametrize(
    "text",
    ["router: [unclosed\n  - a\n", "router:\n\tnode_id: tab\n"],
)
def test_invalid_yaml_is_one_line(tmp_path: Path, text: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    result = run("--config", str(config), *router_args(tmp_path), cwd=tmp_path)
    assert_one_line_failure(result, f"config error: {config}:")
