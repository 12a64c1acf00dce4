"""Real database servers for connector tests, started from the Debian packages' binaries.

A fixture skips (with the apt package to install) only when the server binary is absent, and fails
instead under CI.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, missing_dependency


def _postgres_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.insert(0, str(Path(os.path.realpath(on_path)).parent))
    for directory in candidates:
        if (Path(directory) / "initdb").exists() and (Path(directory) / "postgres").exists():
            return Path(directory)
    return None


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"server did not listen on {port} within {timeout_s} s: {log.read_text(errors='replace')}"
    )


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A throw-away PostgreSQL server (trust auth, fsync off) for this test session."""
    bindir = _postgres_bindir()
    if bindir is None:
        missing_dependency("PostgreSQL server binaries (initdb, postgres) not found: apt install postgresql")
    run_as: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-pg-"))
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            missing_dependency("running as root and there is no 'postgres' user to run the server as")
        os.chown(workdir, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, log = workdir / "data", workdir / "server.log"
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "etl",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                *run_as,
                *(str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, process, log)
        # Listening is not accepting queries yet: wait for the startup to finish.
        for _ in range(300):
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "etl"],
                capture_output=True,
            )
            if ready.returncode == 0:
                break
            time.sleep(0.05)
        yield f"postgresql://etl@127.0.0.1:{port}/postgres"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A throw-away Redis server without persistence for this test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing_dependency("redis-server not found: apt-get install redis-server")
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-redis-"))
    log = workdir / "server.log"
    port = free_port()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_port(port, process, log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
