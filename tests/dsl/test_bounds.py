"""The DSL's work and output stay bounded on pathological input: at most MAX_ERRORS diagnostics (and a
count of the rest), long source lines cut to a window around the column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from etlrouter.dsl import MAX_ERRORS, DslErrors, compile, validate
from etlrouter.dsl.errors import ELLIPSIS, EXCERPT_WIDTH, excerpt


def test_diagnostics_stop_at_the_cap_and_count_the_rest() -> None:
    text = "pipeline p { source a | @ }\n" * 250
    errors = validate(text, "many.etl")
    assert len(errors) == MAX_ERRORS
    assert errors.omitted == 150
    assert errors.more_line() == f"{ELLIPSIS} and 150 more errors"
    # The first ones in source order are the ones kept.
    assert [e.line for e in errors] == list(range(1, MAX_ERRORS + 1))
    assert errors[0].render().startswith("many.etl:1:25: error: unexpected character `@`")


def test_compile_error_says_how_many_more() -> None:
    with pytest.raises(DslErrors) as info:
        compile("pipeline p { source a | @ }\n" * (MAX_ERRORS + 1), "f.etl")
    assert len(info.value.errors) == MAX_ERRORS
    assert str(info.value).endswith(f"{ELLIPSIS} and 1 more error")
    assert str(info.value.args[0]) == f"{MAX_ERRORS + 1} errors in pipeline definitions"


def test_no_more_line_under_the_cap() -> None:
    errors = validate("pipeline p { source a | @ }\n", "one.etl")
    assert len(errors) == 1 and errors.omitted == 0 and errors.more_line() == ""


def test_long_line_is_cut_around_the_column() -> None:
    line = "pipeline p { source a | " + "x" * 5000 + " @ " + "y" * 5000 + " }"
    (error,) = [e for e in validate(line, "long.etl") if "`@`" in e.message]
    assert (error.line, error.col) == (1, 5026)
    _, shown, caret = error.render().split("\n")
    gutter = shown.index("| ") + 2
    assert shown[gutter:].startswith(ELLIPSIS) and shown.endswith(ELLIPSIS)
    assert len(shown[gutter:]) == EXCERPT_WIDTH + 2
    assert shown[caret.index("^")] == "@"


@pytest.mark.parametrize(
    ("col", "starts_cut", "ends_cut"), [(1, False, True), (500, True, True), (1000, True, False)]
)
def test_excerpt_window(col: int, starts_cut: bool, ends_cut: bool) -> None:
    line = "".join(chr(ord("a") + i % 26) for i in range(1000))
    shown, shown_col = excerpt(line, col)
    assert shown.startswith(ELLIPSIS) is starts_cut and shown.endswith(ELLIPSIS) is ends_cut
    assert shown[shown_col - 1] == line[col - 1]
    assert excerpt("short\tline", 3) == ("short line", 3)


def test_runs_of_bad_characters_are_one_error_each() -> None:
    # `.` and `-` start tokens only as `..` and a negative number; elsewhere they are bad characters.
    messages = [
        e.message for e in validate("pipeline p { source a (x = -5, y = 1..2) | sink b }\n@.-!.. ~", "b.etl")
    ]
    unexpected = [m for m in messages if m.startswith("unexpected")]
    assert unexpected == ["unexpected characters `@.-!`", "unexpected character `~`"]


def test_ctl_validate_output_is_bounded(tmp_path: Path) -> None:
    bad = tmp_path / "noise.etl"
    bad.write_text("{]!@$%^&*" * 100_000)  # one 900 KB line of punctuation
    result = subprocess.run(
        [sys.executable, "-m", "etlrouter", "ctl", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr) < 100_000
    assert result.stderr.count(": error: ") == MAX_ERRORS
    assert result.stderr.rstrip().splitlines()[-1].startswith(f"{ELLIPSIS} and ")
    assert result.stderr.rstrip().endswith("more errors")


def test_parse_errors_are_capped_and_counted_too() -> None:
    errors = validate("pipeline p { source a | }\n" * 150, "p.etl")
    assert len(errors) == MAX_ERRORS and errors.omitted == 50
    assert all(e.message == errors[0].message for e in errors)
    # An echo of a lexical error on the same line is neither kept nor counted.
    mixed = validate("pipeline p { source a | @ }\n" * 60 + "pipeline q { source a | }\n" * 60, "m.etl")
    assert len(mixed) == MAX_ERRORS and mixed.omitted == 20
    assert [e.line for e in mixed] == list(range(1, MAX_ERRORS + 1))


def test_precheck_leaves_the_registry_to_the_state_machine_but_reports_it_with_other_errors() -> None:
    """A document that only names an unregistered service passes the pre-check (its registration may be
    in the log just ahead of the apply); one that is invalid anyway gets every problem, services included."""
    from etlrouter.dsl import StaticRegistry, precheck

    registry = StaticRegistry({"orders": "source"})
    unknown_sink = "pipeline p { source orders | sink warehouse }\n"
    assert list(precheck(unknown_sink, "p.etl", registry)) == []
    broken = "pipeline p { source orders | sink warehouse (flush = maybe) }\n"
    messages = [e.message for e in precheck(broken, "p.etl", registry)]
    assert any("unknown sink `warehouse`" in m for m in messages) and len(messages) >= 2
