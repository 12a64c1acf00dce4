"""Services that break one rule each fail exactly that check, and the same services unbroken pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from etlrouter.conformance.checks import Options
from etlrouter.conformance.model import Report, Status
from etlrouter.conformance.runner import run_conformance
from tests.conformance import contract
from tests.conformance.grpclib_services import serve

KINDS = ("source", "transform", "sink", "lookup")


def options(kind: str, tmp_path: Path, **kw: object) -> Options:
    extra: dict[str, object] = {}
    if kind == "sink":
        extra["verify_command"] = contract.verify_command(tmp_path / "sink.jsonl")
    if kind == "lookup":
        extra["keys"] = list(contract.TABLE)
    return Options(timeout_s=contract.TIMEOUT_S, slack_s=1.0, **{**extra, **kw})  # type: ignore[arg-type]


def failed(report: Report) -> list[str]:
    return [r.check for r in report.results if r.status is Status.FAIL]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_unbroken_service_passes_every_check(kind: str, tmp_path: Path) -> None:
    async with serve(kind, (), tmp_path) as (address, _):
        report = await run_conformance(address, options(kind, tmp_path))
    assert report.kinds == [kind]
    assert failed(report) == [], report.results
    assert not [r for r in report.results if r.status is Status.WARN]
    assert report.exit_code == 0
    checks = {r.check for r in report.results}
    assert {"reflection", "health", f"{kind}.capabilities", f"{kind}.cancellation", "deadlines"} <= checks


BROKEN = [
    *[("source", rule, f"source.{rule}") for rule in contract.SOURCE_RULES],
    ("source", "cancellation", "source.cancellation"),
    *[("transform", rule, f"transform.{rule}") for rule in contract.TRANSFORM_RULES],
    *[("sink", rule, f"sink.{rule}") for rule in contract.SINK_RULES],
    ("lookup", "agree", "lookup.agree"),
    ("lookup", "missing", "lookup.missing"),
    ("lookup", "deadlines", "deadlines"),
    *[(kind, "capabilities", f"{kind}.capabilities") for kind in KINDS],
    ("sink", "health", "health"),
    ("source", "health", "health"),
]


@pytest.mark.parametrize(("kind", "rule", "check"), BROKEN, ids=[f"{k}-{r}" for k, r, _ in BROKEN])
async def test_a_broken_rule_fails_its_check_only(kind: str, rule: str, check: str, tmp_path: Path) -> None:
    async with serve(kind, {rule}, tmp_path) as (address, _):
        report = await run_conformance(address, options(kind, tmp_path))
    assert failed(report) == [check], [r for r in report.results if r.status is not Status.PASS]
    assert report.exit_code == 1


async def test_without_reflection_only_reflection_fails_when_the_kind_is_given(tmp_path: Path) -> None:
    async with serve("sink", {"reflection"}, tmp_path) as (address, _):
        report = await run_conformance(address, options("sink", tmp_path, kinds=("sink",)))
        assert failed(report) == ["reflection"]
        assert report.exit_code == 1
        bare = await run_conformance(address, options("sink", tmp_path))
    # Without --kind the kit cannot know what to check: it says so, and the run fails.
    assert failed(bare) == ["reflection"]
    assert [r.check for r in bare.results if r.status is Status.SKIP] == ["kinds"]
