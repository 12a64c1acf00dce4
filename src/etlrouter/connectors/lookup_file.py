"""`lookup-file` lookup: answers key -> row from a CSV file or a JSON file, loaded at start.

    python -m etlrouter.connectors.lookup_file --port 50063 --path customers.csv --key-column id

A hit returns the row as `fields` (every column as a string) and as `value` (the row as a JSON object).
JSON files hold an array of objects or one object per line (JSON lines).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import msgspec

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.sdk import Capabilities, Lookup, LookupResult


class LookupFileError(ValueError):
    """The lookup file cannot be loaded; the message names the file and the row."""


def _field_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def load_rows(path: Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Rows of a CSV, JSON array or JSON-lines file."""
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "json"
    text = path.read_text(encoding="utf-8")
    if fmt == "csv":
        return [dict(row) for row in csv.DictReader(io.StringIO(text))]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise LookupFileError(f"{path}: not valid JSON: {exc}") from None
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise LookupFileError(f"{path}: element {number} of the array is not an object")
        return list(rows)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise LookupFileError(f"{path}:{number}: not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise LookupFileError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


def build_index(rows: list[dict[str, Any]], key_column: str, origin: str) -> dict[bytes, LookupResult]:
    index: dict[bytes, LookupResult] = {}
    for number, row in enumerate(rows, start=1):
        if key_column not in row or row[key_column] is None:
            raise LookupFileError(f"{origin}: row {number} has no key column {key_column!r}")
        key = _field_text(row[key_column]).encode()
        fields = {name: _field_text(value) for name, value in row.items() if value is not None}
        index[key] = LookupResult(msgspec.json.encode(row), fields)  # later rows win
    return index


class FileLookup(Lookup):
    def __init__(self, path: str | Path, key_column: str, fmt: str = "auto") -> None:
        self.path = Path(path)
        self.key_column = key_column
        self.format = fmt
        self.capabilities = Capabilities(
            name="lookup-file", version=VERSION, labels={"path": str(self.path), "key_column": key_column}
        )
        self.index = build_index(load_rows(self.path, fmt), key_column, str(self.path))

    async def lookup(self, key: bytes) -> LookupResult | None:
        return self.index.get(key)

    async def batch_lookup(self, keys: Sequence[bytes]) -> list[LookupResult | None]:
        get = self.index.get
        return [get(key) for key in keys]


@click.command(name="lookup-file")
@click.option("--path", required=True, type=click.Path(exists=True, dir_okay=False), help="CSV or JSON file.")
@click.option("--key-column", required=True, help="Column (field) whose value is the lookup key.")
@click.option(
    "--format", "fmt", type=click.Choice(["auto", "csv", "json"]), default="auto", show_default=True
)
@server_options
def cli(path: str, key_column: str, fmt: str, host: str, port: int, log_level: str, log_format: str) -> None:
    """Answer lookups from a CSV or JSON file."""
    try:
        service = FileLookup(path, key_column, fmt)
    except (LookupFileError, UnicodeDecodeError, csv.Error) as exc:
        raise click.BadParameter(str(exc), param_hint="--path") from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.lookup_file")


if __name__ == "__main__":
    main()
