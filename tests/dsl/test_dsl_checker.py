"""Checker behaviour on valid input: normalization into typed, versioned Pipeline specs."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from etlrouter.dsl import (
    BranchPolicy,
    DslErrors,
    Duration,
    DurationRange,
    Pipeline,
    Registry,
    Size,
    StageSpec,
    StaticRegistry,
    check,
    compile,
    parse,
    validate,
    validate_file,
)
from etlrouter.dsl.options import parse_duration_ms, parse_size_bytes

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.etl"))


def test_options_are_typed_and_sorted() -> None:
    [pipeline] = compile(
        "pipeline p {\n"
        '  source s (start = earliest, batch_size = 500, linger = "250ms")\n'
        "  | transform t (timeout = 2s, backoff = 100ms..5s, retries = 0, config.mode = fast)\n"
        "  | sink k (flush = true, batch_bytes = 1.5KiB, dlq = dead)\n"
        "  on_branch_lag = shed(after = 1m)\n"
        "}"
    )
    assert pipeline.source == StageSpec(
        kind="source",
        service="s",
        options={"batch_size": 500, "linger": Duration(250), "start": "earliest"},
    )
    transform, sink = pipeline.branches[0]
    assert list(transform.options) == ["backoff", "config.mode", "retries", "timeout"]
    assert transform.options["backoff"] == DurationRange(100, 5000)
    assert transform.options["timeout"] == Duration(2000)
    assert transform.options["config.mode"] == "fast"
    assert sink.options == {"batch_bytes": Size(1536), "dlq": "dead", "flush": True}
    assert pipeline.on_branch_lag == BranchPolicy(mode="shed", shed_after_ms=60_000)


def test_single_duration_backoff_is_a_constant_range() -> None:
    [pipeline] = compile('pipeline p { source s | transform t (backoff = "1s") | sink k }')
    assert pipeline.branches[0][0].options["backoff"] == DurationRange(1000, 1000)


def test_string_backoff_range_is_accepted() -> None:
    [pipeline] = compile('pipeline p { source s | transform t (backoff = "100ms..5s") | sink k }')
    assert pipeline.branches[0][0].options["backoff"] == DurationRange(100, 5000)


def test_tee_expands_into_one_branch_per_sink() -> None:
    [pipeline] = compile(
        "pipeline p { source s | transform a | tee { sink x; transform b | tee { sink y; sink z } } }"
    )
    assert [[stage.service for stage in branch] for branch in pipeline.branches] == [
        ["a", "x"],
        ["a", "b", "y"],
        ["a", "b", "z"],
    ]


def test_default_policy_is_block() -> None:
    [pipeline] = compile("pipeline p { source s | sink k }")
    assert pipeline.on_branch_lag == BranchPolicy(mode="block")


def test_pipeline_specs_round_trip_through_json_and_msgpack() -> None:
    pipelines = compile(
        "pipeline p { source s (batch_bytes = 1MiB) | transform t (backoff = 1s..2s, config.f = 1.5)"
        ' | sink k (flush = false) on_branch_lag = shed(after = "5s") }'
    )
    as_json = msgspec.json.decode(msgspec.json.encode(pipelines), type=list[Pipeline])
    as_msgpack = msgspec.msgpack.decode(msgspec.msgpack.encode(pipelines), type=list[Pipeline])
    assert as_json == pipelines
    assert as_msgpack == pipelines
    assert pipelines[0].format_version == 1


def test_registry_accepts_known_services_of_the_right_kind() -> None:
    registry = StaticRegistry({"s": "source", "t": "transform", "k": "sink"})
    assert isinstance(registry, Registry)
    assert compile("pipeline p { source s | transform t | sink k }", registry=registry)


def test_without_registry_unknown_services_are_fine() -> None:
    assert validate("pipeline p { source anything | sink whatever }") == []


def test_check_reports_only_semantic_errors_of_a_parsed_document() -> None:
    document = parse("pipeline p { source s | sink k (flush = 1) }")
    [error] = check(document)
    assert "`flush` takes `true` or `false`" in error.message


def test_one_pipeline_with_errors_does_not_hide_the_others() -> None:
    text = "pipeline bad { source s | sink k (flush = 1) }\npipeline good { source s | sink k }"
    with pytest.raises(DslErrors) as caught:
        compile(text)
    assert [error.line for error in caught.value.errors] == [1]


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1ms", 1), ("1.5s", 1500), ("0.3s", 300), ("2m", 120_000), ("1h", 3_600_000), ("1d", 86_400_000)],
)
def test_duration_parsing(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    ("text", "count"),
    [("1B", 1), ("1KB", 1000), ("1KiB", 1024), ("1.5MiB", 1_572_864), ("2GB", 2_000_000_000)],
)
def test_size_parsing(text: str, count: int) -> None:
    assert parse_size_bytes(text) == count


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_examples_are_valid(path: Path) -> None:
    assert validate_file(path) == []


def test_misspelled_required_option_is_reported_once() -> None:
    errors = validate('pipeline p { source s | lookup users (ky = "id") | sink k }')
    assert [error.message for error in errors] == ["unknown option `ky` for lookup `users`"]
    assert errors[0].hint == "did you mean `key`?"


def test_unknown_service_hint_prefers_services_of_the_same_kind() -> None:
    registry = StaticRegistry({"s": "source", "orders-sink": "sink", "orders-sync": "transform"})
    [error] = validate("pipeline p { source s | transform orders-snk | sink orders-sink }", registry=registry)
    assert error.message == "unknown transform `orders-snk`"
    assert error.hint == "did you mean `orders-sync`?"
