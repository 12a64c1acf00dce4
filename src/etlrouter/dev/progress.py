"""When a `--limit` run of `etlrouter dev` is done: sources acknowledged their last record, sinks hold
every record that should reach them.

The generator's records are a pure function of its configuration and filters are pure predicates, so for a
generator → filter/map … → jsonl-file sink path dev can compute exactly which offsets each sink must hold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from etlrouter.connectors import filter as filter_connector
from etlrouter.connectors import generator as generator_connector
from etlrouter.connectors.expr import compile_predicate
from etlrouter.connectors.generator import GeneratorConfig, load_state, make_record
from etlrouter.dev.spec import ServiceSpec

_GENERATOR_FIELDS = set(GeneratorConfig.__struct_fields__)


def _params(command: click.Command, args: Sequence[str]) -> dict[str, object]:
    with command.make_context(command.name or "connector", list(args), resilient_parsing=False) as ctx:
        return dict(ctx.params)


def generator_config(args: Sequence[str]) -> GeneratorConfig:
    """The configuration a generator started with `args` runs with (parsed by its own command line)."""
    params = _params(generator_connector.cli, args)
    return GeneratorConfig(**{k: v for k, v in params.items() if k in _GENERATOR_FIELDS})  # type: ignore[arg-type]


def filter_default_expr(args: Sequence[str]) -> str | None:
    expr = _params(filter_connector.cli, args).get("expr")
    return expr if isinstance(expr, str) else None


@dataclass(frozen=True)
class PathStep:
    connector: str
    service: ServiceSpec
    options: dict[str, str]


def expected_offsets(config: GeneratorConfig, steps: Sequence[PathStep]) -> set[int] | None:
    """Offsets that pass every step, or None when the outcome cannot be predicted."""
    if config.partitions != 1:
        return None  # sink lines carry the offset, not the partition: offsets of partitions would collide
    predicates = []
    for step in steps:
        if step.connector == "map":
            continue  # one record out per record in (failures go to the DLQ and are counted there)
        if step.connector != "filter":
            return None
        expr = step.options.get("config.expr") or filter_default_expr(step.service.args)
        if not expr:
            return None
        predicates.append(compile_predicate(expr))
    out: set[int] = set()
    for offset in range(config.limit):
        record = make_record(config, 0, offset)
        if all(p(record) for p in predicates):
            out.add(offset)
    return out


@dataclass
class SinkFile:
    """The offsets a jsonl-file sink wrote, read incrementally."""

    path: Path
    offsets: set[int] = field(default_factory=set)
    lines: int = 0
    _pos: int = 0

    def refresh(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        for line in data[: end + 1].splitlines():
            if line.strip():
                self.lines += 1
                self.offsets.add(int(json.loads(line)["offset"]))
        self._pos += end + 1


def source_done(state_file: Path, config: GeneratorConfig) -> tuple[bool, str]:
    """Whether the generator acknowledged its last record of every partition, and a description."""
    try:
        acked = load_state(state_file)
    except (OSError, ValueError):
        acked = {}
    parts: list[str] = []
    done = True
    for p in range(config.partitions):
        size = config.limit // config.partitions + (1 if p < config.limit % config.partitions else 0)
        have = acked.get(p, -1) + 1
        if have < size:
            done = False
        parts.append(f"{have}/{size}")
    return done, "acknowledged " + ", ".join(parts)


def describe_missing(missing: set[int], limit: int = 5) -> str:
    ordered = sorted(missing)
    head = ", ".join(str(o) for o in ordered[:limit])
    return f"{len(ordered)} missing (offsets {head}{', …' if len(ordered) > limit else ''})"
