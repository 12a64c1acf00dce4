from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from etlrouter.testing.netns import missing_capability
from tests.conftest import missing_dependency
from tests.partition.system import NetnsSystem


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "partition: chaos schedules on routers and sidecars in network namespaces"
    )


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsSystem]:
    why = missing_capability()
    if why:
        missing_dependency(why)
    workdir: Path = tmp_path_factory.mktemp("partition")
    system = NetnsSystem(workdir)
    try:
        system.create()
        system.start()
        yield system
    finally:
        system.destroy()
