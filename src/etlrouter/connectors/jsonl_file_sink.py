"""`jsonl-file` sink: appends one JSON line per record; idempotent by batch id; durable on Flush.

    python -m etlrouter.connectors.jsonl_file_sink --port 50065 --path out.jsonl

Each line: {"batch_id", "offset", "event_time_ms", "key" | "key_b64", "value" | "value_b64", "headers"}
(key and value as UTF-8 text when they are, else base64 under the *_b64 name).

Idempotency — a commit log beside the data: after the lines of a batch are appended, the sink appends
`<batch id>\\t<end byte offset of the data file>` to `<path>.batches`. Flush fsyncs the data file, then the
commit log. On start the sink reads the commit log, remembers the batch ids (the newest 100 000), and
truncates the data file to the end of the last committed batch: lines of a batch whose write was cut short
by a crash are removed, and the sidecar's retry of that batch id (it was never acknowledged) writes them
again. Commit entries that point past the end of the data file (lost by an OS crash before Flush) are
dropped, so those batches are written again too. Content that was in the file before the sink first ran is
kept.

Rotation — with `--max-bytes N` the data file is rotated once a batch takes it to N bytes or more: it and
its commit log are fsynced and renamed to `<path>.1` and `<path>.1.batches` (older ones shift to `.2`, …;
`--keep K` rotated files are kept, older ones deleted), and an empty file takes its place. Batch ids stay
remembered in memory across a rotation; after a restart only the current file's commit log is read, so a
retried batch that was written before the last rotation could be written again (at least once, as ever).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import msgspec

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.sdk import Capabilities, Record, Sink, Written

_encode = msgspec.json.Encoder().encode


def record_line(batch_id: str, record: Record) -> dict[str, Any]:
    """The JSON object one record becomes (shared with the stdout sink's json format)."""
    line: dict[str, Any] = {
        "batch_id": batch_id,
        "offset": record.offset,
        "event_time_ms": record.event_time_ms,
    }
    for name, data in (("key", record.key), ("value", record.value)):
        try:
            line[name] = data.decode()
        except UnicodeDecodeError:
            line[name + "_b64"] = base64.b64encode(data).decode()
    line["headers"] = record.headers
    return line


class CommitLog:
    """`<batch id>\\t<end offset>` lines; the pure part is `recover`, the rest is append + fsync."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self.ends: OrderedDict[str, int] = OrderedDict()

    @staticmethod
    def recover(lines: list[str], data_size: int, capacity: int) -> tuple[OrderedDict[str, int], int]:
        """Valid entries (the newest `capacity`) and the committed end of the data file."""
        ends: OrderedDict[str, int] = OrderedDict()
        committed = 0
        for line in lines:
            batch_id, sep, end_text = line.rpartition("\t")
            if not sep or not end_text.isdigit():
                continue  # a torn last line
            end = int(end_text)
            if end > data_size:
                continue  # the data it points to did not survive
            committed = max(committed, end)
            if batch_id:
                ends[batch_id] = end
                ends.move_to_end(batch_id)
                if len(ends) > capacity:
                    ends.popitem(last=False)
        return ends, committed


class JsonlFileSink(Sink):
    def __init__(
        self, path: str | Path, *, remember_batches: int = 100_000, max_bytes: int = 0, keep: int = 1
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes  # 0: never rotate
        self.keep = keep
        self.log_path = self.path.with_name(self.path.name + ".batches")
        self.remember_batches = remember_batches
        self.capabilities = Capabilities(
            name="jsonl-file",
            version=VERSION,
            requires_flush=True,
            idempotent_writes=True,
            labels={"path": str(self.path)},
        )
        self.written: OrderedDict[str, int] = OrderedDict()
        self._data: Any = None
        self._log: Any = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)
        size = self.path.stat().st_size
        if self.log_path.exists():
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
            self.written, committed = CommitLog.recover(lines, size, self.remember_batches)
        else:
            self.written, committed = OrderedDict(), size  # pre-existing content is kept
        if size > committed:
            os.truncate(self.path, committed)
        # Rewrite the log with what is remembered, so it does not grow across restarts.
        entries = [f"\t{committed}\n"] + [f"{batch_id}\t{end}\n" for batch_id, end in self.written.items()]
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        tmp.write_text("".join(entries), encoding="utf-8")
        tmp.replace(self.log_path)
        self._data = self.path.open("ab")
        self._log = self.log_path.open("a", encoding="utf-8")

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        if batch_id and batch_id in self.written:
            return Written(len(records))  # a retry of a batch already written
        if "\n" in batch_id or "\t" in batch_id:
            raise ValueError(f"batch id {batch_id!r} contains a tab or newline")
        payload = b"".join(_encode(record_line(batch_id, r)) + b"\n" for r in records)
        self._data.write(payload)
        self._data.flush()
        end = self._data.tell()
        self._log.write(f"{batch_id}\t{end}\n")
        self._log.flush()
        if batch_id:
            self.written[batch_id] = end
            if len(self.written) > self.remember_batches:
                self.written.popitem(last=False)
        if self.max_bytes and end >= self.max_bytes:
            # On the loop, not in a thread: no other write may touch the files while they are swapped (an
            # fsync and a few renames, once per max_bytes).
            self._rotate()
        return None

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate(self) -> None:
        self._sync()
        self._data.close()
        self._log.close()
        for n in range(self.keep, 0, -1):  # .keep is dropped, .n-1 -> .n, …, the current file -> .1
            older = self.rotated(n)
            for src in (older, older.with_name(older.name + ".batches")):
                if n == self.keep:
                    src.unlink(missing_ok=True)
                else:
                    target = self.rotated(n + 1)
                    if src.name.endswith(".batches"):
                        target = target.with_name(target.name + ".batches")
                    if src.exists():
                        src.replace(target)
        if self.keep:
            self.path.replace(self.rotated(1))
            self.log_path.replace(self.rotated(1).with_name(self.rotated(1).name + ".batches"))
        self.log_path.write_text("\t0\n", encoding="utf-8")
        self._data = self.path.open("wb")
        self._log = self.log_path.open("a", encoding="utf-8")

    async def flush(self) -> None:
        await asyncio.to_thread(self._sync)

    def _sync(self) -> None:
        # Data before the commit log: a durable commit entry must never point at data that is not.
        os.fsync(self._data.fileno())
        os.fsync(self._log.fileno())

    async def close(self) -> None:
        if self._data is not None:
            self._sync()
            self._data.close()
            self._log.close()
            self._data = self._log = None


@click.command(name="jsonl-file-sink")
@click.option("--path", required=True, type=click.Path(dir_okay=False), help="File to append to.")
@click.option("--remember-batches", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option(
    "--max-bytes",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Rotate the file to PATH.1 once it reaches this size (0 = never).",
)
@click.option(
    "--keep", type=click.IntRange(min=0), default=1, show_default=True, help="Rotated files to keep."
)
@server_options
def cli(
    path: str,
    remember_batches: int,
    max_bytes: int,
    keep: int,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Append records to a JSON-lines file, idempotently by batch id."""
    service = JsonlFileSink(path, remember_batches=remember_batches, max_bytes=max_bytes, keep=keep)
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.jsonl_file_sink")


if __name__ == "__main__":
    main()
