"""The jsonl-file sink's rotation (`--max-bytes`, `--keep`): bounded disk use, nothing lost but the oldest."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from etlrouter.connectors.jsonl_file_sink import JsonlFileSink
from etlrouter.sdk import Record


def offsets(path: Path) -> list[int]:
    return [json.loads(line)["offset"] for line in path.read_text().splitlines()] if path.exists() else []


def test_rotates_at_max_bytes_and_keeps_k_files(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"

    async def go() -> JsonlFileSink:
        sink = JsonlFileSink(path, max_bytes=1000, keep=2)
        await sink.open()
        for b in range(40):
            records = [Record(b"k", b"x" * 50, {}, 0, b * 5 + i) for i in range(5)]
            await sink.write(f"b{b}", records, {})
            await sink.write(f"b{b}", records, {})  # a retry: remembered across rotations
        await sink.flush()
        await sink.close()
        return sink

    sink = asyncio.run(go())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(
        [
            "out.jsonl",
            "out.jsonl.batches",
            "out.jsonl.1",
            "out.jsonl.1.batches",
            "out.jsonl.2",
            "out.jsonl.2.batches",
        ]
    )
    assert all((tmp_path / f).stat().st_size < 1000 + 600 for f in files if not f.endswith("batches"))
    kept = offsets(sink.rotated(2)) + offsets(sink.rotated(1)) + offsets(path)
    assert kept == list(range(200 - len(kept), 200))  # contiguous: only the oldest file was dropped
    assert len(kept) > 0 and len(set(kept)) == len(kept)

    async def reopen() -> None:  # a restart after a rotation recovers the current file and its log
        again = JsonlFileSink(path, max_bytes=1000, keep=2)
        await again.open()
        await again.write("b99", [Record(b"k", b"y", {}, 0, 999)], {})
        await again.close()

    asyncio.run(reopen())
    assert offsets(path)[-1] == 999
