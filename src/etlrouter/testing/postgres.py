"""A throw-away PostgreSQL server from Debian's binaries, for the connector tests and benchmarks/e2e.py.

Trust auth, fsync off, its data in a temporary directory that goes with it. Run as the `postgres` user
when the caller is root (initdb and postgres refuse to run as root).
"""

from __future__ import annotations

import contextlib
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


class PostgresUnavailableError(RuntimeError):
    """The server cannot run here; the message says what to install."""


def postgres_bindir() -> Path | None:
    """The directory with initdb and postgres: the one on PATH first, else the newest Debian version."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.insert(0, str(Path(os.path.realpath(on_path)).parent))
    for directory in candidates:
        if (Path(directory) / "initdb").exists() and (Path(directory) / "postgres").exists():
            return Path(directory)
    return None


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 30.0) -> None:
    """Until a server process listens on `port`; its log in the error when it exits or never does."""
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


@contextlib.contextmanager
def throwaway_postgres(port: int) -> Iterator[str]:
    """Start a server on 127.0.0.1:`port`; yields its DSN (user `etl`, database `postgres`).

    Raises PostgresUnavailableError when the binaries (or, as root, the `postgres` user) are missing."""
    bindir = postgres_bindir()
    if bindir is None:
        raise PostgresUnavailableError(
            "PostgreSQL server binaries (initdb, postgres) not found: apt install postgresql"
        )
    run_as: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-pg-"))
    try:
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailableError(
                    "running as root and there is no 'postgres' user to run the server as"
                ) from None
            os.chown(workdir, user.pw_uid, user.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        data, log = workdir / "data", workdir / "server.log"
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "etl", "-A", "trust", "-E", "UTF8"]
        subprocess.run([*run_as, *initdb, "--no-sync"], check=True, capture_output=True)
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
            wait_for_port(port, process, log)
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
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
