"""The filter/map expression language: semantics, and errors that name the column."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from etlrouter.connectors.expr import (
    EvaluationError,
    ExpressionError,
    compile_evaluator,
    compile_predicate,
    compile_program,
)
from etlrouter.sdk import Record


def rec(value: Any, **headers: str) -> Record:
    return Record(b"k-1", msgspec.json.encode(value), headers, 1_000, 5)


ORDER = {"amount": 12.5, "country": "de", "tags": ["a", "b"], "nested": {"x": {"y": 3}}, "flag": True}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("value.amount > 10", True),
        ("value.amount > 10 and headers.country == 'DE'", True),
        ("value.amount > 20 or headers.country == 'FR'", False),
        ("not value.amount > 20", True),
        ("value.amount * 2 == 25", True),
        ("value.amount - 2.5 == 10", True),
        ("7 % 4 == 3 and 1 + 2 * 3 == 7 and (1 + 2) * 3 == 9", True),
        ("-value.nested.x.y == -3", True),
        ("value.nested.x.y >= 3 and value.nested['x'].y <= 3", True),
        ("value.tags[1] == 'b' and value.tags[5] == null", True),
        ("'a' in value.tags and 'z' not in value.tags", True),
        ("value.country in ['de', 'fr']", True),
        ("'e' in value.country", True),
        ("upper(value.country) == headers.country", True),
        ("len(value.tags) == 2 and len(value.missing) == 0", True),
        ("value.missing > 1", False),  # a missing field satisfies no ordering
        ("value.missing == null and not exists(value.missing)", True),
        ("exists(value.flag) and value.flag == true and value.flag != 1", True),
        ("key == 'k-1' and offset == 5 and event_time_ms == 1000", True),
        ("startswith(key, 'k-') and endswith(value.country, 'e') and contains(value.country, 'd')", True),
        ("number('42') + 1 == 43 and str(value.amount) == '12.5' and str(3.0) == '3'", True),
        ("value.amount.deeper == null", True),  # reading through a non-container is null
        ('"tab\\tand \\"quote\\"" == "tab\tand \\"quote\\""', True),
        ("headers['country'] == 'DE' and headers.absent == null", True),
        ("'b' < 'c' and value.amount <= 12.5", True),
    ],
)
def test_predicate_semantics(expression: str, expected: bool) -> None:
    assert compile_predicate(expression)(rec(ORDER, country="DE")) is expected


@pytest.mark.parametrize(
    ("expression", "column", "reason"),
    [
        ("value.amount >", 15, "expected a value after '>', found end of input"),
        ("value.amount > > 3", 16, "expected a value, found '>'"),
        ("amount > 10", 1, "unknown name 'amount'"),
        ("value.amount > 10 and", 22, "expected a value, found end of input"),
        ("value.amount > 10 10", 19, "unexpected '10' after a complete expression"),
        ("(value.amount > 10", 19, "expected ')', found end of input"),
        ("value.tags[0", 13, "expected ']', found end of input"),
        ("value. > 3", 8, "expected a field name after '.', found '>'"),
        ("headers.country == 'DE", 20, "unterminated string"),
        ("value.amount > 10 & true", 19, "unexpected character '&'"),
        ("shout(value.x)", 1, "unknown function 'shout'"),
        ("lower(value.x, 2)", 1, "lower() takes 1 argument(s), got 2"),
        ("value.amount > 1.2.3", 16, "malformed number '1.2.3'"),
        ("'a\\q'", 3, "unknown escape in string"),
        ("", 1, "empty expression"),
    ],
)
def test_parse_errors_name_the_column(expression: str, column: int, reason: str) -> None:
    with pytest.raises(ExpressionError) as err:
        compile_predicate(expression)
    assert err.value.column == column
    assert reason in err.value.reason
    assert str(err.value).startswith(f"column {column}: ")
    assert repr(expression) in str(err.value)


@pytest.mark.parametrize(
    ("expression", "value", "message"),
    [
        ("value.country > 3", ORDER, "column 15: cannot compare string > number"),
        ("value.amount + 'x' == 1", ORDER, "column 14: cannot apply + to number and string"),
        ("value.amount / 0 == 1", ORDER, "column 14: division by zero"),
        ("upper(value.amount) == 'X'", ORDER, "column 1: upper() needs a string, not number"),
        ("3 in value.amount", ORDER, "column 3: 'in' needs a list, string or object, not number"),
    ],
)
def test_evaluation_errors_name_the_column(expression: str, value: Any, message: str) -> None:
    with pytest.raises(EvaluationError, match=re.escape(message)):
        compile_predicate(expression)(rec(value))


def test_a_value_that_is_not_json_is_an_evaluation_error() -> None:
    with pytest.raises(EvaluationError, match="value is not valid JSON"):
        compile_predicate("value.a == 1")(Record(value=b"{not json"))
    # An expression that never reads the value does not need it to be JSON.
    assert compile_predicate("offset == 0")(Record(value=b"{not json"))


def test_evaluator_returns_values() -> None:
    assert compile_evaluator("value.amount * 2")(rec(ORDER)) == 25.0
    assert compile_evaluator("[value.country, len(value.tags)]")(rec(ORDER)) == ["de", 2]


def test_map_program_sets_and_removes_fields_headers_key_and_time() -> None:
    program = compile_program(
        "value.total = value.amount * 2; value.meta.source = 'gen'; del value.tags; "
        "headers.country = upper(value.country); del headers.debug; headers.n = value.nested.x.y; "
        "key = value.country + '-' + str(offset); event_time_ms = event_time_ms + 5;"
    )
    original = rec(ORDER, debug="1", keep="yes")
    out = program(original)
    value = msgspec.json.decode(out.value)
    assert value["total"] == 25.0 and value["meta"] == {"source": "gen"} and "tags" not in value
    assert value["nested"] == ORDER["nested"]
    assert out.headers == {"keep": "yes", "country": "DE", "n": "3"}
    assert (out.key, out.event_time_ms, out.offset) == (b"de-5", 1_005, 5)
    assert original.headers == {"debug": "1", "keep": "yes"}  # the input record is not mutated


def test_map_statements_see_earlier_assignments_and_null_removes_a_header() -> None:
    out = compile_program("value.a = 1; value.b = value.a + 1; headers.x = null")(rec({}, x="1"))
    assert msgspec.json.decode(out.value) == {"a": 1, "b": 2}
    assert out.headers == {}


def test_map_that_only_touches_headers_keeps_the_value_bytes() -> None:
    raw = b'{ "spacing" :  "kept" }'
    out = compile_program("headers.seen = 'yes'")(Record(value=raw))
    assert out.value == raw


def test_map_replaces_the_whole_value() -> None:
    out = compile_program("value = [value.a, value.b]")(rec({"a": 1, "b": "x"}))
    assert msgspec.json.decode(out.value) == [1, "x"]


@pytest.mark.parametrize(
    ("program", "column", "reason"),
    [
        ("value.a = ", 11, "expected a value after '=', found end of input"),
        ("value.a == 1", 9, "expected '=' after the target"),
        ("offset = 3", 1, "expected a target"),
        ("del key", 5, "cannot delete key"),
        ("headers = 'x'", 1, "a header target is headers.NAME"),
        ("key.x = 1", 1, "key has no fields"),
        ("value.a = 1; ; value.b = 2", 14, "expected a target"),
    ],
)
def test_map_parse_errors_name_the_column(program: str, column: int, reason: str) -> None:
    with pytest.raises(ExpressionError) as err:
        compile_program(program)
    assert (err.value.column, reason in err.value.reason) == (column, True), str(err.value)


def test_map_evaluation_errors() -> None:
    with pytest.raises(EvaluationError, match="column 1: cannot set 'a' on list"):
        compile_program("value.a = 1")(rec([1, 2]))
    with pytest.raises(EvaluationError, match="event_time_ms needs a number, got string"):
        compile_program("event_time_ms = 'soon'")(rec({}))
