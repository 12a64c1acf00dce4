"""Rendering ctl results as a table, JSON or YAML. One place, so every command formats alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import yaml


def render(data: Any, fmt: str, *, columns: Sequence[str] | None = None) -> str:
    """`data` is plain data (lists/dicts/scalars) or msgspec Structs. Tables need a list of mappings."""
    plain = msgspec.to_builtins(data)
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(plain), indent=2).decode()
    if fmt == "yaml":
        return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True).rstrip()
    if isinstance(plain, Mapping):
        plain = [plain]
    return table(plain, columns)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    return str(value)
