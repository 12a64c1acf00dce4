"""Hostile input: the front end must answer with DslErrors (or a result), never crash."""

from __future__ import annotations

from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etlrouter.dsl import (
    DslError,
    DslErrors,
    MergedDag,
    Pipeline,
    StaticRegistry,
    compile,
    optimize,
    validate,
)

SHOWCASE = (Path(__file__).parent / "golden" / "showcase.etl").read_text(encoding="utf-8")
REGISTRY = StaticRegistry({"kafka-orders": "source", "filter-valid": "transform", "clickhouse": "sink"})

# Fragments that steer random text into the parser's deeper states.
FRAGMENTS = [
    "config.big", "99999999999999999999999", "1e5", "0.1", "1.5KiB", "0s", "-5s",
    "pipeline", "p", "source", "transform", "lookup", "sink", "tee", "{", "}", "(", ")", "|", ",", ";",
    "=", "..", "true", "false", "block", "shed", "after", "batch_size", "parallelism", "key", "backoff",
    "timeout", "config.x", "on_branch_lag", '"s"', '"2s"', '"', "5", "-1", "1.5", "100ms", "1MiB", "9" * 30,
    "\n", " ", "#", "\\", "é", "\t", "\x00", "kafka-orders", "filter-valid", "clickhouse",
]  # fmt: skip


def assert_well_formed(errors: list[DslError], text: str) -> None:
    line_count = text.count("\n") + 1
    for error in errors:
        assert isinstance(error, DslError)
        assert 1 <= error.line <= line_count
        assert error.col >= 1
        assert error.render().startswith(f"fuzz.etl:{error.line}:{error.col}: error: ")


def compile_or_errors(text: str, registry: StaticRegistry | None = REGISTRY) -> None:
    errors = validate(text, "fuzz.etl", registry)
    assert_well_formed(errors, text)
    try:
        pipelines = compile(text, "fuzz.etl", registry)
    except DslErrors as failure:
        assert [error.render() for error in failure.errors] == [error.render() for error in errors]
        return
    assert errors == []
    dags = optimize(pipelines)
    # Whatever compiles must survive the trip through the replicated log.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(pipelines), type=list[Pipeline]) == pipelines
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(dags), type=list[MergedDag]) == dags


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_crashes(text: str) -> None:
    compile_or_errors(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(" ".join))
def test_random_token_soup_never_crashes(text: str) -> None:
    compile_or_errors(text)


@st.composite
def mutated_showcase(draw: st.DrawFn) -> str:
    text = SHOWCASE
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 12)))
        operation = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        if operation == "delete":
            text = text[:start] + text[end:]
        elif operation == "duplicate":
            text = text[:end] + text[start:end] + text[end:]
        else:
            filler = draw(st.sampled_from(FRAGMENTS) | st.text(max_size=3))
            text = text[:start] + filler + (text[end:] if operation == "replace" else text[start:])
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_showcase())
def test_mutated_valid_file_never_crashes(text: str) -> None:
    # No registry: many mutants still compile, so the optimizer gets exercised too.
    compile_or_errors(text, registry=None)


def test_deep_nesting_is_an_error_not_a_recursion_error() -> None:
    text = "pipeline p { source s | " + "tee { " * 5000 + "sink k" + " }" * 5000 + " }"
    errors = validate(text, "fuzz.etl")
    assert_well_formed(errors, text)
    assert any("nested more than" in error.message for error in errors)
    calls = "pipeline p { source s (x = " + "f(a = " * 5000 + "1" + ")" * 5000 + ") | sink k }"
    assert any("nested more than" in error.message for error in validate(calls, "fuzz.etl"))


def test_showcase_itself_compiles() -> None:
    assert validate(SHOWCASE, "fuzz.etl") == []
