"""Parser behaviour on valid input: tree shape, positions, values, comments, tees."""

from __future__ import annotations

import msgspec
import pytest

from etlrouter.dsl import Document, DslErrors, parse
from etlrouter.dsl.errors import SourcePos
from etlrouter.dsl.syntax import Stage, Tee, to_json


def only_stages(document: Document, index: int = 0) -> list[Stage]:
    steps = document.pipelines[index].chain.steps
    assert all(isinstance(step, Stage) for step in steps)
    return [step for step in steps if isinstance(step, Stage)]


def test_linear_pipeline_records_kinds_services_and_positions() -> None:
    text = "pipeline p {\n  source kafka-orders\n  | transform filter-valid\n  | sink s3\n}\n"
    document = parse(text, "p.etl")
    assert document.filename == "p.etl"
    [pipeline] = document.pipelines
    assert pipeline.name == "p"
    assert pipeline.name_pos == SourcePos(1, 10)
    stages = only_stages(document)
    assert [(stage.kind, stage.service) for stage in stages] == [
        ("source", "kafka-orders"),
        ("transform", "filter-valid"),
        ("sink", "s3"),
    ]
    assert [stage.pos for stage in stages] == [SourcePos(2, 3), SourcePos(3, 5), SourcePos(4, 5)]
    assert stages[1].service_pos == SourcePos(3, 15)


def test_whole_pipeline_on_one_line_and_comments_are_ignored() -> None:
    text = "# header\npipeline a { source s | sink t }  # trailing\n# done"
    stages = only_stages(parse(text))
    assert [stage.service for stage in stages] == ["s", "t"]


@pytest.mark.parametrize(
    ("written", "kind", "text"),
    [
        ('"hello \\"x\\""', "string", 'hello "x"'),
        ("42", "int", "42"),
        ("-7", "int", "-7"),
        ("100_000", "int", "100_000"),
        ("2.5", "float", "2.5"),
        ("true", "bool", "true"),
        ("false", "bool", "false"),
        ("250ms", "unit", "250ms"),
        ("1MiB", "unit", "1MiB"),
        ("earliest", "name", "earliest"),
    ],
)
def test_scalar_values_keep_kind_and_text(written: str, kind: str, text: str) -> None:
    document = parse(f"pipeline p {{ source s (v = {written}) | sink t }}")
    [option] = only_stages(document)[0].options
    assert (option.name, option.value.kind, option.value.text) == ("v", kind, text)
    assert option.value.pos == SourcePos(1, 28)


def test_range_and_call_values() -> None:
    text = 'pipeline p { source s (backoff = 100ms..5s) | sink t\n on_branch_lag = shed(after = "30s") }'
    document = parse(text)
    backoff = only_stages(document)[0].options[0].value
    assert backoff.kind == "range"
    assert backoff.low is not None and backoff.high is not None
    assert (backoff.low.text, backoff.high.text) == ("100ms", "5s")
    [setting] = document.pipelines[0].settings
    assert setting.name == "on_branch_lag"
    assert setting.value.kind == "call"
    assert setting.value.text == "shed"
    assert [(arg.name, arg.value.text) for arg in setting.value.args] == [("after", "30s")]


def test_trailing_comma_in_options_is_allowed() -> None:
    document = parse("pipeline p { source s (a = 1, b = 2,) | sink t }")
    assert [option.name for option in only_stages(document)[0].options] == ["a", "b"]


def test_dotted_config_option_names() -> None:
    document = parse('pipeline p { source s (config.topic = "orders") | sink t }')
    assert only_stages(document)[0].options[0].name == "config.topic"


def test_tee_branches_nest() -> None:
    text = """
    pipeline p {
      source s | tee {
        sink a
        transform x | tee { sink b; sink c }
      }
    }"""
    steps = parse(text).pipelines[0].chain.steps
    assert isinstance(steps[0], Stage)
    tee = steps[1]
    assert isinstance(tee, Tee)
    assert len(tee.branches) == 2
    inner = tee.branches[1].steps[1]
    assert isinstance(inner, Tee)
    assert [branch.steps[0] for branch in inner.branches] == [
        Stage(kind="sink", service="b", options=(), pos=SourcePos(5, 29), service_pos=SourcePos(5, 34)),
        Stage(kind="sink", service="c", options=(), pos=SourcePos(5, 37), service_pos=SourcePos(5, 42)),
    ]


def test_several_pipelines_parse_in_order() -> None:
    text = "pipeline a { source s | sink t } pipeline b { source s | sink u }"
    assert [pipeline.name for pipeline in parse(text).pipelines] == ["a", "b"]


def test_empty_file_has_no_pipelines() -> None:
    assert parse("  # nothing here\n").pipelines == ()


def test_syntax_errors_raise_dsl_errors_with_every_broken_pipeline() -> None:
    text = "pipeline a { source s sink t }\npipeline ok { source s | sink t }\npipeline b { source }\n"
    with pytest.raises(DslErrors) as caught:
        parse(text, "x.etl")
    assert [(error.line, error.col) for error in caught.value.errors] == [(1, 23), (3, 21)]


def test_ast_json_round_trips(example_text: str) -> None:
    document = parse(example_text, "examples/pipelines.etl")
    decoded = msgspec.json.decode(to_json(document, include_text=True), type=Document)
    assert decoded == document
