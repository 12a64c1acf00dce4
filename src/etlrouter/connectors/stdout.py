"""`stdout` sink for demos: prints one line per record.

python -m etlrouter.connectors.stdout --port 50064 [--format text|json]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

import click
import msgspec

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors.jsonl_file_sink import record_line
from etlrouter.sdk import Capabilities, Record, Sink, Written


def text_line(batch_id: str, record: Record) -> str:
    headers = " ".join(f"{name}={value}" for name, value in sorted(record.headers.items()))
    key = record.key.decode(errors="backslashreplace")
    value = record.value.decode(errors="backslashreplace")
    line = f"[{batch_id}] offset={record.offset} time={record.event_time_ms} key={key} value={value}"
    return f"{line} {headers}" if headers else line


class StdoutSink(Sink):
    capabilities = Capabilities(name="stdout", version=VERSION)

    def __init__(self, fmt: str = "text", out: TextIO | None = None) -> None:
        self.format = fmt
        self.out = out

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        out = self.out or sys.stdout
        if self.format == "json":
            lines = [msgspec.json.encode(record_line(batch_id, r)).decode() for r in records]
        else:
            lines = [text_line(batch_id, r) for r in records]
        if lines:
            out.write("\n".join(lines) + "\n")
        return None

    async def flush(self) -> None:
        (self.out or sys.stdout).flush()


@click.command(name="stdout")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@server_options
def cli(fmt: str, host: str, port: int, log_level: str, log_format: str) -> None:
    """Print one line per record on standard output."""
    serve_service(StdoutSink(fmt), host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.stdout")


if __name__ == "__main__":
    main()
