"""A table of broken inputs: each must produce an error at the right line and column, with a
message naming the problem, a caret under the spot and, where one makes sense, a hint."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from etlrouter.dsl import DslError, StaticRegistry, validate
from etlrouter.dsl.errors import ELLIPSIS, EXCERPT_WIDTH


@dataclass(frozen=True)
class Bad:
    id: str
    text: str
    line: int
    col: int
    message: str  # a substring of the error message
    hint: str | None = None  # a substring of the hint, when one is expected
    registry: StaticRegistry | None = None


REGISTRY = StaticRegistry(
    {
        "kafka-orders": "source",
        "filter-valid": "transform",
        "enrich-users": "lookup",
        "s3-archive": "sink",
        "clickhouse": "sink",
    }
)


def nth_column(text: str, word: str, occurrence: int) -> int:
    """1-based column of the n-th occurrence of `word` on a one-line text."""
    index = -1
    for _ in range(occurrence):
        index = text.index(word, index + 1)
    return index + 1


DEEP_TEES = "pipeline p { source a" + " | tee { transform t" * 20 + " }" * 20 + " }"

CASES = [
    Bad(
        "missing pipe", "pipeline p {\n  source a\n  transform b | sink c }", 3, 3, "expected `|` before", "|"
    ),
    Bad("misspelled pipeline", "pipline p { source a | sink b }", 1, 1, "expected `pipeline`", "`pipeline`"),
    Bad(
        "misspelled kind",
        "pipeline p { source a | trasform b | sink c }",
        1,
        25,
        "expected a stage",
        "`transform`",
    ),
    Bad(
        "bare service",
        "pipeline p { source a | filter | sink c }",
        1,
        25,
        "expected a stage",
        "transform filter",
    ),
    Bad(
        "quoted service",
        'pipeline p { source "a" | sink c }',
        1,
        21,
        "expected a service name",
        "without quotes",
    ),
    Bad("keyword as name", "pipeline p { source sink | sink c }", 1, 21, "found keyword `sink`", "reserved"),
    Bad(
        "missing equals",
        "pipeline p { source a (batch_size 5) | sink c }",
        1,
        35,
        "expected `=`",
        "batch_size =",
    ),
    Bad(
        "missing comma",
        "pipeline p { source a (batch_size = 5 linger = 1s) | sink c }",
        1,
        39,
        "expected `,`",
        "`,`",
    ),
    Bad(
        "unterminated string",
        'pipeline p {\n source a (config.x = "oops) | sink c }',
        2,
        23,
        "unterminated string",
        '"',
    ),
    Bad("bad character", "pipeline p { source a | sink c } $", 1, 34, "unexpected character `$`"),
    Bad(
        "run of bad characters",
        "pipeline p {\n source a | sink c @@@ }",
        2,
        20,
        "unexpected characters `@@@`",
    ),
    Bad(
        "setting before the stages",
        "pipeline p { on_branch_lag = block source a | sink c }",
        1,
        14,
        "expected a stage",
        "go after the stages",
    ),
    Bad(
        "setting without equals",
        "pipeline p { source a | sink c on_branch_lag block }",
        1,
        32,
        "expected `|`, a setting or `}`",
        "`on_branch_lag = value`",
    ),
    Bad(
        "config int beyond 64 bits",
        "pipeline p { source a (config.n = 99999999999999999999) | sink c }",
        1,
        35,
        "out of the 64-bit integer range",
        "string",
    ),
    Bad("unclosed pipeline", "pipeline p { source a | sink c", 1, 31, "found end of file"),
    Bad(
        "tee not last",
        "pipeline p { source a | tee { sink b } | sink c }",
        1,
        40,
        "nothing may follow a tee",
        "inside",
    ),
    Bad("empty tee", "pipeline p { source a | tee { } }", 1, 31, "at least one branch", "tee {"),
    Bad("no source", "pipeline p { transform a | sink c }", 1, 14, "must start with a source", "source NAME"),
    Bad("second source", "pipeline p { source a | source b | sink c }", 1, 25, "can only be the first stage"),
    Bad("no sink", "pipeline p {\n source a\n | transform b\n}", 3, 4, "without a sink", "| sink NAME"),
    Bad(
        "sink feeds transform",
        "pipeline p { source a | sink b | transform c | sink d }",
        1,
        34,
        "cannot feed",
        "tee",
    ),
    Bad(
        "duplicate pipeline",
        "pipeline p { source a | sink b }\npipeline p { source a | sink c }",
        2,
        10,
        "duplicate pipeline name `p` (first defined at 1:10)",
        "unique",
    ),
    Bad(
        "unknown option",
        "pipeline p { source a | transform b (paralelism = 2) | sink c }",
        1,
        38,
        "unknown option",
        "`parallelism`",
    ),
    Bad(
        "option of other kind",
        "pipeline p { source a | transform b (flush = true) | sink c }",
        1,
        38,
        "unknown option `flush`",
        "sinks only",
    ),
    Bad(
        "wrong type", 'pipeline p { source a (batch_size = "500") | sink c }', 1, 37, "takes an integer", None
    ),
    Bad(
        "batch_size too big",
        "pipeline p { source a (batch_size = 100001) | sink c }",
        1,
        37,
        "at most 100000",
    ),
    Bad(
        "parallelism zero",
        "pipeline p { source a | transform b (parallelism = 0) | sink c }",
        1,
        52,
        "at least 1",
    ),
    Bad(
        "retries too many",
        "pipeline p { source a | transform b (retries = 101) | sink c }",
        1,
        48,
        "at most 100",
    ),
    Bad(
        "duration without unit",
        "pipeline p { source a | transform b (timeout = 5) | sink c }",
        1,
        48,
        "needs a unit",
        "`5s`",
    ),
    Bad(
        "bad duration unit",
        "pipeline p { source a | transform b (timeout = 5sec) | sink c }",
        1,
        48,
        "unknown duration unit",
        "`s`",
    ),
    Bad(
        "size unit on duration",
        "pipeline p { source a | transform b (timeout = 5MiB) | sink c }",
        1,
        48,
        "unknown duration unit",
        "size unit",
    ),
    Bad(
        "zero duration",
        'pipeline p { source a | transform b (timeout = "0s") | sink c }',
        1,
        48,
        "at least 1ms",
    ),
    Bad(
        "backwards backoff",
        "pipeline p { source a | transform b (backoff = 5s..100ms) | sink c }",
        1,
        48,
        "runs backwards",
        "100ms..5s",
    ),
    Bad(
        "bad size unit",
        "pipeline p { source a | sink c (batch_bytes = 1MIB) }",
        1,
        47,
        "unknown size unit",
        "`MiB`",
    ),
    Bad(
        "bad choice",
        "pipeline p { source a (start = earlist) | sink c }",
        1,
        32,
        "must be one of",
        "`earliest`",
    ),
    Bad(
        "duplicate option",
        "pipeline p { source a (linger = 1s, linger = 2s) | sink c }",
        1,
        37,
        "given twice (first at 1:24)",
    ),
    Bad(
        "lookup without key",
        "pipeline p { source a | lookup users | sink c }",
        1,
        32,
        "needs the option `key`",
        "key =",
    ),
    Bad(
        "unknown setting",
        "pipeline p { source a | sink c\n on_branch_lagg = block }",
        2,
        2,
        "unknown pipeline setting",
        "`on_branch_lag`",
    ),
    Bad(
        "shed without after",
        "pipeline p { source a | sink c\n on_branch_lag = shed }",
        2,
        18,
        "needs to know how long",
        "after",
    ),
    Bad(
        "bad policy",
        "pipeline p { source a | sink c\n on_branch_lag = blok }",
        2,
        18,
        "must be `block` or `shed",
        "`block`",
    ),
    Bad(
        "bad shed argument",
        "pipeline p { source a | sink c\n on_branch_lag = shed(afer = 1s) }",
        2,
        23,
        "unknown argument",
        "`after`",
    ),
    Bad(
        "kind clash",
        "pipeline p { source a | sink b }\npipeline q { source b | sink c }",
        2,
        21,
        "used as a source here but as a sink at 1:25",
        "one kind",
    ),
    Bad(
        "cycle",
        "pipeline p { source a | transform b | transform x | transform b | sink c }",
        1,
        63,
        "appears twice on one path (first at 1:25)",
        "loop",
    ),
    Bad(
        "duplicate branch",
        "pipeline p { source a | tee { sink b; sink b } }",
        1,
        39,
        "two identical branches",
        "remove",
    ),
    Bad(
        "config needs plain value",
        "pipeline p { source a (config.x = f(y = 1)) | sink c }",
        1,
        35,
        "must be a plain value",
    ),
    Bad(
        "unknown service",
        "pipeline p { source kafka-orders | transform filter-vaild | sink s3-archive }",
        1,
        46,
        "unknown transform `filter-vaild`",
        "`filter-valid`",
        REGISTRY,
    ),
    Bad(
        "registered kind mismatch",
        "pipeline p { source kafka-orders | transform clickhouse | sink s3-archive }",
        1,
        46,
        "registered as a sink, not a transform",
        "sink clickhouse",
        REGISTRY,
    ),
    Bad(
        "malformed number", "pipeline p { source a (batch_size = 1__0) | sink c }", 1, 37, "malformed number"
    ),
    Bad(
        "unknown escape",
        'pipeline p { source a (config.x = "a\\q") | sink c }',
        1,
        37,
        "unknown escape",
        "allowed escapes",
    ),
    Bad("too deeply nested tee", DEEP_TEES, 1, nth_column(DEEP_TEES, "tee", 17), "nested more than 16 deep"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_reports_line_column_and_hint(case: Bad) -> None:
    errors = validate(case.text, "bad.etl", case.registry)
    assert errors, f"{case.id}: expected an error"
    matching = [error for error in errors if case.message in error.message]
    assert matching, f"{case.id}: no error mentions {case.message!r}; got {[e.message for e in errors]}"
    error = matching[0]
    assert (error.line, error.col) == (case.line, case.col), error.render()
    rendered = error.render()
    assert rendered.startswith(f"bad.etl:{case.line}:{case.col}: error: ")
    assert_caret_under_column(error)
    if case.hint is not None:
        assert error.hint is not None and case.hint in error.hint, rendered
        assert rendered.endswith(f"hint: {error.hint}")


def assert_caret_under_column(error: DslError) -> None:
    """The caret line must point at `col` of the echoed source line."""
    lines = error.render().split("\n")
    source_line, caret_line = lines[1], lines[2]
    gutter = source_line.index("| ") + 2
    shown, full = source_line[gutter:], error.source_line.replace("\t", " ")
    caret = caret_line.index("^") - gutter
    if len(full) <= EXCERPT_WIDTH:
        assert shown == full
        assert caret == error.col - 1
    else:  # a window of the line around the column, cut sides marked with an ellipsis
        assert shown.strip(ELLIPSIS) in full and len(shown.strip(ELLIPSIS)) == EXCERPT_WIDTH
        assert shown[caret] == full[error.col - 1]


def test_table_is_large_enough_and_cases_are_distinct() -> None:
    assert len(CASES) >= 20
    assert len({case.text for case in CASES}) == len(CASES)


def test_errors_in_several_pipelines_are_all_reported_in_order() -> None:
    text = (
        "pipeline a { source s | transform t (retries = -1) | sink k }\n"
        "pipeline b { source s | sink k (flush = 3) }\n"
        "pipeline c { source s | sink k (flush = true) }\n"
        "pipeline d { source s sink k }\n"
    )
    errors = validate(text, "multi.etl")
    assert [(error.line, error.col) for error in errors] == [(1, 48), (2, 41), (4, 23)]


def test_dsl_errors_renders_every_error() -> None:
    from etlrouter.dsl import DslErrors, compile

    with pytest.raises(DslErrors) as caught:
        compile("pipeline a { source s }\npipeline a { source s | sink k }", "two.etl")
    rendered = str(caught.value)
    assert "two.etl:1:14: error: branch ends at source `s` without a sink" in rendered
    assert "two.etl:2:10: error: duplicate pipeline name `a`" in rendered
