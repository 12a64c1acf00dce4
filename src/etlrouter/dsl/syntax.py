"""The syntax tree the parser produces: exactly what was written, with source positions.

Nothing here is validated or normalized yet (that is the checker's job), so the tree can represent a
sink feeding a transform or an option of the wrong type, and the checker can point at it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from etlrouter.dsl.errors import SourcePos

AST_FORMAT_VERSION = 1

ValueKind = Literal["string", "int", "float", "bool", "unit", "name", "call", "range"]
StageKind = Literal["source", "transform", "lookup", "sink"]
STAGE_KINDS: tuple[StageKind, ...] = ("source", "transform", "lookup", "sink")


class Value(msgspec.Struct, frozen=True, omit_defaults=True):
    """An option value as written.

    `text` is the literal's text (strings already unescaped), the name of a `name`, or the function
    of a `call` such as `shed(after = "30s")`, whose arguments are in `args`. A `range` such as
    `100ms..5s` keeps its ends in `low` and `high`.
    """

    kind: ValueKind
    text: str
    pos: SourcePos
    args: tuple[Option, ...] = ()
    low: Value | None = None
    high: Value | None = None


class Option(msgspec.Struct, frozen=True):
    """`name = value`, inside a stage's parentheses or as a pipeline setting."""

    name: str
    value: Value
    pos: SourcePos


class Stage(msgspec.Struct, frozen=True, tag="stage"):
    """`kind service (options)`: one use of a registered service."""

    kind: StageKind
    service: str
    options: tuple[Option, ...]
    pos: SourcePos
    service_pos: SourcePos


class Tee(msgspec.Struct, frozen=True, tag="tee"):
    """`tee { chain chain ... }`: the record stream continues down every branch."""

    branches: tuple[Chain, ...]
    pos: SourcePos


Step = Stage | Tee


class Chain(msgspec.Struct, frozen=True):
    """Steps joined by `|`. Only the last step may be a tee."""

    steps: tuple[Step, ...]
    pos: SourcePos


class Pipeline(msgspec.Struct, frozen=True):
    name: str
    chain: Chain
    settings: tuple[Option, ...]
    pos: SourcePos
    name_pos: SourcePos


class Document(msgspec.Struct, frozen=True):
    """A parsed file. `filename` and `text` travel with it so the checker can render errors."""

    filename: str
    pipelines: tuple[Pipeline, ...]
    text: str = ""
    format_version: int = AST_FORMAT_VERSION


def to_json(document: Document, *, include_text: bool = False) -> bytes:
    """A stable JSON rendering of the tree (used by golden tests and `explain --format ast`)."""
    if not include_text:
        document = msgspec.structs.replace(document, text="")
    return msgspec.json.format(msgspec.json.encode(document), indent=2)
