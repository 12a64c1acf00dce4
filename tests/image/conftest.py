"""A summary section for the image tests, so CI's terse output shows them passing (or why not)."""

from __future__ import annotations

import pytest

_outcomes: dict[str, tuple[str, float]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.nodeid.startswith("tests/image/"):
        return
    if report.when == "call" or report.outcome != "passed":
        name = report.nodeid.removeprefix("tests/image/")
        previous = _outcomes.get(name, ("passed", 0.0))
        outcome = report.outcome if previous[0] == "passed" else previous[0]
        _outcomes[name] = (outcome, previous[1] + report.duration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _outcomes:
        return
    terminalreporter.section("container image (tests/image)")
    for name, (outcome, seconds) in _outcomes.items():
        terminalreporter.write_line(f"{outcome.upper():8} {name} ({seconds:.1f} s)")
