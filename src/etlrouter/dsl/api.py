"""One-call entry points: what the control plane, `etlrouter ctl` and tests use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from etlrouter.dsl.checker import analyze
from etlrouter.dsl.errors import Diagnostics, DslErrors, capped
from etlrouter.dsl.explain import explain_dot, explain_mermaid, explain_tree
from etlrouter.dsl.model import MergedDag, Pipeline, Registry
from etlrouter.dsl.optimizer import optimize
from etlrouter.dsl.parser import parse_with_errors
from etlrouter.dsl.syntax import to_json

ExplainFormat = Literal["tree", "dot", "mermaid", "json", "ast"]
EXPLAIN_FORMATS: tuple[ExplainFormat, ...] = ("tree", "dot", "mermaid", "json", "ast")


def _compile_collecting(
    text: str, filename: str, registry: Registry | None
) -> tuple[list[Pipeline], Diagnostics]:
    document, syntax_errors = parse_with_errors(text, filename)
    pipelines, semantic_errors = analyze(document, registry)
    return pipelines, capped(syntax_errors, semantic_errors)


def validate(text: str, filename: str = "<input>", registry: Registry | None = None) -> Diagnostics:
    """Every syntax and semantic error in `text` (the first MAX_ERRORS, and a count of the rest); empty when
    it compiles. Never raises."""
    return _compile_collecting(text, filename, registry)[1]


def precheck(text: str, filename: str, registry: Registry) -> Diagnostics:
    """What the control plane checks before proposing a document: the errors that make it invalid
    whatever services are registered (none: propose it, and the state machine checks the services in log
    order, after registrations proposed before it); when there are such errors, the full report against
    `registry`, so the answer names every problem. Parses once (the costly part of a garbage file)."""
    document, syntax_errors = parse_with_errors(text, filename)
    _, semantic_errors = analyze(document, None)
    if not syntax_errors and not semantic_errors:
        return Diagnostics()
    _, semantic_errors = analyze(document, registry)
    return capped(syntax_errors, semantic_errors)


def compile(text: str, filename: str = "<input>", registry: Registry | None = None) -> list[Pipeline]:
    """Parse, check and normalize; raise `DslErrors` with every problem found."""
    pipelines, errors = _compile_collecting(text, filename, registry)
    if errors:
        raise DslErrors(errors)
    return pipelines


def dags_to_json(dags: Sequence[MergedDag]) -> bytes:
    return msgspec.json.format(msgspec.json.encode(list(dags)), indent=2)


def dags_from_json(data: bytes | str) -> list[MergedDag]:
    return msgspec.json.decode(data, type=list[MergedDag])


def explain(
    text: str, filename: str = "<input>", fmt: ExplainFormat = "tree", registry: Registry | None = None
) -> str:
    """Compile `text` and render the merged DAGs (or, for `ast`, the syntax tree) as `fmt`."""
    if fmt == "ast":
        document, errors = parse_with_errors(text, filename)
        if errors:
            raise DslErrors(errors)
        return to_json(document).decode() + "\n"
    dags = optimize(compile(text, filename, registry))
    if fmt == "tree":
        return explain_tree(dags)
    if fmt == "dot":
        return explain_dot(dags)
    if fmt == "mermaid":
        return explain_mermaid(dags)
    if fmt == "json":
        return dags_to_json(dags).decode() + "\n"
    raise ValueError(f"unknown explain format {fmt!r}; use one of {', '.join(EXPLAIN_FORMATS)}")


def validate_file(path: str | Path, registry: Registry | None = None) -> Diagnostics:
    """`validate` on a file (for `etlrouter ctl validate FILE`)."""
    file = Path(path)
    return validate(file.read_text(encoding="utf-8"), str(path), registry)


def explain_file(path: str | Path, fmt: ExplainFormat = "tree", registry: Registry | None = None) -> str:
    """`explain` on a file (for `etlrouter ctl explain FILE`); raises `DslErrors`."""
    file = Path(path)
    return explain(file.read_text(encoding="utf-8"), str(path), fmt, registry)
