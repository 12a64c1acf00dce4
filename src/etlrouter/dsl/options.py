"""The option catalogue: which options each stage kind accepts, their types and ranges, and the
conversion of written values (`2s`, "1MiB", `100ms..5s`) into typed `OptionValue`s.

Service-specific settings go under `config.<name>`: they are passed to the service untouched, since
only the service knows what they mean.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from fractions import Fraction

from etlrouter.dsl.errors import did_you_mean
from etlrouter.dsl.model import Duration, DurationRange, OptionValue, Size, format_bytes, format_ms
from etlrouter.dsl.syntax import STAGE_KINDS, StageKind, Value

CONFIG_PREFIX = "config."


class OptionType(enum.Enum):
    INT = "an integer"
    BOOL = "`true` or `false`"
    STRING = "a string"
    DURATION = "a duration like `2s`"
    SIZE = "a size like `1MiB`"
    BACKOFF = "a duration or a duration range like `100ms..5s`"
    CHOICE = "one of"


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: OptionType
    kinds: tuple[StageKind, ...]
    doc: str
    low: int | None = None  # inclusive bounds; for durations in ms, for sizes in bytes
    high: int | None = None
    choices: tuple[str, ...] = ()
    required: bool = False


_ALL = STAGE_KINDS
_NOT_SOURCE: tuple[StageKind, ...] = ("transform", "lookup", "sink")
_BATCHING: tuple[StageKind, ...] = ("source", "sink")
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS

OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("parallelism", OptionType.INT, _ALL, "concurrent calls into the service", 1, 256),
    OptionSpec("retries", OptionType.INT, _ALL, "attempts after the first failure", 0, 100),
    OptionSpec("backoff", OptionType.BACKOFF, _ALL, "delay between retries (min..max)", 1, _HOUR_MS),
    OptionSpec("timeout", OptionType.DURATION, _ALL, "deadline of one call", 1, _HOUR_MS),
    OptionSpec("batch_size", OptionType.INT, _BATCHING, "records per batch", 1, 100_000),
    OptionSpec("batch_bytes", OptionType.SIZE, _BATCHING, "bytes per batch", 1, 64 << 20),
    OptionSpec("linger", OptionType.DURATION, _BATCHING, "wait to fill a batch", 0, 60_000),
    OptionSpec(
        "max_inflight", OptionType.INT, ("source",), "batches pulled and not yet acknowledged", 1, 10_000
    ),
    OptionSpec(
        "start",
        OptionType.CHOICE,
        ("source",),
        "where a new consumer starts",
        choices=("earliest", "latest"),
    ),
    OptionSpec("dlq", OptionType.STRING, _NOT_SOURCE, "dead-letter queue for records that fail"),
    OptionSpec("flush", OptionType.BOOL, ("sink",), "ack only after the sink's Flush succeeded"),
    OptionSpec("key", OptionType.STRING, ("lookup",), "record field to look up", required=True),
    OptionSpec("cache_ttl", OptionType.DURATION, ("lookup",), "how long answers are cached", 1, _DAY_MS),
    OptionSpec("cache_size", OptionType.INT, ("lookup",), "cached answers", 0, 10_000_000),
    OptionSpec(
        "on_miss",
        OptionType.CHOICE,
        ("lookup",),
        "what happens to a record whose key is unknown",
        choices=("pass", "drop", "dlq"),
    ),
)
OPTIONS_BY_NAME = {spec.name: spec for spec in OPTIONS}


def options_for(kind: StageKind) -> list[OptionSpec]:
    return [spec for spec in OPTIONS if kind in spec.kinds]


class ValueProblem(Exception):
    """A written value does not fit; `message` and `hint` end up in a DslError at the value."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


_UNIT_LITERAL = re.compile(r"^\s*(-?[0-9][0-9_]*(?:\.[0-9][0-9_]*)?)\s*([A-Za-z]+)\s*$")
# Spellings people reach for, to point them at the unit we accept.
_UNIT_ALIASES = {
    "sec": "s",
    "secs": "s",
    "second": "s",
    "seconds": "s",
    "msec": "ms",
    "millis": "ms",
    "min": "m",
    "mins": "m",
    "minute": "m",
    "minutes": "m",
    "hr": "h",
    "hour": "h",
    "hours": "h",
    "day": "d",
    "days": "d",
    "mb": "MiB",
    "kb": "KiB",
    "gb": "GiB",
}
DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": _HOUR_MS, "d": _DAY_MS}
SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}


def _split_unit(text: str, what: str, example: str) -> tuple[Fraction, str]:
    match = _UNIT_LITERAL.match(text)
    if match is None:
        raise ValueProblem(f"`{text}` is not {what}", f"write it like `{example}`")
    try:
        # Fractions keep `0.3s` exactly 300ms, where floats would not.
        number = Fraction(match.group(1))
    except ValueError:
        raise ValueProblem(f"`{text}` is not {what}", f"write it like `{example}`") from None
    return number, match.group(2)


def _alias_hint(unit: str) -> str | None:
    alias = _UNIT_ALIASES.get(unit.lower())
    return f"did you mean `{alias}`?" if alias else None


def parse_duration_ms(text: str) -> int:
    """`"1.5s"` -> 1500. Raises ValueProblem for anything that is not an exact duration."""
    number, unit = _split_unit(text, "a duration", "250ms")
    if unit not in DURATION_UNITS:
        hint = _alias_hint(unit) or did_you_mean(unit, DURATION_UNITS) or "duration units are ms, s, m, h, d"
        if unit in SIZE_UNITS:
            hint = f"`{unit}` is a size unit; duration units are ms, s, m, h, d"
        raise ValueProblem(f"unknown duration unit `{unit}` in `{text}`", hint)
    ms = number * DURATION_UNITS[unit]
    if ms.denominator != 1:
        raise ValueProblem(f"`{text}` is finer than a millisecond", "durations have millisecond resolution")
    return int(ms)


def parse_size_bytes(text: str) -> int:
    """`"1MiB"` -> 1048576."""
    number, unit = _split_unit(text, "a size", "1MiB")
    if unit not in SIZE_UNITS:
        hint = (
            _alias_hint(unit)
            or did_you_mean(unit, SIZE_UNITS)
            or "size units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
        if unit in DURATION_UNITS:
            hint = f"`{unit}` is a duration unit; size units are B, KiB, MiB, GiB, ..."
        raise ValueProblem(f"unknown size unit `{unit}` in `{text}`", hint)
    count = number * SIZE_UNITS[unit]
    if count.denominator != 1:
        raise ValueProblem(f"`{text}` is not a whole number of bytes")
    return int(count)


def _describe(value: Value) -> str:
    if value.kind == "string":
        return f'the string "{value.text}"'
    if value.kind == "call":
        return f"`{value.text}(...)`"
    if value.kind == "unit":
        return f"`{value.text}`"
    return f"the {value.kind} `{value.text}`"


def _check_bounds(spec: OptionSpec, number: int, shown: str) -> None:
    if spec.low is not None and number < spec.low:
        raise ValueProblem(f"`{spec.name}` must be at least {_bound(spec, spec.low)}, got {shown}")
    if spec.high is not None and number > spec.high:
        raise ValueProblem(f"`{spec.name}` must be at most {_bound(spec, spec.high)}, got {shown}")


def _bound(spec: OptionSpec, number: int) -> str:
    if spec.type in (OptionType.DURATION, OptionType.BACKOFF):
        return format_ms(number) if number else "0ms"
    if spec.type is OptionType.SIZE:
        return format_bytes(number)
    return str(number)


def _duration_of(spec: OptionSpec, value: Value) -> int:
    if value.kind in ("unit", "string"):
        ms = parse_duration_ms(value.text)
        _check_bounds(spec, ms, f"`{value.text}`")
        return ms
    if value.kind in ("int", "float"):
        raise ValueProblem(
            f"`{spec.name}` needs a unit, got the number `{value.text}`",
            f"e.g. `{value.text}ms` or `{value.text}s`",
        )
    raise ValueProblem(f"`{spec.name}` takes {spec.type.value}, got {_describe(value)}")


def convert(spec: OptionSpec, value: Value) -> OptionValue:
    """Turn a written value into the typed value `spec` asks for, or raise ValueProblem."""
    kind = value.kind
    if spec.type is OptionType.INT:
        if kind != "int":
            raise ValueProblem(f"`{spec.name}` takes {spec.type.value}, got {_describe(value)}")
        number = int(value.text)
        _check_bounds(spec, number, str(number))
        return number
    if spec.type is OptionType.BOOL:
        if kind != "bool":
            raise ValueProblem(f"`{spec.name}` takes {spec.type.value}, got {_describe(value)}")
        return value.text == "true"
    if spec.type is OptionType.STRING:
        if kind not in ("string", "name"):
            raise ValueProblem(f"`{spec.name}` takes {spec.type.value}, got {_describe(value)}")
        if not value.text:
            raise ValueProblem(f"`{spec.name}` cannot be empty")
        return value.text
    if spec.type is OptionType.CHOICE:
        if kind not in ("string", "name") or value.text not in spec.choices:
            listed = ", ".join(f"`{choice}`" for choice in spec.choices)
            hint = did_you_mean(value.text, spec.choices) if kind in ("string", "name") else None
            raise ValueProblem(f"`{spec.name}` must be one of {listed}, got {_describe(value)}", hint)
        return value.text
    if spec.type is OptionType.DURATION:
        return Duration(_duration_of(spec, value))
    if spec.type is OptionType.SIZE:
        if kind not in ("unit", "string"):
            hint = f"e.g. `{value.text}B` or `{value.text}KiB`" if kind == "int" else None
            raise ValueProblem(f"`{spec.name}` takes {spec.type.value}, got {_describe(value)}", hint)
        count = parse_size_bytes(value.text)
        _check_bounds(spec, count, f"`{value.text}`")
        return Size(count)
    # BACKOFF: a single duration means a constant delay.
    if kind == "string" and ".." in value.text:
        low_text, _, high_text = value.text.partition("..")
        low_value = Value(kind="string", text=low_text, pos=value.pos)
        high_value = Value(kind="string", text=high_text, pos=value.pos)
        value = Value(kind="range", text=value.text, pos=value.pos, low=low_value, high=high_value)
    if value.kind == "range" and value.low is not None and value.high is not None:
        low = _duration_of(spec, value.low)
        high = _duration_of(spec, value.high)
        if low > high:
            raise ValueProblem(
                f"`{spec.name}` range runs backwards: `{value.low.text}` is more than `{value.high.text}`",
                f"write it as `{value.high.text}..{value.low.text}`",
            )
        return DurationRange(low, high)
    single = _duration_of(spec, value)
    return DurationRange(single, single)


def convert_config(name: str, value: Value) -> OptionValue:
    """`config.*` values go to the service as written: plain literals only."""
    if value.kind == "int":
        integer = int(value.text)
        # Specs are persisted as msgpack, whose integers are 64-bit.
        if not -(2**63) <= integer < 2**63:
            raise ValueProblem(f"`{name}` is out of the 64-bit integer range", "pass it as a string")
        return integer
    if value.kind == "float":
        real = float(value.text)
        if not math.isfinite(real):
            raise ValueProblem(f"`{name}` is too large to represent: `{value.text}`")
        return real
    if value.kind == "bool":
        return value.text == "true"
    if value.kind in ("string", "name", "unit"):
        return value.text
    raise ValueProblem(f"`{name}` must be a plain value (string, number, bool), got {_describe(value)}")
