"""Fixtures of the system tests: a running router cluster with a place for processes, and (shared with
the connector tests) a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.connectors.conftest import postgres_dsn
from tests.e2e.processes import Processes
from tests.integration.cluster import RouterProcesses

__all__ = ["postgres_dsn", "system"]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[RouterProcesses, Processes, Path]]:
    """A 3-node router cluster (fsync off) that is ready, and a `Processes` for the test's own children;
    everything is stopped afterwards, children first."""
    routers = RouterProcesses(tmp_path / "routers", fsync=False)
    procs = Processes(tmp_path / "procs")
    routers.start_all()
    try:
        routers.wait_ready()
        yield routers, procs, tmp_path
    finally:
        procs.stop_all()
        routers.stop_all()
