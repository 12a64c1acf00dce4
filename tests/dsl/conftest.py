"""Shared fixtures for the DSL tests: golden files and the example pipelines."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def golden() -> Callable[[str, str], None]:
    """Compare text with tests/dsl/golden/<name>; UPDATE_GOLDEN=1 rewrites the file instead."""

    def compare(name: str, actual: str) -> None:
        path = GOLDEN_DIR / name
        if os.environ.get("UPDATE_GOLDEN") == "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual, encoding="utf-8")
            return
        assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1 to create it"
        expected = path.read_text(encoding="utf-8")
        assert actual == expected, f"{name} differs from its golden file; UPDATE_GOLDEN=1 regenerates it"

    return compare


@pytest.fixture
def example_text() -> str:
    return (EXAMPLES_DIR / "pipelines.etl").read_text(encoding="utf-8")
