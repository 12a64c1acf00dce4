"""Validated, normalized pipeline specs and the merged DAG: what the control plane stores.

Everything here is a frozen, versioned msgspec Struct that round-trips through JSON and msgpack.
Option values are typed (a duration is a `Duration`, never the string "2s") and option maps are
sorted by name, so equal specs encode to equal bytes and hash to equal stage ids on every node.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import msgspec

from etlrouter.dsl.syntax import StageKind

MODEL_FORMAT_VERSION = 1


class Duration(msgspec.Struct, frozen=True, tag="duration"):
    ms: int

    def __str__(self) -> str:
        return format_ms(self.ms)


class Size(msgspec.Struct, frozen=True, tag="size"):
    bytes: int

    def __str__(self) -> str:
        return format_bytes(self.bytes)


class DurationRange(msgspec.Struct, frozen=True, tag="duration_range"):
    """`100ms..5s`, e.g. a retry backoff growing from `min_ms` to `max_ms`."""

    min_ms: int
    max_ms: int

    def __str__(self) -> str:
        return f"{format_ms(self.min_ms)}..{format_ms(self.max_ms)}"


OptionValue = bool | int | float | str | Duration | Size | DurationRange


class BranchPolicy(msgspec.Struct, frozen=True):
    """What a fan-out does when this branch lags: `block` the siblings, or `shed` its records
    (counted as intentional drops) once it has been stuck for `shed_after_ms`."""

    mode: Literal["block", "shed"] = "block"
    shed_after_ms: int = 0

    def __str__(self) -> str:
        if self.mode == "block":
            return "block"
        return f"shed(after = {format_ms(self.shed_after_ms)})"


BLOCK = BranchPolicy()


class StageSpec(msgspec.Struct, frozen=True):
    """One stage of a pipeline: a registered service of a kind, with typed options."""

    kind: StageKind
    service: str
    options: dict[str, OptionValue] = {}

    def describe_options(self) -> str:
        return ", ".join(f"{name} = {render_value(value)}" for name, value in self.options.items())


class Pipeline(msgspec.Struct, frozen=True):
    """A validated pipeline. `branches` lists every path from the source to a sink (a pipeline
    without `tee` has one); each path holds the stages after the source, the sink last."""

    name: str
    source: StageSpec
    branches: tuple[tuple[StageSpec, ...], ...]
    on_branch_lag: BranchPolicy = BLOCK
    format_version: int = MODEL_FORMAT_VERSION


class DagStage(msgspec.Struct, frozen=True):
    """A stage of a merged DAG. `id` depends only on the stage's own spec and its parent's id, so
    it survives any change to pipelines that do not pass through it."""

    id: str
    kind: StageKind
    service: str
    options: dict[str, OptionValue]
    parent: str | None
    children: tuple[str, ...]
    pipelines: tuple[str, ...]


class DagEdge(msgspec.Struct, frozen=True):
    """parent -> child, the pipelines whose records travel it, and the child's lag policy."""

    src: str
    dst: str
    pipelines: tuple[str, ...]
    policy: BranchPolicy


class MergedDag(msgspec.Struct, frozen=True):
    """Every pipeline reading one source (same service and options), merged into a tree that
    fans out where they diverge. `stages` is in depth-first order, the source first."""

    root: str
    stages: tuple[DagStage, ...]
    edges: tuple[DagEdge, ...]
    pipelines: tuple[str, ...]
    format_version: int = MODEL_FORMAT_VERSION

    def stage(self, stage_id: str) -> DagStage:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(stage_id)


@runtime_checkable
class Registry(Protocol):
    """What the checker needs to know about the cluster: which services exist, and their kind.

    The control plane implements this from its replicated state; tests and offline tools use
    `StaticRegistry`.
    """

    def kind_of(self, service: str) -> StageKind | None: ...

    def service_names(self) -> list[str]: ...


class StaticRegistry(msgspec.Struct, frozen=True):
    services: dict[str, StageKind]

    def kind_of(self, service: str) -> StageKind | None:
        return self.services.get(service)

    def service_names(self) -> list[str]:
        return sorted(self.services)


_MS_UNITS = ((86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s"))
_BYTE_UNITS = ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def format_ms(ms: int) -> str:
    """The shortest exact spelling: 1500 -> `1500ms`, 60000 -> `1m`."""
    for factor, unit in _MS_UNITS:
        if ms and ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"


def format_bytes(count: int) -> str:
    for factor, unit in _BYTE_UNITS:
        if count and count % factor == 0:
            return f"{count // factor}{unit}"
    return f"{count}B"


def render_value(value: OptionValue) -> str:
    """A value as it would be written in the DSL."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    return str(value)
