"""WAL benchmark: entries/s and save latency of RaftStorage for batch sizes 1, 10 and 100, with fsync
on and off, against the raw fdatasync cost measured in the same run on the same filesystem.

Absolute numbers depend on the disk and on what else runs; compare the ratios to the baseline.

    .venv/bin/python benchmarks/wal.py [--seconds 1.5] [--payload 200] [--dir /path/on/the/disk]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from etlrouter.raft.storage import RaftStorage, StorageOptions
from etlrouter.raft.types import Entry, HardState

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
_BLOCK_SECONDS = 0.1


@dataclass(frozen=True)
class Result:
    label: str
    operations: int
    entries_per_second: float
    p50_ms: float
    p99_ms: float
    raw_p50_ms: float  # raw write+fdatasync p50 measured alongside this row


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class RawFsync:
    """The floor: append an entry-sized block to a plain file and fdatasync it, nothing else."""

    def __init__(self, directory: Path, payload: int) -> None:
        self.path = directory / "raw.bin"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.block = os.urandom(payload)

    def timed(self) -> float:
        start = time.perf_counter()
        os.write(self.fd, self.block)
        _fdatasync(self.fd)
        return time.perf_counter() - start

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink()


def measure_raw(raw: RawFsync, seconds: float) -> Result:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 20:
        latencies.append(raw.timed())
    return summarize("raw write+fdatasync", latencies, 1, statistics.median(latencies))


def measure_storage(
    directory: Path, raw: RawFsync, batch: int, fsync: bool, seconds: float, payload: int
) -> Result:
    """Saves like a leader's Ready loop: a batch of entries plus a commit bump, sync=True each time.

    With fsync on, the row alternates 0.1 s blocks of saves with 0.1 s blocks of raw fdatasyncs, so
    the ratio of the two is taken under the same disk conditions (other load moves both).
    """
    data_dir = Path(tempfile.mkdtemp(prefix=f"wal-b{batch}-", dir=directory))
    storage, _ = RaftStorage.open(data_dir, StorageOptions(fsync=fsync))
    data = os.urandom(payload)
    latencies: list[float] = []
    raw_latencies: list[float] = []
    next_index = 1
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(latencies) < 20:
            block_end = time.perf_counter() + _BLOCK_SECONDS
            while time.perf_counter() < block_end:
                entries = [Entry(next_index + offset, 1, data=data) for offset in range(batch)]
                hard_state = HardState(1, "a", next_index - 1)
                start = time.perf_counter()
                storage.save(hard_state=hard_state, entries=entries, sync=True)
                latencies.append(time.perf_counter() - start)
                next_index += batch
            block_end = time.perf_counter() + _BLOCK_SECONDS
            while fsync and time.perf_counter() < block_end:
                raw_latencies.append(raw.timed())
    finally:
        storage.close()
        for path in sorted(data_dir.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        data_dir.rmdir()
    label = f"save batch={batch:<3} fsync={'on ' if fsync else 'off'}"
    raw_p50 = statistics.median(raw_latencies) if raw_latencies else float("nan")
    return summarize(label, latencies, batch, raw_p50)


def measure_replay(directory: Path, count: int, payload: int) -> tuple[float, int]:
    """Seconds RaftStorage.open takes to replay `count` entries written in batches of 100."""
    data_dir = directory / "replay"
    storage, _ = RaftStorage.open(data_dir, StorageOptions(fsync=False))
    data = os.urandom(payload)
    for first in range(1, count + 1, 100):
        storage.save(
            hard_state=HardState(1, "a", first - 1),
            entries=[Entry(first + i, 1, data=data) for i in range(100)],
        )
    storage.close()
    wal_bytes = sum(path.stat().st_size for path in (data_dir / "wal").iterdir())
    start = time.perf_counter()
    reopened, state = RaftStorage.open(data_dir, StorageOptions(fsync=False))
    elapsed = time.perf_counter() - start
    reopened.close()
    assert len(state.entries) == count
    return elapsed, wal_bytes


def summarize(label: str, latencies: list[float], entries_per_operation: int, raw_p50: float) -> Result:
    return Result(
        label=label,
        operations=len(latencies),
        entries_per_second=entries_per_operation * len(latencies) / sum(latencies),
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        raw_p50_ms=raw_p50 * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="time spent on each row")
    parser.add_argument("--payload", type=int, default=200, help="bytes of data per entry")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--replay", type=int, default=200_000, help="entries for the replay measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="wal-bench-", dir=args.dir) as scratch:
        directory = Path(scratch)
        raw = RawFsync(directory, args.payload)
        try:
            baseline = measure_raw(raw, args.seconds)
            results = [baseline]
            for fsync in (True, False):
                for batch in (1, 10, 100):
                    results.append(measure_storage(directory, raw, batch, fsync, args.seconds, args.payload))
        finally:
            raw.close()
        replay_seconds, replay_bytes = measure_replay(directory, args.replay, args.payload)

    print(f"payload {args.payload} B/entry, {args.seconds:.1f} s per row, directory {args.dir or 'tmp'}")
    print(
        "raw p50: raw fdatasync p50 in blocks alternating with the row's saves (fsync off: the first row's)"
    )
    print("x raw e/s: entries/s over the raw row's fdatasyncs/s (one fsync per entry)")
    columns = f"{'ops':>7} {'entries/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'raw p50':>8} {'p50/raw':>8}"
    header = f"{'':28} {columns} {'x raw e/s':>10}"
    print(header)
    print("-" * len(header))
    for result in results:
        raw_p50 = result.raw_p50_ms if result.raw_p50_ms == result.raw_p50_ms else baseline.p50_ms
        print(
            f"{result.label:28} {result.operations:7d} {result.entries_per_second:11.0f} "
            f"{result.p50_ms:8.3f} {result.p99_ms:8.3f} {raw_p50:8.3f} {result.p50_ms / raw_p50:8.2f} "
            f"{result.entries_per_second / baseline.entries_per_second:10.1f}"
        )

    print(
        f"replay on open: {args.replay} entries ({replay_bytes / 2**20:.1f} MiB) in {replay_seconds:.3f} s, "
        f"{args.replay / replay_seconds:.0f} entries/s"
    )


if __name__ == "__main__":
    main()
