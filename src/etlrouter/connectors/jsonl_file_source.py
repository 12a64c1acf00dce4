"""`jsonl-file` source: reads a JSON-lines file; offset = line number (1-based); resumes after the last ack.

    python -m etlrouter.connectors.jsonl_file_source --port 50066 --path in.jsonl [--follow]

The acknowledged offset is kept in `<path>.ack` (written atomically and fsynced on every Acknowledge), so
a restarted source continues with the first unacknowledged line: lines delivered but not acknowledged are
delivered again (at-least-once). Blank lines are skipped but keep their line number. A rewind (a new sidecar
session) seeks back to the byte after the last acknowledged line, so the same happens without a restart;
an acknowledgement that arrives after a rewind for lines delivered before it still counts, and the lines it
covers are not delivered again.

Formats:
- `raw` (default): the value is the line; `--key-field` / `--event-time-field` take the key and the event
  time (ms) from fields of the line's JSON object.
- `record`: lines as the jsonl-file sink writes them (key/key_b64, value/value_b64, headers,
  event_time_ms), so a file written by the sink can be replayed.
A line that cannot be read in the chosen format is still delivered (value = the line) with the header
`jsonl.error` saying why, so the pipeline can route it to its dead-letter queue.

Following (`--follow`): a pull that finds no new complete line waits (up to the pull's wait_ms, a long
poll) for the file to change, told by inotify on Linux (connectors/_follow.py), so an appended line is
read the moment it is written; where inotify is not available the file is polled every 50 ms.
`follow_mode` says which ("inotify", "poll", or "" when not following).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import click
import msgspec

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors._follow import FileWatch
from etlrouter.sdk import Capabilities, PermanentError, Pulled, Record, Source
from etlrouter.sdk.records import encoded_size

log = logging.getLogger(__name__)
_decode = msgspec.json.Decoder().decode
ERROR_HEADER = "jsonl.error"
_POLL_S = 0.05


def parse_raw(line: bytes, offset: int, key_field: str | None, time_field: str | None) -> Record:
    if key_field is None and time_field is None:
        return Record(b"", line, {}, 0, offset)
    try:
        obj = _decode(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        key = obj.get(key_field) if key_field else None
        key_bytes = (
            b""
            if key is None
            else (key if isinstance(key, str) else msgspec.json.encode(key).decode()).encode()
        )
        event_time = obj.get(time_field, 0) if time_field else 0
        if not isinstance(event_time, int) or isinstance(event_time, bool):
            raise ValueError(f"field {time_field!r} is not an integer of milliseconds")
    except (msgspec.DecodeError, ValueError) as exc:
        return Record(b"", line, {ERROR_HEADER: f"line {offset}: {exc}"}, 0, offset)
    return Record(key_bytes, line, {}, event_time, offset)


def _text_or_b64(obj: dict[str, Any], name: str) -> bytes:
    if name in obj:
        value = obj[name]
        if not isinstance(value, str):
            raise ValueError(f"{name!r} is not a string")
        return value.encode()
    if name + "_b64" in obj:
        return base64.b64decode(obj[name + "_b64"], validate=True)
    return b""


def parse_record_line(line: bytes, offset: int) -> Record:
    try:
        obj = _decode(line)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        headers = obj.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValueError("'headers' is not an object of strings")
        event_time = obj.get("event_time_ms", 0)
        if not isinstance(event_time, int) or isinstance(event_time, bool):
            raise ValueError("'event_time_ms' is not an integer")
        return Record(_text_or_b64(obj, "key"), _text_or_b64(obj, "value"), headers, event_time, offset)
    except (msgspec.DecodeError, ValueError) as exc:  # binascii.Error is a ValueError
        return Record(b"", line, {ERROR_HEADER: f"line {offset}: {exc}"}, 0, offset)


def read_ack(path: Path) -> int:
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected the acknowledged line number, found {text[:40]!r}")
    return int(text)


def write_ack(path: Path, offset: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(f"{offset}\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class JsonlFileSource(Source):
    def __init__(
        self,
        path: str | Path,
        *,
        fmt: str = "raw",
        key_field: str | None = None,
        event_time_field: str | None = None,
        follow: bool = False,
        use_inotify: bool = True,
    ) -> None:
        self.path = Path(path)
        self.ack_path = self.path.with_name(self.path.name + ".ack")
        self.format = fmt
        self.key_field = key_field
        self.event_time_field = event_time_field
        self.follow = follow
        self.use_inotify = use_inotify
        self._watch: FileWatch | None = None
        self.capabilities = Capabilities(
            name="jsonl-file", version=VERSION, partitions=1, labels={"path": str(self.path)}
        )
        self.acked = 0
        self.last_line = 0  # line number of the last line read (delivered or skipped)
        self.high_water = 0  # highest line number ever read (delivered or skipped), across rewinds
        self.acked_position = 0  # byte offset just after the acknowledged line
        self._ends: deque[tuple[int, int]] = deque()  # (line number, byte offset after it), unacknowledged
        self._file: IO[bytes] | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self.acked = read_ack(self.ack_path)
        self._file = self.path.open("rb")
        # Skip what was acknowledged before a restart.
        while self.last_line < self.acked:
            line = self._file.readline()
            if not line:
                raise PermanentError(
                    f"{self.path} has {self.last_line} lines, "
                    f"but {self.ack_path} says {self.acked} were acknowledged"
                )
            self.last_line += 1
        self.high_water = self.last_line
        self.acked_position = self._file.tell()
        self._ends.clear()
        if self.follow:
            if self._watch is not None:
                self._watch.close()
            self._watch = FileWatch(self.path, poll_s=_POLL_S, use_inotify=self.use_inotify)
            self._watch.start()

    @property
    def follow_mode(self) -> str:
        """How appended lines are noticed: "inotify", "poll", or "" (not following, or not open)."""
        return self._watch.mode if self._watch is not None else ""

    async def rewind(self) -> None:
        """Deliver again everything after the last acknowledged line."""
        async with self._lock:
            if self._file is None:
                return
            self._file.seek(self.acked_position)
            self.last_line = self.acked

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self, max_records: int, max_bytes: int) -> tuple[list[Record], bool]:
        """Up to max_records records from the current position, and whether the file is exhausted."""
        assert self._file is not None
        records: list[Record] = []
        size = 0
        while len(records) < max_records and (not max_bytes or size < max_bytes or not records):
            position = self._file.tell()
            line = self._file.readline()
            if not line:
                return records, True
            if not line.endswith(b"\n") and self.follow:
                self._file.seek(position)  # the writer has not finished this line yet
                return records, True
            self.last_line += 1
            if self.last_line > self.high_water:
                self.high_water = self.last_line
                self._ends.append((self.last_line, self._file.tell()))
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            if self.format == "record":
                record = parse_record_line(line, self.last_line)
            else:
                record = parse_raw(line, self.last_line, self.key_field, self.event_time_field)
            records.append(record)
            size += encoded_size(record)
        return records, False

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        if partitions and 0 not in partitions:
            return Pulled()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        async with self._lock:
            while True:
                watch = self._watch
                seen = watch.generation if watch is not None else 0
                records, exhausted = self._read(max_records, max_bytes)
                if records:
                    return Pulled(records, 0)
                if exhausted and not self.follow:
                    return Pulled(end_of_stream=True)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return Pulled()
                if watch is None:
                    await asyncio.sleep(min(_POLL_S, remaining))
                else:  # the moment the file changes (inotify), or one poll interval
                    await watch.wait_past(seen, remaining)

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        if partition != 0:
            raise PermanentError(f"jsonl-file has only partition 0, got an acknowledgement for {partition}")
        if up_to_offset > self.high_water:
            raise PermanentError(
                f"acknowledgement up to line {up_to_offset}, but only {self.high_water} lines were delivered"
            )
        if up_to_offset <= self.acked:
            return  # cumulative: an older or repeated ack changes nothing
        # No lock: pull reads synchronously between its awaits, so this never runs in the middle of a read.
        while self._ends and self._ends[0][0] <= up_to_offset:
            _, self.acked_position = self._ends.popleft()
        self.acked = up_to_offset
        if self.last_line < up_to_offset and self._file is not None:
            # A late acknowledgement after a rewind: do not deliver again what it covers.
            self._file.seek(self.acked_position)
            self.last_line = up_to_offset
        await asyncio.to_thread(write_ack, self.ack_path, up_to_offset)


@click.command(name="jsonl-file-source")
@click.option("--path", required=True, type=click.Path(exists=True, dir_okay=False), help="JSON-lines file.")
@click.option("--format", "fmt", type=click.Choice(["raw", "record"]), default="raw", show_default=True)
@click.option("--key-field", help="raw format: JSON field whose value is the record key.")
@click.option("--event-time-field", help="raw format: JSON field holding the event time in ms.")
@click.option("--follow/--no-follow", default=False, help="Wait for lines appended later (no end of stream).")
@server_options
def cli(
    path: str,
    fmt: str,
    key_field: str | None,
    event_time_field: str | None,
    follow: bool,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Read records from a JSON-lines file."""
    service = JsonlFileSource(
        path, fmt=fmt, key_field=key_field, event_time_field=event_time_field, follow=follow
    )
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.jsonl_file_source")


if __name__ == "__main__":
    main()
