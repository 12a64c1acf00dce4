"""What `etlrouter dev` runs: the pipeline text and the services it names (pure: no processes, no network).

A pipeline file declares the services dev must start in comment lines, one per service:

    # dev: service NAME CONNECTOR [ARG ...]

CONNECTOR is a reference connector module of `etlrouter.connectors` (generator, filter, map,
jsonl_file_sink, jsonl_file_source, lookup_file, stdout, postgres, redis_streams, http_ingest, kafka_source,
kafka_sink, s3, clickhouse, nats_source, nats_sink); ARGs are
passed to it as written (shell-quoted). A file without such lines gets the sample's services (orders,
valid-orders, archive, warehouse). dev adds what only it knows: `--name`, `--port`; for a generator
`--state-file`, `--event-time-start-ms`, `--limit`/`--rate`; for a jsonl_file_sink `--path
DATA/sinks/NAME.jsonl` unless the line gives a `--path`; for an http_ingest `--sidecar` (its own sidecar;
give `--http-port` yourself).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

CONNECTORS = (
    "generator",
    "filter",
    "map",
    "jsonl_file_sink",
    "jsonl_file_source",
    "lookup_file",
    "stdout",
    "postgres",
    "redis_streams",
    "http_ingest",
    "kafka_source",
    "kafka_sink",
    "s3",
    "clickhouse",
    "nats_source",
    "nats_sink",
)
_SERVICE_LINE = re.compile(r"^\s*#\s*dev:\s*(.*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class SpecError(ValueError):
    """A `# dev:` line that cannot be used (the message names the line)."""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    connector: str
    args: tuple[str, ...] = ()

    def arg_value(self, option: str) -> str | None:
        """The last value given for `--option` (`--option V` or `--option=V`), or None."""
        value: str | None = None
        for i, arg in enumerate(self.args):
            if arg == option and i + 1 < len(self.args):
                value = self.args[i + 1]
            elif arg.startswith(option + "="):
                value = arg.split("=", 1)[1]
        return value


@dataclass(frozen=True)
class DevSpec:
    pipelines: str
    filename: str
    services: tuple[ServiceSpec, ...] = field(default_factory=tuple)

    def service(self, name: str) -> ServiceSpec:
        return next(s for s in self.services if s.name == name)


def sample_text() -> str:
    return resources.files("etlrouter.dev").joinpath("sample.etl").read_text(encoding="utf-8")


def parse_services(text: str, filename: str) -> tuple[ServiceSpec, ...]:
    services: list[ServiceSpec] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        match = _SERVICE_LINE.match(line)
        if not match:
            continue
        where = f"{filename}:{lineno}"
        try:
            words = shlex.split(match.group(1))
        except ValueError as exc:
            raise SpecError(f"{where}: {exc}") from None
        if len(words) < 3 or words[0] != "service":
            raise SpecError(f"{where}: expected `# dev: service NAME CONNECTOR [ARG ...]`")
        _, name, connector, *args = words
        if not _NAME.match(name):
            raise SpecError(f"{where}: {name!r} is not a service name")
        if connector not in CONNECTORS:
            raise SpecError(f"{where}: unknown connector {connector!r} (one of {', '.join(CONNECTORS)})")
        if any(s.name == name for s in services):
            raise SpecError(f"{where}: service {name!r} is declared twice")
        services.append(ServiceSpec(name, connector, tuple(args)))
    return tuple(services)


def load_spec(text: str | None = None, filename: str = "sample.etl") -> DevSpec:
    """The spec of a pipeline file, or of the built-in sample when `text` is None."""
    sample = sample_text()
    if text is None:
        return DevSpec(sample, "sample.etl", parse_services(sample, "sample.etl"))
    services = parse_services(text, filename) or parse_services(sample, "sample.etl")
    return DevSpec(text, filename, services)
